"""Kept vendor blocks are cleaned in place: dates follow the subject's offset, UIDs and identifying
values are replaced at the same length, the structure stays readable, and what cannot be cleaned is
removed and reported — never left for verification to refuse the file."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pydicom
import pytest
from nibabel.nicom import csareader
from pydicom import Dataset

from services.anonymizer.audit import audit_row
from services.anonymizer.profile import (
    IdentifierSet,
    ProfileOptions,
    date_offset_days,
    shift_da,
    verify,
)
from services.anonymizer.profile.options import CATEGORIES
from services.anonymizer.profile.vendor_headers import (
    VendorTextCleaner,
    csa_text_spans,
    date_replacement,
    pack_gzip_block,
    unpack_gzip_block,
)

from .conftest import SECRET, dicom_files, run
from .test_deident import brute_force_terms, leaked, leaks

CSA_SERIES = 0x00291020
CSA_IMAGE = 0x00291010
ASCCONV_DATE = re.compile(rb"sSpecPara\.lFinalMatrixSizePhase\s*=\s*([0-9]+)")


def _first(folder: Path) -> Path:
    return dicom_files(folder)[0]


def _saved(ds: Dataset, tmp_path: Path) -> Path:
    path = tmp_path / "planted.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _csa_items(data: bytes) -> dict[str, list[object]]:
    return {name: tag["items"] for name, tag in csareader.read(data)["tags"].items()}


@pytest.fixture(scope="module")
def siemens_ve11(dev_corpus_root: Path) -> Path:
    """A Siemens VE11 mosaic BOLD whose ASCCONV holds the acquisition date."""
    return _first(dev_corpus_root / "dicom_parser" / "rsfmri")


def test_ascconv_date_follows_the_subject_offset(siemens_ve11: Path) -> None:
    original = pydicom.dcmread(siemens_ve11)
    found = ASCCONV_DATE.search(original[CSA_SERIES].value)
    assert found is not None and found.group(1).decode() == original.StudyDate
    offset = date_offset_days(SECRET, "subTEST01")
    expected = {
        ProfileOptions(shift_dates=True): shift_da(original.StudyDate, offset),
        ProfileOptions(): "19000101",  # dates removed: the dummy date, same length
        ProfileOptions(categories=frozenset(CATEGORIES) - {"time_and_date"}): original.StudyDate,
    }
    for options, date in expected.items():
        result, data = run(siemens_ve11, options)
        out = pydicom.dcmread(io.BytesIO(data))
        cleaned = ASCCONV_DATE.search(out[CSA_SERIES].value)
        assert cleaned is not None and cleaned.group(1).decode() == date
        assert out.get("StudyDate", date) in (date, "")  # the public date moved the same way
        assert verify(data, result.identifiers) == []


def test_csa_structure_survives_and_only_text_changes(siemens_ve11: Path) -> None:
    original = pydicom.dcmread(siemens_ve11)
    result, data = run(siemens_ve11)
    out = pydicom.dcmread(io.BytesIO(data))
    for tag in (CSA_SERIES, CSA_IMAGE):
        before, after = original[tag].value, out[tag].value
        assert len(before) == len(after) and csa_text_spans(before) == csa_text_spans(after)
        a, b = _csa_items(before), _csa_items(after)
        assert a.keys() == b.keys()
        changed = {name for name in a if a[name] != b[name]}
        # numbers (slice times, b-values, normals) are untouched; only the protocol text changed
        assert changed <= {"MrPhoenixProtocol"}
    assert ("SIEMENS CSA HEADER:20", "cleaned") in result.actions
    protocol = out[CSA_SERIES].value
    assert b"### ASCCONV BEGIN" in protocol and b'tReferenceImage0\t = \t""2.25.' in protocol


@pytest.mark.parametrize(
    ("folder", "series"),
    [
        ("dicom_parser", "rsfmri"),
        ("dcm_qa_me", "4_me_fMRI"),
        ("heudiconv", "b0dwiForFmap"),
        ("heudiconv", "samplePhysio_02+physio_test"),  # the CSA series header at block 11
        ("heudiconv", "MEGRE_mag"),  # a transfer syntax UID written as MediaStorageSOPInstanceUID
    ],
)
def test_held_out_siemens_files_are_released_and_clean(
    dev_corpus_root: Path, folder: str, series: str
) -> None:
    """The files verification refused before (an original date in the CSA series header): now
    released, and an independent search of the raw bytes finds no original date, UID or
    identifying value."""
    for path in dicom_files(dev_corpus_root / folder / series)[:3]:
        original = pydicom.dcmread(path)
        result, data = run(path)
        assert verify(data, result.identifiers) == []
        assert not [key for key, _ in result.actions if "not cleanable" in key]  # kept, cleaned
        values, uids = brute_force_terms(original)
        assert not leaks(values, data), f"{path.name}: an identifying value survived"
        assert not leaks(uids, data, uids=True), f"{path.name}: an original UID survived"
        dates = b"|".join(sorted(d.encode() for d in _original_dates(original)))
        if dates:
            found = re.findall(rb"(?<![0-9.])(?:" + dates + rb")(?![0-9])", data)
            assert not found, found
        assert "1.2.840.10008.1.2.1" not in result.identifiers.uids


def _original_dates(ds: Dataset) -> set[str]:
    dates = set()
    for elem in ds.iterall():
        if elem.VR in ("DA", "DT") and elem.value:
            for value in elem.value if elem.VM > 1 else [elem.value]:
                if str(value)[:8].isdigit():
                    dates.add(str(value)[:8])
    return dates


def _plant_in_ascconv(value: bytes, ds: Dataset) -> None:
    """Overwrite the protocol name in the ASCCONV with `value` (space-padded to its length)."""
    data = ds[CSA_SERIES].value
    at = data.index(b'tProtocolName\t = \t""') + len(b'tProtocolName\t = \t""')
    end = data.index(b'""', at)
    ds[CSA_SERIES].value = data[:at] + value.ljust(end - at) + data[end:]


def test_a_name_planted_in_the_ascconv_is_cleaned(siemens_ve11: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(siemens_ve11)
    ds.PatientName = "Nowak Kowalczyk^Agnieszka"  # one word of a compound family name
    ds.PatientID = "PID-4471902"
    _plant_in_ascconv(b"Kowalczyk PID-4471902", ds)
    result, data = run(_saved(ds, tmp_path))
    assert verify(data, result.identifiers) == []
    assert not leaked(b"Kowalczyk", data) and not leaked(b"PID-4471902", data)
    protocol = pydicom.dcmread(io.BytesIO(data))[CSA_SERIES].value
    assert b'tProtocolName\t = \t""XXXXXXXXX XXXXXXXXXXX' in protocol
    assert "MrPhoenixProtocol" in _csa_items(protocol)


def test_a_name_planted_in_the_ge_protocol_block_is_cleaned(
    dicom_root: Path, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(_first(dicom_root / "dcm_qa_nih/In/20180918GE/mr_0005"))
    inner = unpack_gzip_block(ds[0x0025101B].value)
    assert inner is not None
    name = str(ds.PatientName).split("^")[0].encode()
    note = b'NOTES "scanned ' + name + b" on " + ds.StudyDate.encode() + b'"\n'
    ds[0x0025101B].value = pack_gzip_block(inner + note)
    result, data = run(_saved(ds, tmp_path))
    assert verify(data, result.identifiers) == []
    cleaned = unpack_gzip_block(pydicom.dcmread(io.BytesIO(data))[0x0025101B].value)
    assert cleaned is not None and b"SLICEORDER" in cleaned
    shifted = shift_da(ds.StudyDate, date_offset_days(SECRET, "subTEST01")).encode()
    assert cleaned.endswith(b'NOTES "scanned ' + b"X" * len(name) + b" on " + shifted + b'"\n')


def test_a_name_planted_in_a_philips_block_is_cleaned(dicom_root: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(_first(dicom_root / "dcm_qa_philips_dwi/In/cl/DICOM"))
    ds.PatientName = "Okonkwo^Chidi"
    ds[0x200110C8].value = "exam of Okonkwo Chidi"
    result, data = run(_saved(ds, tmp_path))
    assert verify(data, result.identifiers) == []
    assert pydicom.dcmread(io.BytesIO(data))[0x200110C8].value == "exam of XXXXXXX XXXXX"


def test_what_cannot_be_cleaned_is_removed_and_reported(siemens_ve11: Path, tmp_path: Path) -> None:
    """An identifier in the binary part of a CSA header (here the VR field of its first tag) cannot
    be rewritten without touching the structure: the element goes, the audit says why."""
    ds = pydicom.dcmread(siemens_ve11)
    ds.PatientID = "QZX"
    data = bytearray(ds[CSA_IMAGE].value)
    vr_field = 16 + 64 + 4  # SV10 header, the first tag's name and VM
    data[vr_field : vr_field + 4] = b"QZX\x00"
    ds[CSA_IMAGE].value = bytes(data)
    result, out = run(_saved(ds, tmp_path))
    assert verify(out, result.identifiers) == []
    assert CSA_IMAGE not in pydicom.dcmread(io.BytesIO(out))
    assert result.actions[("SIEMENS CSA HEADER:10 (not cleanable)", "removed")] == 1
    assert "SIEMENS CSA HEADER:10 (not cleanable)" in audit_row(result, "").removed
    assert CSA_SERIES in pydicom.dcmread(io.BytesIO(out))  # the rest of the block stays


def _cleaner(dates: set[str], shift: int | None = -100) -> VendorTextCleaner:
    ids = IdentifierSet(values={"DOE", "JOHN"}, uids={"1.2.840.99.7"}, dates=dates)
    return VendorTextCleaner(
        values=ids.values,
        originals=ids.matcher(),
        new_date=date_replacement(shift),
        secret=SECRET,
    )


def test_only_dates_are_rewritten_never_other_numbers() -> None:
    text = (
        b"### ASCCONV BEGIN ###\n"
        b"sSpecPara.lFinalMatrixSizePhase\t = \t16\n"  # spectroscopy: a matrix size
        b"sNavigatorPara.lBreathHoldDuration_us\t = \t15000000\n"
        b'sProtConsistencyInfo.tBaselineString\t = \t""N4_VE11C_LATEST_20160120""\n'
        b"a = 201805021\nb = 1.20180502\nc = 20180502121843.5\nd = 2018-05-02 02.05.2018\n"
        b"e = 20180502\n### ASCCONV END ###"
    )
    cleaned = _cleaner({"20180502"}).clean(text)
    assert cleaned.data is not None and len(cleaned.data) == len(text)
    new = shift_da("20180502", -100)
    out = cleaned.data.decode()
    assert "lFinalMatrixSizePhase\t = \t16\n" in out and "\t15000000\n" in out
    assert "LATEST_20160120" in out  # a software build date, not an original date
    assert "a = 201805021\nb = 1.20180502\n" in out  # inside longer numbers
    assert f"c = {new}121843.5\n" in out and f"e = {new}\n" in out
    assert f"d = {new[:4]}-{new[4:6]}-{new[6:]} {new[6:]}.{new[4:6]}.{new[:4]}" in out
    assert not cleaned.residue and cleaned.dates


def test_an_ascconv_date_field_is_a_date_even_when_no_attribute_holds_it() -> None:
    text = b"### ASCCONV BEGIN ###\nsSpecPara.lFinalMatrixSizePhase\t = \t20991231\n"
    cleaned = _cleaner(set(), shift=None).clean(text)
    assert cleaned.data is not None and b"\t19000101\n" in cleaned.data
    assert cleaned.dates == ["20991231"]


def test_a_date_that_is_no_calendar_date_gets_the_dummy() -> None:
    cleaned = _cleaner({"00000000"}).clean(b"acquired 00000000 at noon")
    assert cleaned.data == b"acquired 19000101 at noon"


def test_uids_and_values_replaced_at_the_same_length() -> None:
    text = b'x "1.2.840.99.7" y "1.3.12.2.1107.5.2.43.67060.2018050212" by John Doe, JOHNSON'
    cleaned = _cleaner(set()).clean(text)
    assert cleaned.data is not None and len(cleaned.data) == len(text)
    assert b"1.2.840.99.7" not in cleaned.data and b"1.3.12.2.1107" not in cleaned.data
    assert cleaned.data.endswith(b"by XXXX XXX, JOHNSON")
    assert set(cleaned.uids) == {"1.2.840.99.7", "1.3.12.2.1107.5.2.43.67060.2018050212"}
    assert not cleaned.residue


def test_csa_spans_reject_what_is_not_a_csa_header() -> None:
    assert csa_text_spans(b"") is None
    assert csa_text_spans(b"SV10\x04\x03\x02\x01" + b"\xff" * 40) is None
    assert csa_text_spans(b"plain vendor text, long enough to look at") is None


def test_the_ge_protocol_block_keeps_no_file_name_or_time_in_its_gzip_header(
    dev_corpus_root: Path,
) -> None:
    """GE writes the block's gzip header with a file name `Ex<exam>Ser<series>...` (the exam
    number is the StudyID) and the time it was written: both go, even when the text inside has
    nothing to clean."""
    path = _first(dev_corpus_root / "dcm_qa_table/GE_Exam1486_01_3_Plane_Localizer_FF")
    original = pydicom.dcmread(path)[0x0025101B].value
    assert original[7] & 0x08 and b"Ex1486" in original  # FNAME set, the exam number in it
    result, data = run(path)
    block = pydicom.dcmread(io.BytesIO(data))[0x0025101B].value
    assert b"1486" not in block[:64] and block[7] == 0 and block[8:12] == b"\x00\x00\x00\x00"
    assert unpack_gzip_block(block) == unpack_gzip_block(original)
    assert verify(data, result.identifiers) == []


def test_stale_bytes_after_csa_tag_names_are_cleared(dev_corpus_root: Path) -> None:
    """Siemens leaves stale memory after the NUL of CSA tag names: a station name with the device
    serial in it, remnants of UIDs with the acquisition time. Nothing reads it; it goes."""
    path = sorted((dev_corpus_root / "nibabel" / "CBU_DTI_64D_1A").iterdir())[0]
    assert b"MRC35119" in pydicom.dcmread(path)[0x00291010].value
    result, data = run(path)
    image = pydicom.dcmread(io.BytesIO(data))[0x00291010].value
    assert b"MRC35119" not in image and b"35119" not in image
    assert verify(data, result.identifiers) == []
    assert _csa_items(image) == _csa_items(pydicom.dcmread(path)[0x00291010].value)
