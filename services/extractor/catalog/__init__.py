"""The extractor's pure core: DICOM bytes -> catalog records -> stacks.

No Kafka, Postgres or object storage here: the service reads the bytes, calls `parse_instance`,
bulk-loads the rows, and builds stacks per series.

    result = parse_instance(content_or_path, source_key)
    if isinstance(result, Rejection):
        rejected_rows.append(result.to_row())          # reason: "not DICOM: ...", "truncated: ...", ...
    else:
        instance_rows.append(result.to_row())          # flat: instance + subject/study/series columns,
                                                       # mr/ct/pet/frames/header as JSON values
        memberships = frame_stack_keys(result)         # [(frame, stack_key)] for the stack tables

    builder = StackBuilder()                           # per series, from records or stored rows
    for row in rows_of_one_series:
        builder.add(InstanceRecord.from_row(row))
    summaries = builder.summaries()                    # list[shared.catalog.StackSummary]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# light (no pydicom), and imported at once: its module shares the function's name, so a lazy
# `sniff` would be the module once something imported `.sniff`
from .sniff import Sniff, sniff

if TYPE_CHECKING:
    from .header_json import dataset_to_json
    from .parse import parse_instance
    from .records import (
        CTDetail,
        FrameRecord,
        InstanceRecord,
        MRDetail,
        PETDetail,
        Rejection,
        SeriesRecord,
        StudyRecord,
        SubjectRecord,
    )
    from .stacks import (
        StackBuilder,
        build_stacks,
        format_number,
        frame_stack_keys,
        orientation_label,
        stack_constants,
        stack_key,
    )

# the module each other public name lives in: a name is imported on first use (PEP 562), so a
# caller of `sniff` alone (`cohortflow run`'s check for DICOM) does not pay for pydicom and the parser
_MODULES = {
    "CTDetail": "records",
    "FrameRecord": "records",
    "InstanceRecord": "records",
    "MRDetail": "records",
    "PETDetail": "records",
    "Rejection": "records",
    "SeriesRecord": "records",
    "StackBuilder": "stacks",
    "StudyRecord": "records",
    "SubjectRecord": "records",
    "build_stacks": "stacks",
    "dataset_to_json": "header_json",
    "format_number": "stacks",
    "frame_stack_keys": "stacks",
    "orientation_label": "stacks",
    "parse_instance": "parse",
    "stack_constants": "stacks",
    "stack_key": "stacks",
}

__all__ = [
    "CTDetail",
    "FrameRecord",
    "InstanceRecord",
    "MRDetail",
    "PETDetail",
    "Rejection",
    "SeriesRecord",
    "Sniff",
    "StackBuilder",
    "StudyRecord",
    "SubjectRecord",
    "build_stacks",
    "dataset_to_json",
    "format_number",
    "frame_stack_keys",
    "orientation_label",
    "parse_instance",
    "sniff",
    "stack_constants",
    "stack_key",
]


if not TYPE_CHECKING:  # hidden from type checkers: for them the imports above are the names

    def __getattr__(name: str) -> object:
        if name not in _MODULES:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
        globals()[name] = value
        return value
