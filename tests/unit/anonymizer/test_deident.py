"""De-identification of real scanner files: nothing identifying survives, markers are written."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset

from services.anonymizer.profile import (
    CATEGORIES,
    IdentifierSet,
    ProfileOptions,
    date_offset_days,
    new_uid,
    verify,
)
from services.anonymizer.profile.uids import is_well_known

from .conftest import SECRET, dicom_files, run

# independent of the table: attributes whose values name or locate a person, place or device
IDENTIFYING = [
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "DeviceSerialNumber",
    "AccessionNumber",
    "StudyID",
    "RequestedProcedureID",
    "AdmissionID",
    "PerformedProcedureStepID",
]


PLACEHOLDERS = {"REMOVED", "ANONYMIZED", "ANONYMOUS", "UNKNOWN"}


def brute_force_terms(ds: Dataset) -> tuple[set[bytes], set[bytes]]:
    """Every identifying string (whole, >= 3 chars, and name parts) and every non-standard UID."""
    values: set[bytes] = set()
    uids: set[bytes] = set()
    classes: set[bytes] = set()
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.value:
            for v in elem.value if elem.VM > 1 else [elem.value]:
                if (elem.keyword or "").endswith("ClassUID"):
                    classes.add(str(v).encode())
                elif not is_well_known(str(v)):
                    uids.add(str(v).encode())
        if elem.keyword in IDENTIFYING and elem.value:
            text = str(elem.value)
            # whole values; names also by component (institution words like RESEARCH are not)
            parts = text.replace("^", " ").split() if elem.VR == "PN" else []
            for part in [text, *parts]:
                # placeholders written by an earlier de-identifier name nobody
                if len(part.strip()) >= 3 and part.strip().upper() not in PLACEHOLDERS:
                    values.add(part.strip().encode("latin-1"))
    return values, uids - classes


def leaks(terms: Iterable[bytes], data: bytes, *, uids: bool = False) -> set[bytes]:
    """Which `terms` the raw file bytes (pixel data included) still hold, in one pass: values as
    whole tokens, case-insensitive; UIDs exactly, not as part of a longer UID. (One scan of a
    mosaic's megabytes per file, not one per term: the search is most of these tests' time.)"""
    wanted = sorted(set(terms), key=len, reverse=True)
    if not wanted:
        return set()
    either = b"|".join(re.escape(t) for t in wanted)
    if uids:
        return set(re.findall(rb"(?<![0-9.])(?:" + either + rb")(?![0-9.])", data))
    pattern = rb"(?<![A-Za-z0-9])(?:" + either + rb")(?![A-Za-z0-9])"
    return set(re.findall(pattern, data, re.IGNORECASE))


def leaked(term: bytes, data: bytes) -> bool:
    return bool(leaks([term], data))


def uid_leaked(uid: bytes, data: bytes) -> bool:
    return bool(leaks([uid], data, uids=True))


def test_nothing_identifying_survives_in_the_ge_deident_series(deident_files: list[Path]) -> None:
    assert len(deident_files) > 100
    for i, path in enumerate(deident_files):
        result, data = run(path)
        assert verify(data, result.identifiers, "anon/c1/subTEST01/x.dcm") == []
        if i % 4:
            continue  # the independent raw-byte search on every fourth file keeps the test quick
        original = pydicom.dcmread(path)
        values, uids = brute_force_terms(original)
        assert values and uids
        assert not leaks(values, data), f"{path.name}: an identifying value survived"
        assert not leaks(uids, data, uids=True), f"{path.name}: an original UID survived"
        assert original.StudyDate.encode() not in data


def test_markers_written(deident_files: list[Path]) -> None:
    _, data = run(deident_files[0])
    out = pydicom.dcmread(io.BytesIO(data))
    assert out.PatientIdentityRemoved == "YES"
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    # the input was defaced upstream (mri_reface declared 113102): pixels untouched, claim kept
    assert codes == ["113100", "113102", "113105", "113107", "113111"]
    assert any("PS3.15 2025b" in v for v in out.DeidentificationMethod)
    assert out.DeidentificationMethod[-1].startswith("Earlier: mri_reface")
    assert out.PatientID == "subTEST01"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert (
        out.file_meta.TransferSyntaxUID
        == pydicom.dcmread(deident_files[0]).file_meta.TransferSyntaxUID
    )


def test_dates_shift_by_the_subject_offset(deident_files: list[Path]) -> None:
    original = pydicom.dcmread(deident_files[0])
    _, data = run(deident_files[0])
    out = pydicom.dcmread(io.BytesIO(data))
    offset = date_offset_days(SECRET, "subTEST01")
    from datetime import date, timedelta

    o = original.StudyDate
    expected = date(int(o[:4]), int(o[4:6]), int(o[6:8])) + timedelta(days=offset)
    assert out.StudyDate == expected.strftime("%Y%m%d")
    assert out.StudyTime == original.StudyTime  # whole days: times never move
    assert out.SeriesDate == out.StudyDate if original.SeriesDate == o else True


def test_same_patient_same_uids_and_offset_across_runs(deident_files: list[Path]) -> None:
    first, _ = run(deident_files[3])
    second, _ = run(deident_files[3])
    a, b = first.dataset, second.dataset
    assert a.StudyInstanceUID == b.StudyInstanceUID and a.SOPInstanceUID == b.SOPInstanceUID
    assert a.StudyDate == b.StudyDate and a.PatientID == b.PatientID
    original = pydicom.dcmread(deident_files[3])
    assert a.StudyInstanceUID == new_uid(SECRET, original.StudyInstanceUID)
    assert a.StudyInstanceUID.startswith("2.25.") and len(a.StudyInstanceUID) <= 64
    other, _ = run(deident_files[4])
    assert other.dataset.StudyInstanceUID == a.StudyInstanceUID  # same study, other file
    assert other.dataset.SOPInstanceUID != a.SOPInstanceUID


def test_time_and_date_off_keeps_dates_and_declares_it(deident_files: list[Path]) -> None:
    opts = ProfileOptions(categories=frozenset(CATEGORIES) - {"time_and_date"})
    original = pydicom.dcmread(deident_files[0])
    _, data = run(deident_files[0], opts)
    out = pydicom.dcmread(io.BytesIO(data))
    assert out.StudyDate == original.StudyDate
    codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert "113106" in codes and "113107" not in codes
    assert out.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert out.PatientID != original.PatientID


def test_dates_removed_without_shift(deident_files: list[Path]) -> None:
    _, data = run(deident_files[0], ProfileOptions(shift_dates=False))
    out = pydicom.dcmread(io.BytesIO(data))
    assert out.StudyDate == ""  # Type 2: emptied, not removed
    assert "SeriesDate" not in out  # Type 3: removed
    assert out.LongitudinalTemporalInformationModified == "REMOVED"


def test_patient_category_off_is_not_claimed_as_basic_profile(deident_files: list[Path]) -> None:
    opts = ProfileOptions(categories=frozenset(CATEGORIES) - {"patient"}, shift_dates=True)
    original = pydicom.dcmread(deident_files[0])
    _, data = run(deident_files[0], opts)
    out = pydicom.dcmread(io.BytesIO(data))
    assert out.PatientIdentityRemoved == "NO"
    assert "113100" not in [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert out.PatientName == original.PatientName


def test_private_removed_unless_safe(deident_files: list[Path]) -> None:
    _, data = run(deident_files[0], ProfileOptions(shift_dates=True, retain_safe_private=False))
    out = pydicom.dcmread(io.BytesIO(data))
    assert not [e for e in out if e.tag.is_private]
    _, data = run(deident_files[0])
    kept = pydicom.dcmread(io.BytesIO(data))
    creators = {str(e.value) for e in kept if e.tag.is_private_creator}
    assert creators and creators <= {
        "GEMS_ACQU_01",
        "GEMS_PARM_01",
        "GEMS_RELA_01",
        "GEMS_SERS_01",
        "GEMS_IMAG_01",
    }


@pytest.mark.parametrize(
    "folder",
    [
        "dcm_qa_nih/In/20180918Si/mr_0003",
        "dcm_qa_enh/In/Siemens/XA10",
        "dcm_qa_philips_dwi/In/enh/DICOM",
        "dcm_qa_enh/In/Philips",
        "dcm_qa_fmap/In/Philips/fmap",
        "dcm_qa_fmap/In/GE/2_3db0maps",
        "dcm_qa_pdt2/In/Siemens/VE11",
        "dcm_qa_ct/In/GE",
        "dcm_qa_ts/In",
    ],
)
@pytest.mark.parametrize("shift", [True, False])
def test_other_vendors_verify_clean(dicom_root: Path, folder: str, shift: bool) -> None:
    files = dicom_files(dicom_root / folder)
    assert files
    for path in files[:3]:
        original = pydicom.dcmread(path)
        values, uids = brute_force_terms(original)
        result, data = run(path, ProfileOptions(shift_dates=shift))
        study_date = str(original.get("StudyDate", "") or "")
        if study_date:
            assert not re.search(rb"(?<![0-9.])" + study_date.encode() + rb"(?![0-9]{1,3}\b)", data)
        assert verify(data, result.identifiers) == []
        assert not leaks(uids, data, uids=True), f"{path.name}: an original UID survived"
        assert not leaks(values, data), f"{path.name}: an identifying value survived"


def test_verify_finds_a_planted_identifier(deident_files: list[Path]) -> None:
    result, data = run(deident_files[0])
    out = pydicom.dcmread(io.BytesIO(data))
    original = pydicom.dcmread(deident_files[0])
    out.add_new(0x00091001, "LO", str(original.PatientName).replace("^", " "))
    out.ImageComments = f"see {original.StudyInstanceUID}"
    findings = verify(out, result.identifiers, f"anon/{original.PatientID}/x.dcm")
    kinds = {(f.location, f.kind) for f in findings}
    assert ("ImageComments", "uid") in kinds
    assert ("object key", "value") in kinds
    assert any(f.location.startswith("(0009,1001)") for f in findings)
    assert all(original.PatientID not in f.detail for f in findings)


def test_identifier_set_ignores_short_and_neutral_values() -> None:
    ids = IdentifierSet()
    ids.add_value("M")
    ids.add_value("ANONYMOUS")
    ids.add_value("DOE^JOHN")
    assert ids.values == {"DOE JOHN", "DOE", "JOHN"} and ids.short_values == 1
    matcher = ids.matcher()
    assert matcher.in_text("T1 JOHNSON") == []
    assert matcher.in_text("scan of john") == [("value", "john")]


def test_burned_in_objects_are_quarantined(deident_files: list[Path]) -> None:
    ds = pydicom.dcmread(deident_files[0])
    ds.BurnedInAnnotation = "YES"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    path_free = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    from services.anonymizer.profile import burned_in_risk

    verdict = burned_in_risk(path_free)
    assert verdict is not None and "BurnedInAnnotation" in verdict.reason
    path_free.BurnedInAnnotation = "NO"
    path_free.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    assert burned_in_risk(path_free) is not None
    assert burned_in_risk(pydicom.dcmread(deident_files[0])) is None


def test_descriptors_cleaned_not_removed(dicom_root: Path) -> None:
    path = dicom_files(dicom_root / "dcm_qa_nih/In/20180918Si/mr_0003")[0]
    original = pydicom.dcmread(path)
    assert "FMRIF" in original.StudyDescription and "FMRIF" in original.InstitutionalDepartmentName
    result, data = run(path)
    out = pydicom.dcmread(io.BytesIO(data))
    assert out.SeriesDescription == original.SeriesDescription  # "EPI PE=AP": nothing personal
    assert "FMRIF" not in out.StudyDescription and "QA" in out.StudyDescription
    assert ("StudyDescription", "cleaned") in result.actions
    _, data = run(path, ProfileOptions(shift_dates=True, clean_descriptors=False))
    assert "SeriesDescription" not in pydicom.dcmread(io.BytesIO(data))  # Basic Profile: X


def test_ge_protocol_block_is_cleaned_inside_and_searched(dicom_root: Path) -> None:
    from services.anonymizer.profile.vendor_headers import pack_gzip_block, unpack_gzip_block

    path = dicom_files(dicom_root / "dcm_qa_nih/In/20180918GE/mr_0005")[0]
    original = pydicom.dcmread(path)
    inner = unpack_gzip_block(original[0x0025101B].value)
    assert inner is not None and b"PDGMUID" in inner
    uid = re.search(rb'PDGMUID "([0-9.]+)"', inner)
    assert uid is not None
    result, data = run(path)
    out = pydicom.dcmread(io.BytesIO(data))
    cleaned = unpack_gzip_block(out[0x0025101B].value)
    assert cleaned is not None and b"SLICEORDER" in cleaned  # still readable by dcm2niix
    assert uid.group(1) not in cleaned and len(cleaned) == len(inner)
    assert verify(out, result.identifiers) == []
    planted = cleaned + b'NOTES "' + str(original.PatientName).encode() + b'"\n'
    out[0x0025101B].value = pack_gzip_block(planted)
    assert {f.location for f in verify(out, result.identifiers)} == {"(0025,101B)"}
    assert "PrimaryReceiverSuiteAndHost" not in str(out) and (0x0025, 0x101A) not in out


def test_references_stay_consistent_at_every_depth(dicom_root: Path) -> None:
    """A presentation state's image references (nested two levels down) get the same new UIDs as
    the images themselves."""
    path = dicom_root / "dcm_qa_philips_dwi/In/enh/DICOM/PS_0002"

    def refs(ds: Dataset) -> list[str]:
        kept = (
            "ReferencedSeriesSequence",
            "SoftcopyVOILUTSequence",
            "DisplayedAreaSelectionSequence",
        )
        return [
            str(e.value)
            for keyword in kept
            for item in ds[keyword].value
            for e in item.iterall()
            if e.keyword == "ReferencedSOPInstanceUID"
        ]

    original = pydicom.dcmread(path)
    assert len(refs(original)) > 400
    result, data = run(path)
    out = pydicom.dcmread(io.BytesIO(data))
    assert refs(out) == [new_uid(SECRET, r) for r in refs(original)]
    assert verify(data, result.identifiers) == []


def test_functional_groups_dates_and_uids(dicom_root: Path) -> None:
    path = dicom_files(dicom_root / "dcm_qa_enh/In/Philips")[0]
    original = pydicom.dcmread(path)
    before = [str(e.value) for e in original.iterall() if e.keyword == "FrameAcquisitionDateTime"]
    assert len(before) > 10  # one per frame, inside PerFrameFunctionalGroupsSequence
    _, data = run(path)
    out = pydicom.dcmread(io.BytesIO(data))
    after = [str(e.value) for e in out.iterall() if e.keyword == "FrameAcquisitionDateTime"]
    offset = date_offset_days(SECRET, "subTEST01")
    from services.anonymizer.profile import shift_dt

    assert after == [shift_dt(v, offset) for v in before]
    nested = [e for e in out.iterall() if e.keyword == "ReferencedSOPInstanceUID"]
    assert nested and all(str(e.value).startswith("2.25.") for e in nested)


def test_retain_uids_keeps_and_declares(deident_files: list[Path]) -> None:
    original = pydicom.dcmread(deident_files[0])
    result, data = run(deident_files[0], ProfileOptions(shift_dates=True, retain_uids=True))
    out = pydicom.dcmread(io.BytesIO(data))
    assert out.SOPInstanceUID == original.SOPInstanceUID
    assert "113110" in [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert not result.identifiers.uids and verify(data, result.identifiers) == []


def test_timepoint_label_and_patient_characteristics(deident_files: list[Path]) -> None:
    opts = ProfileOptions(shift_dates=True, retain_patient_characteristics=True)
    ds = pydicom.dcmread(deident_files[0])
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "F"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    from services.anonymizer.profile import AnonymizationContext, anonymize, load_profile

    offset = date_offset_days(SECRET, "subTEST01")
    ctx = AnonymizationContext(load_profile(opts), SECRET, "subTEST01", offset, "M06")
    result = anonymize(pydicom.dcmread(io.BytesIO(buffer.getvalue())), ctx)
    out = result.dataset
    assert out.ClinicalTrialTimePointID == "M06"
    assert out.PatientSex == "F" and out.PatientAge == "044Y"  # 1980-01-01 -> 2024-04-25
    assert not out.PatientBirthDate  # birth date still emptied (Z)
    assert "113108" in [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert len(out.StudyDate) == 8 and out.StudyDate != ds.StudyDate


def test_overlays_and_curves_removed_whole(deident_files: list[Path]) -> None:
    ds = pydicom.dcmread(deident_files[0])
    ds.add_new(0x60000010, "US", 256)  # OverlayRows
    ds.add_new(0x60000011, "US", 256)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60003000, "OW", b"\x01\x00" * 8192)  # OverlayData: text drawn on the image
    ds.add_new(0x50000005, "US", 2)  # a retired curve
    buffer = io.BytesIO()
    ds.save_as(buffer)
    from services.anonymizer.profile import AnonymizationContext, anonymize, load_profile

    ctx = AnonymizationContext(load_profile(ProfileOptions()), SECRET, "subTEST01")
    out = anonymize(pydicom.dcmread(io.BytesIO(buffer.getvalue())), ctx).dataset
    assert not [e for e in out if e.tag.group in (0x6000, 0x5000)]


def test_every_transfer_syntax_round_trips(dicom_root: Path) -> None:
    """Seven transfer syntaxes (implicit, big endian, RLE, JPEG, JPEG-LS, JPEG 2000...): the output keeps the
    input's syntax and its pixel data byte for byte."""
    from services.anonymizer.profile import AnonymizationContext, anonymize_bytes, load_profile

    ctx = AnonymizationContext(
        load_profile(ProfileOptions(shift_dates=True)),
        SECRET,
        "subTEST01",
        date_offset_days(SECRET, "subTEST01"),
    )
    syntaxes = set()
    for path in dicom_files(dicom_root / "dcm_qa_ts/In"):
        original = pydicom.dcmread(path)
        done = anonymize_bytes(path.read_bytes(), ctx, "anon/c1/subTEST01/s/x.dcm")
        assert done.releasable, done.findings
        out = pydicom.dcmread(io.BytesIO(done.data))
        assert out.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert out.PixelData == original.PixelData
        syntaxes.add(str(original.file_meta.TransferSyntaxUID))
    assert len(syntaxes) >= 7


