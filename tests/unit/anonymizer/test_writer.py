"""The anonymizer's writer copies unchanged elements as read: its output must be pydicom's, byte for
byte, on every vendor's files and transfer syntax in the shared data."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pydicom
import pytest

from services.anonymizer.profile import (
    AnonymizationContext,
    ProfileOptions,
    anonymize,
    date_offset_days,
    load_profile,
)
from services.anonymizer.profile.writer import _pydicom_bytes, dicom_bytes

from .conftest import SECRET, dicom_files


def sample(root: Path) -> list[Path]:
    """Up to three DICOM files of every folder that holds some (every vendor and series kind)."""
    by_folder: dict[Path, list[Path]] = {}
    for path in dicom_files(root):
        if "Ref" not in path.parts:
            by_folder.setdefault(path.parent, []).append(path)
    return [p for files in by_folder.values() for p in files[:3]]


def test_output_is_pydicoms_byte_for_byte(dicom_root: Path) -> None:
    files = sample(dicom_root)
    assert len(files) > 50
    profile = load_profile(ProfileOptions(shift_dates=True))
    syntaxes = set()
    for path in files:
        ds = pydicom.dcmread(path, force=True)
        syntaxes.add(str(ds.file_meta.get("TransferSyntaxUID", "")))
        context = AnonymizationContext(
            profile, SECRET, "subW", date_offset_days=date_offset_days(SECRET, "subW")
        )
        result = anonymize(ds, context)
        expected = _pydicom_bytes(copy.deepcopy(result.dataset))
        assert dicom_bytes(result.dataset) == expected, path.relative_to(dicom_root)
    assert "1.2.840.10008.1.2" in syntaxes and "1.2.840.10008.1.2.1" in syntaxes


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"])
def test_other_encodings_are_written_by_pydicom(dicom_root: Path, syntax: str) -> None:
    """Big endian and deflated data sets are pydicom's to write (re-encoded, not copied)."""
    ds = pydicom.dcmread(sample(dicom_root)[0])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
    out = dicom_bytes(ds)
    back = pydicom.dcmread(io.BytesIO(out))
    assert back.file_meta.TransferSyntaxUID == syntax
    assert (back.SOPInstanceUID, back.Rows, back.Modality) == (
        ds.SOPInstanceUID,
        ds.Rows,
        ds.Modality,
    )


def test_a_deferred_value_is_read_and_written(dicom_root: Path) -> None:
    """A value pydicom left on disk (`defer_size`) is read when written, as `get_item` reads it:
    the output equals that of the same file read whole."""
    path = max(sample(dicom_root)[:20], key=lambda p: p.stat().st_size)
    whole = dicom_bytes(pydicom.dcmread(path, force=True))
    deferred = pydicom.dcmread(path, force=True, defer_size=256)
    assert any(
        isinstance(e, pydicom.dataelem.RawDataElement) and e.value is None
        for e in deferred._dict.values()
    )
    assert dicom_bytes(deferred) == whole
