"""What the user asked for: categories to scrub, the PS3.15 options, and the patient-ID strategy.

`ProfileOptions.from_config` reads the anonymization stage config exactly as the user writes it
(`anonymize_categories`, `study_dates.enabled`, `patient_id.strategy`, plus option switches); the
options then select, row by row, the action of Table E.1-1 that `load_profile` compiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from shared.vocabulary import ANONYMIZE_CATEGORIES, PATIENT_ID_STRATEGIES, PatientIdStrategy

CATEGORIES: tuple[str, ...] = ANONYMIZE_CATEGORIES
"""The user's `anonymize_categories`. Each row of the table carries one of these (or `uid`/`other`,
which are always applied: UIDs follow `retain_uids`, the rest is the Basic Profile itself)."""

Strategy = PatientIdStrategy
STRATEGIES: tuple[str, ...] = PATIENT_ID_STRATEGIES


class ConfigError(ValueError):
    """The anonymization config is invalid; the message names the key and what is accepted."""


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
    def from_config(cls, config: dict[str, Any]) -> ProfileOptions:
        """Read the user's anonymization config (dotted keys are nested objects).

        Accepted keys: `anonymize_categories` (list of `CATEGORIES`), `study_dates.enabled`,
        `study_dates.offset_range_days` ([min, max], non-zero, min <= max),
        `study_dates.timepoint_labels` and `study_dates.timepoint_step_months` (1-24, default 6), `patient_id.strategy`
        and its options (`prefix`, `hash_bits`, `digits`, `folder_regex`, `folder_depth`,
        `folder_fallback`, `csv`, `unmapped`), and the switches `clean_descriptors`,
        `retain_patient_characteristics`, `retain_device_identity`, `retain_institution_identity`,
        `retain_safe_private`, `retain_uids`, `quarantine_burned_in`. Unknown values raise
        `ConfigError`.
        """
        config = _nest_dotted(config)
        opts = cls()
        cats = config.get("anonymize_categories")
        if cats is not None:
            if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
                raise ConfigError("anonymize_categories must be a list of category names")
            unknown = sorted(set(cats) - set(CATEGORIES))
            if unknown:
                raise ConfigError(
                    f"anonymize_categories: unknown {unknown}; accepted: {list(CATEGORIES)}"
                )
            opts = opts.with_(categories=frozenset(cats))
        dates = config.get("study_dates") or {}
        if not isinstance(dates, dict):
            raise ConfigError("study_dates must be an object such as {'enabled': true}")
        if "enabled" in dates:
            opts = opts.with_(shift_dates=bool(dates["enabled"]))
        if "offset_range_days" in dates:
            lo, hi = (int(v) for v in dates["offset_range_days"])
            if lo > hi or (lo == 0 and hi == 0):
                raise ConfigError(
                    "study_dates.offset_range_days must be [min, max] with min <= max"
                )
            opts = opts.with_(offset_range_days=(lo, hi))
        if "timepoint_labels" in dates:
            opts = opts.with_(timepoint_labels=bool(dates["timepoint_labels"]))
        if "timepoint_step_months" in dates:
            step = int(dates["timepoint_step_months"])
            if not 1 <= step <= 24:
                raise ConfigError("study_dates.timepoint_step_months must be between 1 and 24")
            opts = opts.with_(timepoint_step_months=step)
        for switch in (
            "clean_descriptors",
            "retain_patient_characteristics",
            "retain_device_identity",
            "retain_institution_identity",
            "retain_safe_private",
            "retain_uids",
            "quarantine_burned_in",
        ):
            if switch in config:
                opts = opts.with_(**{switch: bool(config[switch])})
        return opts.with_(patient_id=_patient_id_options(config.get("patient_id") or {}))


def _nest_dotted(config: dict[str, Any]) -> dict[str, Any]:
    """Accept `{"study_dates.enabled": true}` as well as `{"study_dates": {"enabled": true}}`."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if "." not in key:
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}
            else:
                out[key] = value
            continue
        head, rest = key.split(".", 1)
        nested = out.setdefault(head, {})
        if not isinstance(nested, dict):
            raise ConfigError(f"{head} must be an object")
        nested.update(_nest_dotted({rest: value}))
    return out


def _patient_id_options(raw: Any) -> PatientIdOptions:
    if not isinstance(raw, dict):
        raise ConfigError("patient_id must be an object such as {'strategy': 'hash'}")
    strategy = raw.get("strategy", "hash")
    if strategy not in STRATEGIES:
        raise ConfigError(f"patient_id.strategy: {strategy!r} is not one of {list(STRATEGIES)}")
    out = PatientIdOptions(strategy=strategy)
    if "prefix" in raw:
        out = replace(out, prefix=str(raw["prefix"]))
    if "hash_bits" in raw:
        bits = int(raw["hash_bits"])
        if bits < 64 or bits > 160:
            raise ConfigError("patient_id.hash_bits must be between 64 and 160")
        out = replace(out, hash_bits=bits)
    if "digits" in raw:
        out = replace(out, digits=int(raw["digits"]))
    if "folder_regex" in raw:
        out = replace(out, folder_regex=str(raw["folder_regex"]))
    if "folder_depth" in raw:
        out = replace(out, folder_depth=int(raw["folder_depth"]))
    if "folder_fallback" in raw:
        out = replace(out, folder_fallback=str(raw["folder_fallback"]))
    if "csv" in raw:
        out = replace(out, csv_text=str(raw["csv"]))
    if "unmapped" in raw:
        if raw["unmapped"] not in ("error", "hash"):
            raise ConfigError("patient_id.unmapped must be 'error' or 'hash'")
        out = replace(out, unmapped=raw["unmapped"])
    if strategy == "csv" and not out.csv_text:
        raise ConfigError("patient_id.strategy 'csv' needs patient_id.csv (the mapping file text)")
    return out