def test_defined_terms_are_not_findings(deident_files: list[Path]) -> None:
    """A department called "Research" must not fail every file whose ContentQualification is the
    defined term RESEARCH."""
    ds = pydicom.dcmread(deident_files[0])
    ds.InstitutionalDepartmentName = "Research"
    ds.ContentQualification = "RESEARCH"
    ds.ImageComments = "acquired for research"
    from services.anonymizer.profile import AnonymizationContext, anonymize, load_profile

    ctx = AnonymizationContext(load_profile(ProfileOptions()), SECRET, "subTEST01")
    result = anonymize(ds, ctx)
    assert "RESEARCH" in result.identifiers.values
    assert result.dataset.ContentQualification == "RESEARCH"
    assert "research" not in str(result.dataset.get("ImageComments", "")).lower()  # cleaned
    assert verify(result.dataset, result.identifiers) == []


def _planted(deident_files: list[Path], charset: str | None, implicit: bool) -> tuple[bytes, Any]:
    result, data = run(deident_files[0])
    out = pydicom.dcmread(io.BytesIO(data))
    original = pydicom.dcmread(deident_files[0])
    if charset:
        out.SpecificCharacterSet = charset
    name = str(original.PatientName).split("^")[0]
    out.add_new(0x00091001, "LO", f"protocol of {name}")
    item = pydicom.Dataset()
    item.add_new(0x00081150, "UI", "1.2.840.10008.5.1.4.1.1.4")
    item.add_new(0x00081155, "UI", [str(original.SOPInstanceUID), "1.2.3"])
    out.add_new(0x00081140, "SQ", [item])
    out.add_new(0x0018A002, "DT", f"{original.StudyDate}101500")
    buffer = io.BytesIO()
    if implicit:
        out.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    out.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), result.identifiers


