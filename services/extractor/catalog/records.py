"""The plain records one DICOM file becomes: subject, study, series, instance, frames, modality detail.

Records are dataclasses of plain values (str, float, int, lists, dicts): they pickle across a process
pool, turn into database rows (`InstanceRecord.to_row`) and come back from them (`from_row`), so stacks
can be re-derived per series from stored rows without reading a file again. Times and dates keep their
DICOM text forms (DA `YYYYMMDD`, TM `HHMMSS.FFFFFF`); lengths are millimetres, times milliseconds, angles
degrees, b-values s/mm², as in the standard.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


@dataclass(slots=True)
class SubjectRecord:
    """The patient (Patient Module, PS3.3 C.7.1.1) as the catalog knows them."""

    patient_id: str | None = (
        None  # (0010,0020) PatientID: the subject key; a pseudonym after anonymization
    )
    issuer_of_patient_id: str | None = None  # (0010,0021) assigning authority of PatientID
    patient_sex: str | None = None  # (0010,0040) M, F or O
    patient_birth_date: str | None = None  # (0010,0030) DA
    patient_age: str | None = None  # (0010,1010) AS, e.g. "034Y"
    patient_weight: float | None = None  # (0010,1030) kg
    patient_size: float | None = None  # (0010,1020) m
    patient_identity_removed: str | None = None  # (0012,0062) YES after de-identification


@dataclass(slots=True)
class StudyRecord:
    """The imaging study (General Study Module, PS3.3 C.7.2.1)."""

    study_instance_uid: str | None = None  # (0020,000D)
    study_date: str | None = None  # (0008,0020) DA
    study_time: str | None = None  # (0008,0030) TM
    accession_number: str | None = None  # (0008,0050) RIS order number
    study_description: str | None = None  # (0008,1030)
    study_id: str | None = None  # (0020,0010) scanner-assigned study number
    institution_name: str | None = None  # (0008,0080)
    # (0012,0050) ClinicalTrialTimePointID: M00, M06, ... when the anonymizer labelled timepoints
    timepoint: str | None = None


@dataclass(slots=True)
class SeriesRecord:
    """The series (General Series and General Equipment Modules, PS3.3 C.7.3.1, C.7.5.1)."""

    series_instance_uid: str | None = None  # (0020,000E)
    modality: str | None = None  # (0008,0060) MR, CT, PT, ...
    series_number: int | None = None  # (0020,0011)
    series_description: str | None = None  # (0008,103E) free text, wrong about one time in ten
    protocol_name: str | None = None  # (0018,1030) the scanner protocol's name
    series_date: str | None = None  # (0008,0021) DA
    series_time: str | None = None  # (0008,0031) TM
    manufacturer: str | None = None  # (0008,0070)
    manufacturer_model: str | None = None  # (0008,1090)
    station_name: str | None = None  # (0008,1010)
    software_versions: list[str] = field(default_factory=list)  # (0018,1020)
    magnetic_field_strength: float | None = None  # (0018,0087) tesla (some scanners write gauss)
    body_part_examined: str | None = None  # (0018,0015)
    frame_of_reference_uid: str | None = (
        None  # (0020,0052) the patient coordinate system shared by images
    )
    contrast_bolus_agent: str | None = None  # (0018,0010) set when contrast was given


@dataclass(slots=True)
class MRDetail:
    """MR acquisition parameters (MR Image Module C.8.3.1 and the Enhanced MR macros C.8.13)."""

    repetition_time: float | None = None  # (0018,0080) TR, ms
    echo_time: float | None = None  # (0018,0081) TE or (0018,9082) EffectiveEchoTime, ms
    inversion_time: float | None = None  # (0018,0082) TI or first of (0018,9079) InversionTimes, ms
    flip_angle: float | None = None  # (0018,1314) degrees
    echo_train_length: int | None = None  # (0018,0091)
    echo_numbers: int | None = None  # (0018,0086) which echo of a multi-echo acquisition
    scanning_sequence: list[str] = field(default_factory=list)  # (0018,0020) SE, IR, GR, EP, RM
    sequence_variant: list[str] = field(
        default_factory=list
    )  # (0018,0021) SK, MTC, SS, TRSS, SP, MP, OSP
    scan_options: list[str] = field(
        default_factory=list
    )  # (0018,0022) PER, RG, CG, PPG, FC, PFF, SAT...
    mr_acquisition_type: str | None = None  # (0018,0023) 2D or 3D
    sequence_name: str | None = None  # (0018,0024) vendor name, e.g. Siemens "*tfl3d1_16ns"
    pulse_sequence_name: str | None = None  # (0018,9005) enhanced MR
    echo_pulse_sequence: str | None = None  # (0018,9008) SPIN, GRADIENT, BOTH
    acquisition_contrast: str | None = None  # (0008,9209) T1, T2, PROTON_DENSITY, DIFFUSION, ...
    inversion_recovery: str | None = None  # (0018,9009) YES/NO
    imaging_frequency: float | None = None  # (0018,0084) MHz
    imaged_nucleus: str | None = None  # (0018,0085) e.g. 1H
    number_of_averages: float | None = None  # (0018,0083)
    pixel_bandwidth: float | None = None  # (0018,0095) Hz per pixel
    percent_phase_field_of_view: float | None = None  # (0018,0094)
    acquisition_matrix: list[float] = field(default_factory=list)  # (0018,1310)
    phase_encoding_direction: str | None = None  # (0018,1312) ROW or COL
    parallel_acquisition: str | None = None  # (0018,9077) YES/NO
    parallel_acquisition_technique: str | None = None  # (0018,9078) GRAPPA, SENSE, ...
    parallel_reduction_factor_in_plane: float | None = None  # (0018,9069)
    parallel_reduction_factor_out_of_plane: float | None = (
        None  # (0018,9155) SMS / multiband factor
    )
    diffusion_b_value: float | None = None  # (0018,9087) standard b-value, s/mm²
    diffusion_directionality: str | None = None  # (0018,9075) DIRECTIONAL, ISOTROPIC, NONE, BMATRIX
    diffusion_gradient_orientation: list[float] = field(default_factory=list)  # (0018,9089)
    number_of_temporal_positions: int | None = None  # (0020,0105)
    angio_flag: str | None = None  # (0018,0025) Y when an angiographic acquisition
    receive_coil_name: str | None = None  # (0018,1250)
    transmit_coil_name: str | None = None  # (0018,1251)
    trigger_time: float | None = (
        None  # (0018,1060) ms after the R wave: per slice, never a stack constant
    )
    temporal_position_identifier: int | None = None  # (0020,0100)
    # read from vendor private tags when the standard ones are absent (see data/private_tags.json)
    b_value: float | None = None  # the b-value used for stacks and summaries
    gradient_direction: list[float] = field(default_factory=list)
    vendor_pulse_sequence: str | None = None  # GE (0019,109C)


@dataclass(slots=True)
class CTDetail:
    """CT acquisition and reconstruction (CT Image Module C.8.2.1). Per-slice values never split stacks."""

    kvp: float | None = None  # (0018,0060) peak kilovoltage
    convolution_kernel: list[str] = field(default_factory=list)  # (0018,1210) reconstruction kernel
    exposure: float | None = None  # (0018,1152) mAs, varies per slice under dose modulation
    exposure_time: float | None = None  # (0018,1150) ms
    xray_tube_current: float | None = None  # (0018,1151) mA, varies per slice under dose modulation
    ctdi_vol: float | None = None  # (0018,9345) mGy
    reconstruction_diameter: float | None = None  # (0018,1100) mm
    gantry_detector_tilt: float | None = None  # (0018,1120) degrees
    spiral_pitch_factor: float | None = None  # (0018,9311)
    filter_type: str | None = None  # (0018,1160)
    rescale_intercept: float | None = None  # (0028,1052) HU offset
    rescale_slope: float | None = None  # (0028,1053)
    contrast_bolus_route: str | None = None  # (0018,1040)


@dataclass(slots=True)
class PETDetail:
    """PET tracer, units and corrections (PET Series C.8.9.1, PET Isotope C.8.9.2, PET Image C.8.9.4)."""

    radiopharmaceutical: str | None = None  # (0018,0031) e.g. Fluorodeoxyglucose
    radionuclide_total_dose: float | None = None  # (0018,1074) Bq
    radionuclide_half_life: float | None = None  # (0018,1075) s
    radiopharmaceutical_start_time: str | None = None  # (0018,1072) TM
    radiopharmaceutical_start_datetime: str | None = None  # (0018,1078) DT
    units: str | None = None  # (0054,1001) BQML, CNTS, GML (SUV), ...
    series_type: list[str] = field(
        default_factory=list
    )  # (0054,1000) STATIC/DYNAMIC/GATED/WHOLE BODY
    corrected_image: list[str] = field(
        default_factory=list
    )  # (0028,0051) ATTN, DECY, SCAT, NORM, ...
    decay_correction: str | None = None  # (0054,1102) NONE, START, ADMIN
    decay_factor: float | None = None  # (0054,1321)
    attenuation_correction_method: str | None = None  # (0054,1101)
    reconstruction_method: str | None = None  # (0054,1103)
    frame_reference_time: float | None = None  # (0054,1300) ms from series start: frame timing
    actual_frame_duration: float | None = None  # (0018,1242) ms
    number_of_time_slices: int | None = None  # (0054,0101) frames of a dynamic series
    number_of_slices: int | None = None  # (0054,0081) slices per frame
    image_index: int | None = None  # (0054,1330)
    scatter_correction_method: str | None = None  # (0054,1105)
    dose_calibration_factor: float | None = None  # (0054,1322)


@dataclass(slots=True)
class FrameRecord:
    """One image: a classic file's only frame, or one frame of an Enhanced multi-frame object.

    Holds what decides the frame's stack (the per-volume constants) and where it sits (the per-slice
    values). For Enhanced objects the values come from the frame's Per-frame Functional Groups item
    merged over the Shared Functional Groups.
    """

    frame: int = 1  # 1-based frame number inside the file
    echo_time: float | None = None  # ms
    echo_number: int | None = None
    inversion_time: float | None = None  # ms
    flip_angle: float | None = None  # degrees
    image_type: list[str] = field(
        default_factory=list
    )  # ImageType, or FrameType (0008,9007) per frame
    part: str | None = None  # M, P, R, I or a derived-map label (see data/image_parts.json)
    b_value: float | None = None  # s/mm²
    gradient: list[float] = field(default_factory=list)  # unit diffusion gradient direction
    position: list[float] = field(default_factory=list)  # ImagePositionPatient, mm
    orientation: list[float] = field(
        default_factory=list
    )  # ImageOrientationPatient direction cosines
    temporal_position: int | None = None  # TemporalPositionIndex (0020,9128) or identifier
    stack_id: str | None = None  # StackID (0020,9056): the vendor's own stack label
    in_stack_position: int | None = None  # InStackPositionNumber (0020,9057)
    acquisition_time: str | None = None  # FrameAcquisitionDateTime or AcquisitionTime
    trigger_time: float | None = None  # ms, per slice
    frame_reference_time: float | None = None  # PET frame timing, ms


@dataclass(slots=True)
class Rejection:
    """A file that is not catalogued as an image, and why.

    `reason` starts with one of: "not DICOM:", "truncated:", "corrupt:", "DICOMDIR",
    "non-image SOP class:".
    """

    source_key: str
    reason: str
    size: int = 0
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    patient_id: str | None = None

    def to_row(self) -> dict[str, Any]:
        return as_dict(self)


@dataclass(slots=True)
class InstanceRecord:
    """One catalogued image file (Image Pixel, Image Plane, General Image and SOP Common Modules)."""

    source_key: str  # where the bytes came from (object key or path): the resume key
    size: int  # bytes
    transfer_syntax_uid: str | None  # (0002,0010)
    sop_class_name: str
    subject: SubjectRecord
    study: StudyRecord
    series: SeriesRecord
    sop_instance_uid: str | None = None  # (0008,0018)
    sop_class_uid: str | None = None  # (0008,0016)
    instance_number: int | None = None  # (0020,0013)
    acquisition_number: int | None = None  # (0020,0012)
    number_of_frames: int = 1  # (0028,0008), 1 for single-frame objects
    rows: int | None = None  # (0028,0010)
    columns: int | None = None  # (0028,0011)
    bits_allocated: int | None = None  # (0028,0100)
    photometric_interpretation: str | None = None  # (0028,0004)
    pixel_spacing: list[float] = field(default_factory=list)  # (0028,0030) row, column spacing, mm
    slice_thickness: float | None = None  # (0018,0050) mm
    spacing_between_slices: float | None = None  # (0018,0088) mm
    image_type: list[str] = field(default_factory=list)  # (0008,0008) ORIGINAL/DERIVED\PRIMARY\...
    image_position: list[float] = field(default_factory=list)  # (0020,0032) mm, first voxel centre
    # (0020,0037) row and column direction cosines
    image_orientation: list[float] = field(default_factory=list)
    slice_location: float | None = None  # (0020,1041) mm, per slice
    acquisition_date: str | None = None  # (0008,0022) DA
    acquisition_time: str | None = None  # (0008,0032) TM
    acquisition_datetime: str | None = None  # (0008,002A) DT (Enhanced objects)
    content_date: str | None = None  # (0008,0023) DA
    content_time: str | None = None  # (0008,0033) TM
    burned_in_annotation: str | None = None  # (0028,0301) YES when text is burned into pixels
    mosaic_slices: int | None = None  # Siemens MOSAIC: slices tiled in the image, (0019,100A)
    mr: MRDetail | None = None
    ct: CTDetail | None = None
    pet: PETDetail | None = None
    frames: list[FrameRecord] = field(default_factory=list)
    # the header as DICOM JSON, without bulk data and without the per-frame items after the first
    header: dict[str, Any] = field(default_factory=dict)

    NESTED: ClassVar[dict[str, type]] = {
        "subject": SubjectRecord,
        "study": StudyRecord,
        "series": SeriesRecord,
    }
    DETAILS: ClassVar[dict[str, type]] = {"mr": MRDetail, "ct": CTDetail, "pet": PETDetail}

    def to_row(self) -> dict[str, Any]:
        """One flat row: the instance's columns plus its subject, study and series columns (all names are
        distinct), modality detail as dicts (or None), frames as a list of dicts, header as a dict.

        Everything stack building needs is in the row, so `from_row(row)` gives back an equal record.
        """
        row: dict[str, Any] = {}
        for name in self.NESTED:
            row.update(as_dict(getattr(self, name)))
        for name in _names(InstanceRecord):
            if name in self.NESTED:
                continue
            value = getattr(self, name)
            if name in self.DETAILS:
                row[name] = None if value is None else as_dict(value)
            elif name == "frames":
                # an Enhanced object can have thousands of frames: leave their empty values out
                row[name] = [
                    {k: v for k, v in as_dict(frame).items() if v is not None and v != []}
                    for frame in value
                ]
            else:
                row[name] = value
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> InstanceRecord:
        """Rebuild a record from `to_row()` output (or a database row with the same column names).

        Columns missing from `row` take their defaults, so a row without `header` still builds stacks.
        """
        nested = {name: _build(kind, row) for name, kind in cls.NESTED.items()}
        kwargs: dict[str, Any] = {}
        for name in _names(cls):
            if name in cls.NESTED or name not in row:
                continue
            value = row[name]
            if name in cls.DETAILS:
                value = None if value is None else _build(cls.DETAILS[name], value)
            elif name == "frames":
                value = [_build(FrameRecord, frame) for frame in value or []]
            kwargs[name] = value
        kwargs.setdefault("size", 0)
        kwargs.setdefault("transfer_syntax_uid", None)
        kwargs.setdefault("sop_class_name", "")
        kwargs.setdefault("source_key", "")
        return cls(**nested, **kwargs)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _names(kind: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(kind)
    if names is None:
        names = _FIELD_NAMES[kind] = tuple(f.name for f in fields(kind))
    return names


def as_dict(record: Any) -> dict[str, Any]:
    """A record dataclass as a dict of its fields (lists kept as lists)."""
    return {name: getattr(record, name) for name in _names(type(record))}


def _build(kind: type, data: dict[str, Any]) -> Any:
    """A record of `kind` from the keys of `data` it knows; sequences come back as lists."""
    kwargs = {}
    for name in _names(kind):
        if name in data:
            value = data[name]
            kwargs[name] = list(value) if isinstance(value, tuple) else value
    return kind(**kwargs)
