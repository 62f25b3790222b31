"""The one rule for patients without a usable PatientID (shared.subjects) and BIDS labels."""

from __future__ import annotations

import pytest

from services.exporter.bids.entities import subject_label
from shared.subjects import catalog_subject_id, missing_patient_id, subject_id_basis


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "PatientID empty or absent"),
        (None, "PatientID empty or absent"),
        ("***", "PatientID has no letters or digits"),
        (" Anonymous ", "PatientID is a placeholder"),
        ("MRN-0042", None),
        ("0", None),
    ],
)
def test_missing_patient_id(value: str | None, reason: str | None) -> None:
    assert missing_patient_id(value) == reason


def test_catalog_subject_id_keeps_a_real_id_and_derives_one_per_study() -> None:
    assert catalog_subject_id(" P1 ", "1.2.3") == "P1"
    a, b = catalog_subject_id("", "1.2.3"), catalog_subject_id("***", "1.2.4")
    assert a != b and a == catalog_subject_id("ANONYMOUS", "1.2.3")
    assert a.startswith("nopid") and a.isalnum() and len(a) == 15
    assert subject_id_basis(a).startswith("StudyInstanceUID")
    assert subject_id_basis("P1") == "PatientID"


@pytest.mark.parametrize(
    ("subject_id", "label"),
    [
        ("sub-01", "01"),
        ("sub_01", "01"),
        ("SUB01", "01"),
        ("sub", "sub"),
        ("Subaru7", "Subaru7"),
        ("k4x2abcd", "k4x2abcd"),
        ("P-00 42", "P0042"),
    ],
)
def test_subject_label_never_doubles_the_sub_prefix(subject_id: str, label: str) -> None:
    assert subject_label(subject_id) == label
