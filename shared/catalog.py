"""The catalog's stack record: what extraction hands to sorting and export.

The extractor owns the `catalog` schema and publishes a view `catalog.stack_summary_v` whose rows are
`StackSummary`s; the sorter builds its fingerprints from them and the exporter reads them (with the
`catalog.instance_v` rows of the stack) to convert and name. Nothing here touches Postgres.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StackSummary(BaseModel):
    """One stack: the instances of a series that share per-volume acquisition constants.

    `header` is the DICOM JSON model (PS3.18 F.2, as `pydicom.Dataset.to_json_dict` writes it) of the
    stack's representative instance (the first by instance number), without pixel data or other bulk
    data. For Enhanced multi-frame objects it keeps the Shared Functional Groups and the first frame's
    Per-frame Functional Groups; the per-frame values that vary are summarised in the fields below.
    """

    model_config = ConfigDict(extra="allow")

    cohort_id: uuid.UUID | None = None
    subject_id: str  # PatientID as catalogued (a pseudonym after anonymization)
    study_instance_uid: str
    series_instance_uid: str
    stack_key: str  # e.g. "MR|TE=2.46|TI=900|FA=9|ECHO=1|PART=M|ORIENT=AX"
    # the per-volume constants that make up stack_key, by name (TE, TI, FA, ECHO, PART, ORIENT, ...)
    constants: dict[str, Any] = Field(default_factory=dict)

    modality: str = ""
    sop_class_uid: str = ""
    manufacturer: str = ""
    manufacturer_model: str = ""
    series_number: int | None = None
    series_description: str = ""
    protocol_name: str = ""
    study_date: str | None = None  # DICOM DA, YYYYMMDD
    acquisition_time: str | None = None  # earliest AcquisitionTime/ContentTime of the stack, TM

    n_instances: int = 0  # files
    n_frames: int = 0  # images (frames of multi-frame objects counted one by one)
    n_slices: int = 0  # distinct slice positions
    n_volumes: int = 0  # temporal positions / repetitions / diffusion volumes
    rows: int | None = None
    columns: int | None = None
    pixel_spacing: list[float] = Field(default_factory=list)
    slice_thickness: float | None = None
    image_orientation: list[float] = Field(default_factory=list)

    image_types: list[str] = Field(default_factory=list)  # union of ImageType values in the stack
    echo_times: list[float] = Field(default_factory=list)  # distinct TE in the whole series
    inversion_times: list[float] = Field(default_factory=list)
    b_values: list[float] = Field(
        default_factory=list
    )  # distinct b-values (standard or private tags)
    n_diffusion_directions: int = 0  # distinct non-zero gradient directions

    header: dict[str, Any] = Field(default_factory=dict)

    # the stack's members; kept out of the serialized summary (the catalog stores them in a column)
    sop_instance_uids: list[str] = Field(default_factory=list, exclude=True)
