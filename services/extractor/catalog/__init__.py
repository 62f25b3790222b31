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
from .sniff import Sniff, sniff
from .stacks import (
    StackBuilder,
    build_stacks,
    format_number,
    frame_stack_keys,
    orientation_label,
    stack_constants,
    stack_key,
)

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
