"""The small real files that ship inside pydicom: encodings and object kinds the shared set lacks."""

from __future__ import annotations

import pytest
from pydicom.data import get_testdata_file

from services.extractor.catalog import InstanceRecord, Rejection, build_stacks, parse_instance


def _parse(name: str) -> InstanceRecord | Rejection:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} missing"
    return parse_instance(path, name)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("MR_truncated.dcm", "truncated: Pixel Data declares 8192 bytes, 8130 present"),
        ("rtplan_truncated.dcm", "truncated: element (300A,00B0) runs past the end at byte 2129"),
        ("reportsi.dcm", "non-image SOP class: Basic Text SR Storage"),
        ("test-SR.dcm", "non-image SOP class: Comprehensive SR Storage"),
        ("waveform_ecg.dcm", "non-image SOP class: 12-lead ECG Waveform Storage"),
        ("rtdose.dcm", "non-image SOP class: RT Dose Storage"),
        ("liver_1frame.dcm", "non-image SOP class: Segmentation Storage"),
        # data sets without preamble or file meta, explicit VR little and big endian: parsed from content
        ("ExplVR_LitEndNoMeta.dcm", "non-image SOP class: RT Ion Plan Storage"),
        ("ExplVR_BigEndNoMeta.dcm", "non-image SOP class: RT Ion Plan Storage"),
    ],
)
def test_rejections(name: str, reason: str) -> None:
    result = _parse(name)
    assert isinstance(result, Rejection)
    assert result.reason == reason


def test_dicomdir_is_recorded_as_non_image() -> None:
    path = get_testdata_file("DICOMDIR", download=False)
    assert path is not None
    result = parse_instance(path, "DICOMDIR")
    assert isinstance(result, Rejection) and result.reason == "DICOMDIR"


@pytest.mark.parametrize(
    ("name", "transfer_syntax"),
    [
        (
            "image_dfl.dcm",
            "1.2.840.10008.1.2.1.99",
        ),  # deflated: the whole data set is zlib-compressed
        ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
        ("MR_small_implicit.dcm", "1.2.840.10008.1.2"),
        ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
        ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81"),
        ("693_J2KI.dcm", "1.2.840.10008.1.2.4.91"),
        ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51"),
        (
            "SC_rgb_jpeg.dcm",
            "1.2.840.10008.1.2.4.50",
        ),  # implicit VR written under an explicit syntax
    ],
)
def test_more_transfer_syntaxes(name: str, transfer_syntax: str) -> None:
    record = _parse(name)
    assert isinstance(record, InstanceRecord), getattr(record, "reason", "")
    assert record.transfer_syntax_uid == transfer_syntax


def test_classic_multiframe_counts_every_frame() -> None:
    record = _parse("examples_ybr_color.dcm")  # ultrasound cine, 30 frames in one classic object
    assert isinstance(record, InstanceRecord)
    assert record.number_of_frames == 30 and len(record.frames) == 30
    (stack,) = build_stacks([record])
    assert (stack.n_instances, stack.n_frames, stack.modality) == (1, 30, "US")


def test_ct_sample_fields() -> None:
    record = _parse("CT_small.dcm")
    assert isinstance(record, InstanceRecord) and record.ct is not None
    assert record.ct.kvp == 120.0 and record.ct.convolution_kernel
    (stack,) = build_stacks([record])
    assert stack.stack_key == "CT|TYPE=AXIAL|ORIENT=AX"
