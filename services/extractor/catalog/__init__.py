"""The extractor's pure core: DICOM bytes -> catalog records -> stacks.

No Kafka, Postgres or object storage here: the service (`services/extractor/app.py`) reads the bytes,
calls `parse_instance`, bulk-loads the rows, and calls `build_stacks` per series.
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
