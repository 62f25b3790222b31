"""parse_instance on the team's real DICOM: counts, transfer syntaxes, fields, SOP classes, header JSON."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID

from services.extractor.catalog import InstanceRecord, Rejection, parse_instance

PER_FRAME = "52009230"


def _independent_catalogue(files: list[Path]) -> dict[str, set[str]]:
    """Plain pydicom, no project code: what an image catalogue of these files must contain."""
    found: dict[str, set[str]] = {
        "patients": set(),
        "studies": set(),
        "series": set(),
        "instances": set(),
    }
    files_as_images = 0
    for path in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # anything pydicom cannot read is not an image
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        if not sop_class or "Image Storage" not in UID(sop_class).name:
            continue
        files_as_images += 1
        found["patients"].add(str(ds.PatientID))
        found["studies"].add(str(ds.StudyInstanceUID))
        found["series"].add(str(ds.SeriesInstanceUID))
        found["instances"].add(str(ds.SOPInstanceUID))
    found["files"] = {str(files_as_images)}
    return found


def test_counts_equal_an_independent_pydicom_count(
    shared_files: list[Path], instances: list[InstanceRecord], rejections: dict[str, Rejection]
) -> None:
    expected = _independent_catalogue(shared_files)
    assert {i.subject.patient_id for i in instances} == expected["patients"]
    assert {i.study.study_instance_uid for i in instances} == expected["studies"]
    assert {i.series.series_instance_uid for i in instances} == expected["series"]
    assert {i.sop_instance_uid for i in instances} == expected["instances"]
    assert {str(len(instances))} == expected["files"]
    assert len(instances) + len(rejections) == len(shared_files)
    # the data set as documented: 2029 image files (one Philips enhanced file is present twice)
    assert len(instances) == 2029
    assert len(expected["instances"]) == 2028


def test_every_rejection_has_a_reason_of_a_known_kind(rejections: dict[str, Rejection]) -> None:
    kinds = ("not DICOM:", "truncated:", "corrupt:", "DICOMDIR", "non-image SOP class:")
    assert rejections
    for key, rejection in rejections.items():
        assert rejection.reason.startswith(kinds), (key, rejection.reason)
    # the shared data has no damaged DICOM: every rejection is a text file or a non-image object
    assert not [r for r in rejections.values() if r.reason.startswith(("truncated", "corrupt"))]


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (
            "dcm_qa_philips_dwi/In/cl/DICOM/PS_0545",
            "non-image SOP class: Grayscale Softcopy Presentation State Storage",
        ),
        (
            "dcm_qa_philips_dwi/In/enh/DICOM/PS_0002",
            "non-image SOP class: Grayscale Softcopy Presentation State Storage",
        ),
        ("dcm_qa_philips_dwi/In/enh/DICOM/XX_0003", "non-image SOP class: Raw Data Storage"),
        (
            "dcm_qa_philips_dwi/In/cl/DICOM/XX_0546",
            "non-image SOP class: Philips Private MR Series Data Storage",
        ),
        ("dcm_qa_philips_dwi/In/cl/DICOMDIR", "DICOMDIR"),
        ("dcm_qa_philips_dwi/In/enh/DICOMDIR", "DICOMDIR"),
        (
            "dcm_qa_philips_dwi/In/rorden_test.txt",
            "not DICOM: no DICM magic and no parseable data set",
        ),
        ("dcm_qa_pdt2/In/Siemens/.DS_Store", "not DICOM: no DICM magic and no parseable data set"),
    ],
)
def test_non_images_are_recorded_with_their_reason(
    rejections: dict[str, Rejection], key: str, reason: str
) -> None:
    assert rejections[key].reason == reason


def test_presentation_state_rejection_keeps_its_identifiers(
    rejections: dict[str, Rejection],
) -> None:
    rejection = rejections["dcm_qa_philips_dwi/In/cl/DICOM/PS_0545"]
    assert rejection.sop_class_uid == "1.2.840.10008.5.1.4.1.1.11.1"
    assert (
        rejection.sop_instance_uid
        and rejection.series_instance_uid
        and rejection.study_instance_uid
    )


@pytest.mark.parametrize("number", range(1, 10))
def test_every_transfer_syntax_file_parses(dicom_root: Path, number: int) -> None:
    path = dicom_root / "dcm_qa_ts" / "In" / f"{number}.dcm"
    record = parse_instance(path, path.name)
    assert isinstance(record, InstanceRecord), getattr(record, "reason", "")
    reference = pydicom.dcmread(path, stop_before_pixels=True)
    assert record.transfer_syntax_uid == reference.file_meta.TransferSyntaxUID
    assert record.sop_instance_uid == reference.SOPInstanceUID
    assert (record.rows, record.columns) == (reference.Rows, reference.Columns)
    assert record.mr is not None and record.mr.echo_time == 30.0 and record.mr.flip_angle == 76.0


def test_transfer_syntax_set_covers_compressed_and_big_endian(dicom_root: Path) -> None:
    syntaxes = {
        parse_instance(p, p.name).transfer_syntax_uid  # type: ignore[union-attr]
        for p in sorted((dicom_root / "dcm_qa_ts" / "In").glob("*.dcm"))
    }
    assert {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
    } <= syntaxes


# (file, expected values) read from the real headers; each row checks a different record and vendor
FIELD_CASES = [
    (
        "dcm_qa_deident/In/00072.dcm",
        {
            "series.manufacturer": "GE MEDICAL SYSTEMS",
            "series.magnetic_field_strength": 3.0,
            "series.series_description": "Accelerated SAG IR-SPGR",
            "study.study_date": "20240425",
            "instance.instance_number": 72,
            "mr.echo_time": 2.832,
            "mr.inversion_time": 400.0,
            "mr.flip_angle": 11.0,
            "mr.repetition_time": 6.964,
            "mr.mr_acquisition_type": "3D",
            "mr.scan_options": ["FAST_GEMS", "EDR_GEMS", "ACC_GEMS"],
            "mr.vendor_pulse_sequence": "efgre3d",
            "mr.pixel_bandwidth": 244.141,
        },
    ),
    (
        "dcm_qa_ct/In/GE/01.dcm",
        {
            "series.modality": "CT",
            "ct.kvp": 120.0,
            "ct.convolution_kernel": ["STD+"],
            "ct.xray_tube_current": 180.0,
            "ct.gantry_detector_tilt": 18.5,
            "instance.slice_thickness": 4.0,
            "instance.rows": 512,
        },
    ),
    (
        "dcm_qa_philips_dwi/In/cl/DICOM/IM_0008",
        {
            "subject.patient_sex": "M",
            "subject.patient_age": "052Y",
            "series.manufacturer_model": "Ingenia Elition X",
            "mr.diffusion_b_value": 1000.0,
            "mr.b_value": 1000.0,
            "mr.echo_train_length": 55,
            "mr.phase_encoding_direction": "COL",
        },
    ),
    (
        "dcm_qa_enh/In/Siemens/XA10/6_1.dcm",
        {
            "series.manufacturer": "Siemens HealthCare GmbH",
            "instance.number_of_frames": 6,
            "mr.repetition_time": 500.0,
            "mr.echo_time": 30.0,
            "mr.flip_angle": 52.0,
            "mr.pulse_sequence_name": "*epfid2d1_64",
            "mr.parallel_acquisition_technique": "SMS",
            "mr.pixel_bandwidth": 2298.0,
        },
    ),
    (
        "dcm_qa_pdt2/In/Siemens/VE11/0001.dcm",
        {
            "series.manufacturer": "SIEMENS",
            "mr.sequence_name": "*tse2d2_5",
            "instance.image_type": ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"],
        },
    ),
]


@pytest.mark.parametrize(("key", "expected"), FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
def test_record_fields_match_the_header(
    parsed: dict[str, InstanceRecord | Rejection], key: str, expected: dict
) -> None:
    record = parsed[key]
    assert isinstance(record, InstanceRecord)
    for dotted, value in expected.items():
        holder, name = dotted.split(".")
        owner = record if holder == "instance" else getattr(record, holder)
        assert getattr(owner, name) == value, dotted


def test_siemens_private_b_value_is_read_from_csa_when_needed(
    instances: list[InstanceRecord],
) -> None:
    # the Philips classic DTI stores b in the standard tag; its b0 volumes carry tiny non-zero values
    philips = [i for i in instances if i.series.series_number == 701]
    assert len(philips) == 544
    b_values = sorted({round(i.mr.b_value or 0) for i in philips if i.mr})
    assert b_values == [0, 1000]


def test_ge_b0_map_images_are_told_apart(instances: list[InstanceRecord]) -> None:
    b0map = [i for i in instances if i.source_key.startswith("dcm_qa_fmap/In/GE/2_3db0maps/")]
    parts = {(i.instance_number or 0) <= 80: {f.part for f in i.frames} for i in b0map}
    assert parts == {True: {"B0MAP"}, False: {"M"}}


def test_enhanced_philips_b0_map_has_per_frame_values(
    parsed: dict[str, InstanceRecord | Rejection],
) -> None:
    record = parsed["dcm_qa_enh/In/Philips/IM_0027_fMAP.dcm"]
    assert isinstance(record, InstanceRecord)
    assert record.number_of_frames == 64 and len(record.frames) == 64
    by_part: dict[str, set[float | None]] = {}
    for frame in record.frames:
        by_part.setdefault(frame.part or "", set()).add(frame.echo_time)
    assert by_part == {"M": {1.52}, "B0MAP": {0.0}}
    assert len({tuple(f.position) for f in record.frames}) == 32
    assert all(f.stack_id == "1" and f.in_stack_position for f in record.frames)


def test_header_json_has_no_pixel_data_and_one_frame_item(
    parsed: dict[str, InstanceRecord | Rejection],
) -> None:
    record = parsed["dcm_qa_enh/In/Philips/IM_0027_fMAP.dcm"]
    assert isinstance(record, InstanceRecord)
    header = record.header
    assert "7FE00010" not in header
    assert len(header[PER_FRAME]["Value"]) == 1
    assert header["00080060"] == {"vr": "CS", "Value": ["MR"]}
    assert header["00280008"]["Value"] == [64]
    json.dumps(header)  # plain JSON: storable as jsonb


def test_header_json_drops_bulk_values_but_keeps_the_tag(
    parsed: dict[str, InstanceRecord | Rejection],
) -> None:
    record = parsed["dcm_qa_pdt2/In/Siemens/VE11/0001.dcm"]
    assert isinstance(record, InstanceRecord)
    csa = record.header["00291020"]  # Siemens CSA Series Header Info, ~127 kB
    assert csa["vr"] in ("OB", "UN") and "InlineBinary" not in csa
    assert record.header["00100020"]["Value"] == [record.subject.patient_id]
    assert record.header["00180081"] == {"vr": "DS", "Value": [11]}


def test_header_json_survives_values_that_break_pydicom(dicom_root: Path) -> None:
    # GE writes text ("ApTx:", ...) into the DS attribute (0043,1080): Dataset.to_json_dict gives up on
    # the whole header; the catalog keeps the header and the malformed values as text
    path = sorted((dicom_root / "dcm_qa_fmap" / "In" / "GE" / "2_3db0maps").iterdir())[0]
    with pytest.raises(ValueError):
        pydicom.dcmread(path, stop_before_pixels=True).to_json_dict()
    record = parse_instance(path, path.name)
    assert isinstance(record, InstanceRecord)
    assert record.header["00431080"]["Value"][0] == "ApTx:"
    assert record.header["00180081"] == {"vr": "DS", "Value": [4.94]}


def test_row_round_trip(instances: list[InstanceRecord]) -> None:
    for record in instances[::97]:
        row = record.to_row()
        json.dumps(row)
        assert InstanceRecord.from_row(row) == record


@pytest.mark.parametrize("prefix", [256, 4096, 1 << 20])
def test_large_file_route_reads_only_a_growing_prefix(
    dicom_root: Path, monkeypatch: pytest.MonkeyPatch, prefix: int
) -> None:
    from services.extractor.catalog import parse as parse_module

    path = dicom_root / "dcm_qa_enh/In/Philips/IM_0027_fMAP.dcm"
    expected = parse_instance(path, "whole")
    monkeypatch.setattr(parse_module, "READ_WHOLE_LIMIT", 1000)  # every file counts as large
    monkeypatch.setattr(parse_module, "HEADER_PREFIX", prefix)
    record = parse_instance(path, "whole")
    assert isinstance(record, InstanceRecord)
    assert record == expected


def test_large_file_route_still_finds_truncation(
    dicom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.extractor.catalog import parse as parse_module

    content = (dicom_root / "dcm_qa_enh/In/Philips/IM_0027_fMAP.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(content[: len(content) - 1000])
    monkeypatch.setattr(parse_module, "READ_WHOLE_LIMIT", 1000)
    monkeypatch.setattr(parse_module, "HEADER_PREFIX", 4096)
    result = parse_instance(cut, "cut.dcm")
    assert isinstance(result, Rejection) and result.reason.startswith(
        "truncated: Pixel Data declares"
    )


def test_timepoint_label_reaches_the_study_record(dicom_root: Path) -> None:
    """The anonymizer's ClinicalTrialTimePointID (M06) is the study's `timepoint`: the exporter names
    date-less sessions by it."""
    path = next((dicom_root / "dcm_qa_ct" / "In").rglob("*.dcm"))
    ds = pydicom.dcmread(path)
    ds.ClinicalTrialTimePointID = "M06"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    record = parse_instance(buffer.getvalue(), "x.dcm")
    assert isinstance(record, InstanceRecord)
    assert record.study.timepoint == "M06"