@pytest.mark.parametrize(
    ("charset", "implicit"), [(None, False), ("ISO_IR 192", False), ("ISO_IR 100", True)]
)
def test_verify_of_written_bytes_finds_planted_values_at_every_depth(
    deident_files: list[Path], charset: str | None, implicit: bool
) -> None:
    """The byte-level search (no value conversion) sees private text, sequence items, multi-valued
    UIDs and a date opening a DT, in explicit and implicit VR and in any single character set."""
    data, identifiers = _planted(deident_files, charset, implicit)
    found = {(f.location, f.kind) for f in verify(data, identifiers)}
    assert ("ReferencedImageSequence[0].ReferencedSOPInstanceUID", "uid") in found
    assert ("ContributionDateTime", "date") in found
    assert any(loc.startswith("(0009,1001)") and kind == "value" for loc, kind in found)


def test_matcher_boundaries() -> None:
    ids = IdentifierSet()
    ids.add_value("DOE^JOHN")
    ids.add_uid("1.2.840.99.7")
    ids.add_date("20200131")
    m = ids.matcher()
    kinds = lambda text: sorted(kind for kind, _ in m.in_text(text))  # noqa: E731
    assert kinds("uid 1.2.840.99.7 here") == ["uid"]
    assert kinds("1.2.840.99.71 and 11.2.840.99.7") == []  # a longer UID is another UID
    assert kinds("20200131") == ["date"]
    assert kinds("202001311015") == ["date"]  # a DT opening with the date
    assert kinds("2020013110") == [] and kinds("1.20200131") == []  # inside longer numbers
    assert kinds("seen by john doe") == ["value", "value"]
    assert kinds("johnson") == []
    assert m.mask("doe 20200131101500") == "XXX XXXXXXXX101500"
