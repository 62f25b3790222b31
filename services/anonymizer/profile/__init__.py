"""The de-identification core: DICOM PS3.15 Annex E as data, applied without any I/O.

`load_profile(options)` compiles Table E.1-1; `anonymize(ds, ctx)` de-identifies one dataset;
`verify(output, identifiers)` searches the written output for anything the input identified.
"""

from services.anonymizer.profile.dates import (
    age_string,
    date_offset_days,
    shift_da,
    shift_dt,
    timepoint_label,
)
from services.anonymizer.profile.engine import (
    AnonymizationContext,
    AnonymizationResult,
    DeidentifiedFile,
    anonymize,
    anonymize_bytes,
)
from services.anonymizer.profile.identifiers import IdentifierSet
from services.anonymizer.profile.options import (
    CATEGORIES,
    PatientIdOptions,
    ProfileOptions,
)
from services.anonymizer.profile.pseudonyms import (
    MemoryPseudonymStore,
    PatientIdentity,
    PseudonymCollision,
    PseudonymError,
    PseudonymStore,
    identity_of,
    pseudonymize_patient_id,
    read_mapping,
    subject_key,
)
from services.anonymizer.profile.quarantine import Quarantine, burned_in_risk
from services.anonymizer.profile.table import Profile, Rule, load_profile
from services.anonymizer.profile.uids import new_uid
from services.anonymizer.profile.verify import Finding, verify
from services.anonymizer.profile.writer import WrittenFile, dicom_bytes, write_file

__all__ = [
    "CATEGORIES",
    "AnonymizationContext",
    "AnonymizationResult",
    "DeidentifiedFile",
    "Finding",
    "IdentifierSet",
    "MemoryPseudonymStore",
    "PatientIdOptions",
    "PatientIdentity",
    "Profile",
    "ProfileOptions",
    "PseudonymCollision",
    "PseudonymError",
    "PseudonymStore",
    "Quarantine",
    "Rule",
    "WrittenFile",
    "age_string",
    "anonymize",
    "anonymize_bytes",
    "burned_in_risk",
    "date_offset_days",
    "dicom_bytes",
    "identity_of",
    "load_profile",
    "new_uid",
    "pseudonymize_patient_id",
    "read_mapping",
    "shift_da",
    "shift_dt",
    "subject_key",
    "timepoint_label",
    "verify",
    "write_file",
]
