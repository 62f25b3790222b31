"""The BIDS core of the exporter: naming, planning, sidecars and dataset files (no Kafka, SQL or S3)."""

from services.exporter.bids.dataset import (
    ExportedStack,
    SubjectPart,
    dataset_description,
    dataset_files,
    incomplete_images,
    merged_dataset_files,
    subject_files,
    write_dataset_files,
)
from services.exporter.bids.entities import (
    bids_name,
    bids_path,
    load_entity_table,
    parse_bids_name,
    sanitize_label,
)
from services.exporter.bids.fieldmaps import ScanRecord, link_fieldmaps
from services.exporter.bids.outputs import OutputName, images_of_stack, name_outputs
from services.exporter.bids.plan import (
    StudyVisit,
    Target,
    assign_sessions,
    naming_problems,
    plan_names,
    select_stacks,
    stack_target,
)
from services.exporter.bids.sidecar import build_sidecar, missing_required
from services.exporter.bids.stack import ExportStack

__all__ = [
    "ExportStack",
    "ExportedStack",
    "OutputName",
    "ScanRecord",
    "StudyVisit",
    "SubjectPart",
    "Target",
    "assign_sessions",
    "bids_name",
    "bids_path",
    "build_sidecar",
    "dataset_description",
    "dataset_files",
    "images_of_stack",
    "incomplete_images",
    "link_fieldmaps",
    "load_entity_table",
    "merged_dataset_files",
    "missing_required",
    "name_outputs",
    "naming_problems",
    "parse_bids_name",
    "plan_names",
    "sanitize_label",
    "select_stacks",
    "stack_target",
    "subject_files",
    "write_dataset_files",
]
