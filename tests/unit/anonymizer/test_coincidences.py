"""Verification tells a leak from a coincidence, without getting weaker.

Real files from the shared data, with identifying values set the way real scanners set them (a
vendor imaging at its own site, a station named after its model, a phantom named after a sequence):
those are released, the excuse recorded in the audit. The same values planted where they identify
somebody (a name whole, an ID, free text, a private element) are cleaned or refused, never released.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from services.anonymizer.audit import audit_row
from services.anonymizer.profile import Finding, ProfileOptions, verify

from .conftest import dicom_files, run


@pytest.fixture(scope="module")
def source(dicom_root: Path) -> Path:
    return dicom_files(dicom_root / "dcm_qa_deident" / "In")[0]


def rewritten(source: Path, tmp_path: Path, **values: object) -> Path:
    ds = pydicom.dcmread(source)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    path = tmp_path / "in.dcm"
    ds.save_as(path)
    return path


def released(path: Path) -> tuple[list[Finding], list[Finding], bytes, int]:
    result, data = run(path, ProfileOptions(shift_dates=True))
    excused: list[Finding] = []
    findings = verify(data, result.identifiers, "anon/c/x.dcm", excused)
    row = audit_row(result, "anon/c/x.dcm", "released", excused)
    assert row.excused == " ".join(sorted({f"{f.kind} in {f.location}" for f in excused}))
    return findings, excused, data, row.unsearched_values


def holds(term: str, data: bytes) -> bool:
    pattern = rb"(?<![A-Za-z0-9])" + re.escape(term.encode()) + rb"(?![A-Za-z0-9])"
    return re.search(pattern, data, re.IGNORECASE) is not None


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"InstitutionName": "SIEMENS", "Manufacturer": "SIEMENS"}, "Manufacturer"),
        ({"InstitutionName": "TOSHIBA", "Manufacturer": "TOSHIBA_MEC"}, "Manufacturer"),
        (
            {"StationName": "Galan 3T", "ManufacturerModelName": "Galan 3T"},
            "ManufacturerModelName",
        ),
        ({"PatientName": "Phantom^efgre3d", "SequenceName": "*efgre3d_12"}, "SequenceName"),
    ],
)
def test_a_coincidence_with_a_kept_device_or_technique_attribute_is_released(
    source: Path, tmp_path: Path, values: dict[str, str], where: str
) -> None:
    findings, excused, data, _ = released(rewritten(source, tmp_path, **values))
    assert findings == []
    assert [f.location for f in excused] == [where]
    out = pydicom.dcmread(io.BytesIO(data))
    assert getattr(out, where) == values[where]  # kept as it was, not damaged


@pytest.mark.parametrize(
    "values",
    [
        # a name planted whole: both components match in one element
        {"PatientName": "Doe^Jane", "ManufacturerModelName": "Jane Doe"},
        # a name that is all of a technique attribute's text
        {"PatientName": "stc_test", "SequenceName": "stc_test"},
        # an identifier's value is never a coincidence
        {"PatientID": "MRN778899", "SoftwareVersions": "MRN778899"},
        {"AccessionNumber": "ACC4455", "SequenceName": "ACC4455"},
        # an institution in an attribute that explains nothing
        {"InstitutionName": "St Elsewhere", "ImageComments": "St Elsewhere"},
    ],
)
def test_a_planted_identifier_is_still_refused(
    source: Path, tmp_path: Path, values: dict[str, str]
) -> None:
    path = rewritten(source, tmp_path, **values)
    findings, _, data, _ = released(path)
    planted = next(v for k, v in values.items() if k not in ("PatientName", "PatientID"))
    # either verification refuses the file or the value was cleaned out of it
    assert findings or not holds(planted.split()[0], data)


def test_a_planted_name_is_refused_when_kept_device_text_holds_it(
    source: Path, tmp_path: Path
) -> None:
    findings, excused, _, _ = released(
        rewritten(source, tmp_path, PatientName="Doe^Jane", ManufacturerModelName="Jane Doe")
    )
    assert [f.location for f in findings] == ["ManufacturerModelName"] * 2 and not excused


def test_identifying_values_in_free_text_are_cleaned_not_refused(
    source: Path, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(source)
    ds.PatientName = "Doe^Jane"
    ds.InstitutionName = "St Elsewhere Hospital"
    item = Dataset()
    item.TextValue = "Scanned at St Elsewhere Hospital for Jane Doe on the same day"
    ds.ContentSequence = [item]
    path = tmp_path / "sr.dcm"
    ds.save_as(path)
    findings, _, data, _ = released(path)
    assert findings == []
    text = pydicom.dcmread(io.BytesIO(data)).ContentSequence[0].TextValue
    assert "Elsewhere" not in text and "Jane" not in text and "same day" in text


def test_generic_short_numbers_are_counted_not_searched(source: Path, tmp_path: Path) -> None:
    """StudyID 160 equal to an InstanceNumber 160 is no leak; that it went unsearched is audited."""
    findings, _, _, unsearched = released(
        rewritten(source, tmp_path, StudyID="160", InstanceNumber=160)
    )
    assert findings == [] and unsearched >= 1


def test_a_placeholder_uid_is_counted_not_searched(source: Path, tmp_path: Path) -> None:
    """A ReferencedSOPInstanceUID "0" (a test object's placeholder) matched a digit of every
    object key; UIDs under eight characters are counted, not searched."""
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    item.ReferencedSOPInstanceUID = "0"
    path = rewritten(source, tmp_path, ReferencedImageSequence=[item])
    result, data = run(path, ProfileOptions(shift_dates=True))
    assert (
        verify(data, result.identifiers, "anon/0c0ffee0-1234/x0/2.25.10/2.25.20/2.25.30.dcm") == []
    )
    assert result.identifiers.short_values >= 1
