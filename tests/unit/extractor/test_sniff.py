"""Content sniffing and damaged files: decided from bytes, never from names."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pydicom
import pytest

from services.extractor.catalog import InstanceRecord, Rejection, parse_instance, sniff

PDT2 = "dcm_qa_pdt2/In/Siemens/VE11/0001.dcm"
EXPLICIT_LE = "dcm_qa_ts/In/1.dcm"
IMPLICIT_LE = "dcm_qa_ts/In/2.dcm"
JPEG_LOSSLESS = "dcm_qa_ts/In/5.dcm"
KINDS = {"not DICOM", "truncated", "corrupt", "DICOMDIR", "non-image SOP class"}


def _without_file_meta(content: bytes) -> bytes:
    """The bare data set of a Part 10 file: preamble, DICM and group 0002 removed."""
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(content), stop_before_pixels=True)
    meta_length = int(ds.file_meta.FileMetaInformationGroupLength)
    return content[128 + 4 + 12 + meta_length :]


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00", "part10"),
        (b"\x08\x00\x05\x00CS\n\x00ISO_IR 100", "stream"),  # explicit VR LE, (0008,0005)
        (b"\x08\x00\x05\x00\x0a\x00\x00\x00ISO_IR 100", "stream"),  # implicit VR LE
        (b"\x00\x08\x00\x05CS\x00\x0aISO_IR 100", "stream"),  # explicit VR big endian
        (b"Hello, this is a README file\n" * 10, "none"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, "none"),
        (b"", "none"),
    ],
)
def test_sniff_decides_from_content(content: bytes, kind: str) -> None:
    assert sniff(content).kind == kind


def test_text_file_named_dcm_is_rejected_as_not_dicom(tmp_path: Path) -> None:
    fake = tmp_path / "image.dcm"
    fake.write_text("not an image\n" * 40)
    result = parse_instance(fake, "image.dcm")
    assert isinstance(result, Rejection)
    assert result.reason == "not DICOM: no DICM magic and no parseable data set"


def test_dicom_without_extension_or_preamble_is_catalogued(dicom_root: Path) -> None:
    content = (dicom_root / EXPLICIT_LE).read_bytes()
    record = parse_instance(_without_file_meta(content), "no-name")
    assert isinstance(record, InstanceRecord)
    reference = pydicom.dcmread(dicom_root / EXPLICIT_LE, stop_before_pixels=True)
    assert record.sop_instance_uid == reference.SOPInstanceUID
    assert record.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert record.mr is not None and record.mr.echo_time == 30.0


def test_implicit_vr_stream_without_preamble_is_catalogued(dicom_root: Path) -> None:
    content = (dicom_root / IMPLICIT_LE).read_bytes()
    record = parse_instance(_without_file_meta(content), "stream")
    assert isinstance(record, InstanceRecord)
    assert record.transfer_syntax_uid == "1.2.840.10008.1.2"
    assert record.series.series_description == "ax_asc_35sl"


@pytest.mark.parametrize("keep", [100, 131, 2000, 20000, 100000, 145000])
def test_truncated_file_is_rejected_as_truncated(dicom_root: Path, keep: int) -> None:
    content = (dicom_root / PDT2).read_bytes()
    assert len(content) > keep
    result = parse_instance(content[:keep], "cut.dcm")
    assert isinstance(result, Rejection)
    assert result.reason.startswith("truncated"), result.reason


def test_cut_in_trailing_padding_keeps_the_image(dicom_root: Path) -> None:
    # this Siemens file ends with Data Set Trailing Padding (FFFC,FFFC) after complete pixel data
    content = (dicom_root / PDT2).read_bytes()
    assert isinstance(parse_instance(content[:-16], "padded.dcm"), InstanceRecord)


def test_truncated_compressed_pixel_data_is_rejected(dicom_root: Path) -> None:
    content = (dicom_root / JPEG_LOSSLESS).read_bytes()
    result = parse_instance(content[: len(content) - 5000], "cut-jpeg.dcm")
    assert isinstance(result, Rejection)
    assert result.reason.startswith("truncated: "), result.reason
    whole = parse_instance(content, "jpeg.dcm")
    assert isinstance(whole, InstanceRecord)


def test_corrupt_header_is_rejected_with_the_parser_error(dicom_root: Path) -> None:
    content = bytearray((dicom_root / PDT2).read_bytes())
    # overwrite the first data set element after the file meta with an impossible explicit VR length
    ds = pydicom.dcmread(dicom_root / PDT2, stop_before_pixels=True)
    start = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    content[start : start + 64] = b"\x08\x00\x16\x00SQ\x00\x00\xf0\xff\xff\x7f" + b"\xff" * 52
    result = parse_instance(bytes(content), "corrupt.dcm")
    assert isinstance(result, Rejection)
    assert result.reason.startswith("corrupt: element (0008,0016) declares 2147483632 bytes"), (
        result.reason
    )


def test_garbage_inside_the_header_is_corrupt(dicom_root: Path) -> None:
    content = bytearray((dicom_root / PDT2).read_bytes())
    content[400:420] = b"\xff" * 20  # an element header overwritten: the reader cannot go on
    result = parse_instance(bytes(content), "damaged.dcm")
    assert isinstance(result, Rejection)
    assert result.reason.startswith("corrupt: "), result.reason


def test_garbage_after_magic_is_corrupt() -> None:
    content = b"\x00" * 128 + b"DICM" + bytes(range(256)) * 8
    result = parse_instance(content, "garbage.dcm")
    assert isinstance(result, Rejection)
    assert result.reason.startswith("corrupt: "), result.reason


@pytest.mark.parametrize(
    "key",
    [
        PDT2,
        IMPLICIT_LE,
        "dcm_qa_ts/In/3.dcm",  # explicit VR big endian
        JPEG_LOSSLESS,
        "dcm_qa_enh/In/Philips/IM_0027_fMAP.dcm",
        "dcm_qa_philips_dwi/In/cl/DICOMDIR",
    ],
)
def test_damaged_content_never_raises(dicom_root: Path, key: str) -> None:
    """Cuts and overwritten bytes anywhere in the header: always a record or a reasoned rejection."""
    original = (dicom_root / key).read_bytes()
    rng = random.Random(key)
    for n in range(60):
        content = bytearray(original)
        if n % 2:
            content = content[: rng.randrange(len(content))]
        else:
            start = rng.randrange(min(len(content), 20000))
            content[start : start + rng.randrange(1, 32)] = rng.randbytes(8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = parse_instance(bytes(content), key)
        if isinstance(result, Rejection):
            assert result.reason.split(":")[0] in KINDS, result.reason
        else:
            assert isinstance(result, InstanceRecord)
