"""The audit export: encrypted, opens with the right password only, lists keywords not values."""

from __future__ import annotations

import io
from pathlib import Path

import openpyxl
import pytest

from services.anonymizer.audit import (
    AuditPasswordError,
    AuditRow,
    SubjectRow,
    audit_row,
    decrypt_audit,
    write_audit,
)

from .conftest import run

PASSWORD = "correct horse battery"
Rows = tuple[list[SubjectRow], list[AuditRow], str]


@pytest.fixture
def rows(deident_files: list[Path]) -> Rows:
    result, _ = run(deident_files[0])
    files = [audit_row(result, "anon/c1/subTEST01/a.dcm")]
    subjects = [SubjectRow(result.original_patient_id, "subTEST01", -42)]
    return subjects, files, result.original_patient_id


def test_csv_audit_roundtrip_and_wrong_password(rows: Rows) -> None:
    subjects, files, original = rows
    data = write_audit(subjects, files, "csv", PASSWORD)
    assert original.encode() not in data
    plain = decrypt_audit(data, PASSWORD).decode()
    assert f"{original},subTEST01,-42" in plain
    assert "PatientName" in plain and "InstitutionName" in plain  # keywords of what was done
    with pytest.raises(AuditPasswordError):
        decrypt_audit(data, "wrong password!")


def test_excel_audit_opens_with_the_password(rows: Rows) -> None:
    subjects, files, original = rows
    data = write_audit(subjects, files, "encrypted_excel", PASSWORD)
    assert data.startswith(b"\xd0\xcf\x11\xe0")  # an encrypted OOXML package (OLE container)
    book = openpyxl.load_workbook(io.BytesIO(decrypt_audit(data, PASSWORD)))
    assert book["subjects"]["A2"].value == original
    assert book["files"]["A2"].value == "subTEST01"
    with pytest.raises(AuditPasswordError):
        decrypt_audit(data, "wrong password!")


def test_password_is_required(rows: Rows) -> None:
    subjects, files, _ = rows
    with pytest.raises(AuditPasswordError):
        write_audit(subjects, files, "csv", "")
    with pytest.raises(ValueError):
        write_audit(subjects, files, "pdf", PASSWORD)
