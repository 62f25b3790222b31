"""What the user asked for: categories to scrub, the PS3.15 options, and the patient-ID strategy.

`ProfileOptions.from_config` builds them from the anonymization stage config (its model, with the
defaults and limits of every key, is `shared.stage_config.AnonymizationConfig`); the options then
select, row by row, the action of Table E.1-1 that `load_profile` compiles. The defaults here are
the same as the model's (tests/unit/anonymizer/test_table.py holds them equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from shared.vocabulary import ANONYMIZE_CATEGORIES, PatientIdStrategy

if TYPE_CHECKING:  # a type only: the module would pull object storage into the core
    from shared.stage_config import AnonymizationConfig

CATEGORIES: tuple[str, ...] = ANONYMIZE_CATEGORIES
"""The user's `anonymize_categories`. Each row of the table carries one of these (or `uid`/`other`,
which are always applied: UIDs follow `retain_uids`, the rest is the Basic Profile itself)."""

Strategy = PatientIdStrategy


@dataclass(frozen=True)
class PatientIdOptions:
    """`patient_id`: how the pseudonym is derived.

    - `folder`: from the file's path relative to the source root; `folder_regex` (one capture group)
      is searched in the path component at `folder_depth` (0 = first folder); when it does not match,
      `folder_fallback` is formatted with `{folder}` (that component) — or the file is refused when
      no fallback is given.
    - `hash`: `prefix` + HMAC(secret, PatientID) rendered in base 32 with `hash_bits` (>= 64) bits.
    - `sequential`: `prefix` + a number allocated once per patient and kept in the store.
    - `csv`: a mapping file (`csv_text`, columns `original,pseudonym`); `unmapped` = `error` refuses
      unknown patients, `hash` gives them a hashed pseudonym.
    - `none`: PatientID kept (declared: patient identity is then not removed).
    """

    strategy: Strategy = "hash"
    # none by default: the exporter writes `sub-<pseudonym>`, and a `sub` here made `sub-sub...`
    prefix: str = ""
    hash_bits: int = 80
    digits: int = 4
    folder_regex: str | None = None
    folder_depth: int = 0
    folder_fallback: str | None = None
    csv_text: str | None = None
    unmapped: Literal["error", "hash"] = "error"


@dataclass(frozen=True)
class ProfileOptions:
    """The switches of the de-identification, with PS3.15 option names.

    Defaults are the research defaults Cohortflow ships: every category scrubbed, safe private
    attributes kept (conversion needs them), descriptors cleaned rather than removed (sorting reads
    them), dates removed unless `shift_dates` (113107) is on.
    """

    categories: frozenset[str] = frozenset(CATEGORIES)
    shift_dates: bool = False  # study_dates.enabled: Retain Longitudinal, Modified Dates (113107)
    offset_range_days: tuple[int, int] = (-365, -30)
    clean_descriptors: bool = True  # 113105
    retain_patient_characteristics: bool = False  # 113108
    retain_device_identity: bool = False  # 113109
    retain_institution_identity: bool = False  # 113112
    retain_safe_private: bool = True  # 113111
    retain_uids: bool = False  # 113110
    quarantine_burned_in: bool = True
    # study_dates.timepoint_labels: ClinicalTrialTimePointID = months from the subject's first study
    timepoint_labels: bool = False
    timepoint_step_months: int = 6
    patient_id: PatientIdOptions = field(default_factory=PatientIdOptions)

    def scrubs(self, category: str) -> bool:
        """True when rows of `category` are de-identified (always for `uid` and `other`)."""
        return category not in CATEGORIES or category in self.categories

    def with_(self, **changes: Any) -> ProfileOptions:
        return replace(self, **changes)

    @classmethod
    def from_config(cls, config: AnonymizationConfig) -> ProfileOptions:
        """The options of the user's anonymization config (validated, secrets opened: see
        `shared.stage_config`, where each key's default and limits are declared)."""
        dates, patient = config.study_dates, config.patient_id
        return cls(
            categories=frozenset(config.anonymize_categories),
            shift_dates=dates.enabled,
            offset_range_days=dates.offset_range_days,
            clean_descriptors=config.clean_descriptors,
            retain_patient_characteristics=config.retain_patient_characteristics,
            retain_device_identity=config.retain_device_identity,
            retain_institution_identity=config.retain_institution_identity,
            retain_safe_private=config.retain_safe_private,
            retain_uids=config.retain_uids,
            quarantine_burned_in=config.quarantine_burned_in,
            timepoint_labels=dates.timepoint_labels,
            timepoint_step_months=dates.timepoint_step_months,
            patient_id=PatientIdOptions(
                strategy=patient.strategy,
                prefix=patient.prefix,
                hash_bits=patient.hash_bits,
                digits=patient.digits,
                folder_regex=patient.folder_regex,
                folder_depth=patient.folder_depth,
                folder_fallback=patient.folder_fallback,
                csv_text=patient.csv.get_secret_value() if patient.csv is not None else None,
                unmapped=patient.unmapped,
            ),
        )
