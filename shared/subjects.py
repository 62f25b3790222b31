"""Who a study belongs to when its PatientID names nobody: one rule for every service.

Research exports, QA scans and data de-identified elsewhere often carry no PatientID, an empty one,
punctuation (`***`) or a placeholder (`ANONYMOUS`). Such a value cannot stand for a patient: two
different people share it, so keying a subject by it would merge them. The rule, used by the
anonymizer (pseudonyms) and the catalog (subject ids, hence BIDS `sub-` labels):

- a usable PatientID is the subject (qualified by its issuer where one is given);
- otherwise the study stands for the patient: no study belongs to two patients, so two unnamed
  patients never merge, and the same study gets the same subject in every run. The price is that
  two studies of one unnamed patient become two subjects; the `folder` pseudonym strategy is the
  way to say that a folder is one patient.
"""

from __future__ import annotations

import base64
import hashlib

# PatientIDs that name nobody (compared upper-cased, white space folded)
PLACEHOLDER_IDS = frozenset(
    {
        "ANONYMOUS",
        "ANONYMIZED",
        "ANONYMISED",
        "ANON",
        "UNKNOWN",
        "NONE",
        "NULL",
        "N/A",
        "NA",
        "REMOVED",
        "PATIENT",
        "NOID",
        "NO ID",
        "DEIDENTIFIED",
        "DE-IDENTIFIED",
    }
)

# catalog subject ids derived from a study start with this (letters only: a valid BIDS label)
UNNAMED_PREFIX = "nopid"


def missing_patient_id(patient_id: str | None) -> str | None:
    """Why `patient_id` cannot stand for a patient, or None when it can."""
    text = (patient_id or "").strip()
    if not text:
        return "PatientID empty or absent"
    if not any(ch.isalnum() for ch in text):
        return "PatientID has no letters or digits"
    if " ".join(text.upper().split()) in PLACEHOLDER_IDS:
        return "PatientID is a placeholder"
    return None


def catalog_subject_id(patient_id: str | None, study_instance_uid: str) -> str:
    """The catalog's subject id of a file: its PatientID, or, when that names nobody,
    `nopid` + 50 bits of SHA-256 of the StudyInstanceUID (base 32, lower case)."""
    if missing_patient_id(patient_id) is None:
        return (patient_id or "").strip()
    digest = hashlib.sha256(f"study:{study_instance_uid.strip()}".encode()).digest()
    return UNNAMED_PREFIX + base64.b32encode(digest).decode().lower()[:10]


def subject_id_basis(subject_id: str) -> str:
    """Where a catalog subject id came from, in words (participants.tsv records it)."""
    derived = (
        subject_id.startswith(UNNAMED_PREFIX)
        and len(subject_id) == len(UNNAMED_PREFIX) + 10
        and subject_id[len(UNNAMED_PREFIX) :].isalnum()
    )
    return "StudyInstanceUID (no usable PatientID)" if derived else "PatientID"
