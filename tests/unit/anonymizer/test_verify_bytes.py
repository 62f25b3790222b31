"""Verification's proof on the written bytes: it may spare the element-wise search only where that
search would find nothing, so every verdict must be the element-wise search's."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from services.anonymizer.profile import (
    Finding,
    IdentifierSet,
    ProfileOptions,
    WrittenFile,
    verify,
    write_file,
)
from services.anonymizer.profile.vendor_headers import pack_gzip_block

from .conftest import run
from .test_writer import sample

# the module (the package exports its function `verify` under the same name)
verification = sys.modules["services.anonymizer.profile.verify"]


def element_wise(
    monkeypatch: pytest.MonkeyPatch, data: bytes, ids: IdentifierSet, excused: list[Finding]
) -> list[Finding]:
    """verify() without the proof on the bytes: every element read back and searched."""
    with monkeypatch.context() as patch:
        patch.setattr(verification, "_bytes_name_nobody", lambda *args: False)
        return verify(data, ids, None, excused)


def test_the_proof_agrees_with_the_element_wise_search_on_real_files(
    dicom_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proven = 0
    for path in sample(dicom_root)[::2]:
        result, _ = run(path, ProfileOptions(shift_dates=True))
        written = write_file(result.dataset)
        ids = result.identifiers
        nobody = verification._bytes_name_nobody(written.data, ids, written.pixel_data)
        excused: list[Finding] = []
        found = element_wise(monkeypatch, written.data, ids, excused)
        if nobody:
            proven += 1
            assert not found and not excused, path
        mine: list[Finding] = []
        assert verify(written.data, ids, None, mine, written.pixel_data) == found
        assert mine == excused
    assert proven > 20  # the proof spares most files the search


def _file(elements: list[tuple[int, str, object]], implicit: bool) -> WrittenFile:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.4")
    ds.file_meta.MediaStorageSOPInstanceUID = UID("2.25.1")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = "2.25.1"
    for tag, vr, value in elements:
        ds.add_new(tag, vr, value)
    ds.Rows, ds.Columns = 2, 2
    ds.add_new(0x7FE00010, "OW", b"JOHN20200131" * 4 + b"\x00" * 8)  # pixels: never searched
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return _written(buffer.getvalue())


def _written(data: bytes) -> WrittenFile:
    """A file as the anonymizer's writer writes it (raw elements copied as read)."""
    written = write_file(pydicom.dcmread(io.BytesIO(data), force=True))
    assert written.pixel_data is not None
    return written


def _item(meaning: str) -> Dataset:
    item = Dataset()
    item.CodeMeaning = meaning
    return item


def _ids() -> IdentifierSet:
    ids = IdentifierSet()
    ids.add_value("JOHN")
    ids.add_uid("1.2.840.99.7")
    ids.add_date("20200131")
    return ids


CREATOR = [(0x00410010, "LO", "ACME"), (0x00430010, "LO", "OTHER")]


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize(
    ("elements", "where"),
    [
        # a value ending where the next element's group reads as a letter (0043: "C")
        ([(0x00411001, "LO", "JOHN"), (0x00431001, "LO", "x")], "(0041,1001)"),
        # a UID ending where the next group reads as a digit (0032: "2")
        ([(0x00200052, "UI", "1.2.840.99.7"), (0x00321032, "PN", "x")], "FrameOfReferenceUID"),
        # a date opening a DT
        ([(0x0018A002, "DT", "20200131101500")], "ContributionDateTime"),
        # a value in a sequence item
        ([(0x00400260, "SQ", [_item("JOHN")])], "PerformedProtocolCodeSequence[0].CodeMeaning"),
    ],
)
def test_an_identifier_where_an_element_begins_or_ends_is_found(
    elements: list[tuple[int, str, object]], where: str, implicit: bool
) -> None:
    data = _file([*CREATOR, *elements], implicit).data
    assert not verification._bytes_name_nobody(data, _ids(), None)
    assert where in {f.location for f in verify(data, _ids())}


def test_a_value_opening_a_long_text_is_found() -> None:
    """The byte before the value is its length's high byte, here a letter (0x41 "A")."""
    data = _file([(0x00204000, "LT", "JOHN " + "x" * (0x4142 - 5))], implicit=False).data
    assert not verification._bytes_name_nobody(data, _ids(), None)
    assert {f.location for f in verify(data, _ids())} == {"ImageComments"}


def test_a_value_in_a_gzip_block_is_found() -> None:
    block = pack_gzip_block(b"exam of JOHN")
    data = _file([(0x00250010, "LO", "GEMS_SERS_01"), (0x0025101B, "OB", block)], False).data
    assert not verification._bytes_name_nobody(data, _ids(), None)
    assert [f.location for f in verify(data, _ids())] == ["(0025,101B)"]


def test_inside_longer_words_and_numbers_and_in_the_pixels_nothing_is_searched() -> None:
    """Occurrences within a longer word or number are no hits (a value followed by capitals could
    be followed by an element header, as far as the bytes tell, and is searched element-wise)."""
    elements: list[tuple[int, str, object]] = [
        (0x00081030, "LO", "johnson^johnxyz"),
        (0x00200052, "UI", "1.2.840.99.71"),
        (0x00204000, "LT", "abc120200131x 1.20200131"),
    ]
    for implicit in (False, True):
        written = _file(elements, implicit)
        assert written.pixel_data is not None
        start, end = written.pixel_data
        assert verification._bytes_name_nobody(written.data, _ids(), (start, end))
        assert verify(written.data, _ids(), pixel_data=(start, end)) == []
        assert verify(written.data, _ids()) == []  # the pixels hold the date: searched element-wise
        assert not verification._bytes_name_nobody(written.data, _ids(), None)
        assert not verification._bytes_name_nobody(written.data, _ids(), (start + 2, end))


@pytest.mark.parametrize("charset", ["ISO_IR 192", "ISO_IR 100\\ISO 2022 IR 87"])
def test_other_character_sets_are_searched_element_wise(charset: str) -> None:
    other = _file([(0x00080005, "CS", charset), (0x00081030, "LO", "nobody")], False)
    assert not verification._bytes_name_nobody(other.data, _ids(), other.pixel_data)
    latin1 = _file([(0x00080005, "CS", "ISO_IR 100"), (0x00081030, "LO", "nobody")], False)
    assert verification._bytes_name_nobody(latin1.data, _ids(), latin1.pixel_data)
