"""The PS3.15 table as data and the options that select its columns."""

from __future__ import annotations

from typing import Any

import pytest

from services.anonymizer.profile import CATEGORIES, ProfileOptions, load_profile
from services.anonymizer.profile.table import table_edition, table_rows
from shared.settings import Settings
from shared.stage_config import AnonymizationConfig, StageConfigError, read_stage_config

ACTIONS = {"X", "Z", "D", "K", "C", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"}


def test_table_is_the_whole_standard_table() -> None:
    rows = table_rows()
    assert table_edition() == "2025b"
    assert len(rows) >= 600
    assert {r["basic"] for r in rows} <= ACTIONS
    cats = {r["category"] for r in rows}
    assert cats <= set(CATEGORIES) | {"uid", "other"}
    assert len({r["tag"] for r in rows}) == len(rows)


@pytest.mark.parametrize(
    ("keyword", "options", "action"),
    [
        ("PatientName", {}, "Z"),
        ("AccessionNumber", {}, "Z"),
        ("InstitutionName", {}, "X"),  # X/Z/D, Type 3
        ("DeviceSerialNumber", {}, "D"),  # X/Z/D, Type 1 in Enhanced General Equipment
        ("ContentDate", {}, "D"),  # Z/D, Type 1 in multi-frame objects
        ("StudyDate", {}, "Z"),
        ("StudyDate", {"shift_dates": True}, "C"),
        ("StudyDate", {"categories": frozenset(CATEGORIES) - {"time_and_date"}}, "K"),
        ("StudyInstanceUID", {}, "U"),
        ("StudyInstanceUID", {"retain_uids": True}, "K"),
        ("SeriesDescription", {}, "C"),
        ("SeriesDescription", {"clean_descriptors": False}, "X"),
        ("StationName", {"retain_device_identity": True}, "K"),
        ("PatientSex", {"retain_patient_characteristics": True}, "K"),
        ("InstitutionName", {"retain_institution_identity": True}, "K"),
    ],
)
def test_rows_follow_options(keyword: str, options: dict[str, object], action: str) -> None:
    profile = load_profile(ProfileOptions(**options))  # type: ignore[arg-type]
    rule = next(r for r in profile.rules.values() if r.keyword == keyword)
    assert rule.action == action


def test_codes_declare_what_is_applied() -> None:
    assert load_profile(ProfileOptions(shift_dates=True)).codes == (
        "113100",
        "113105",
        "113107",
        "113111",
    )
    no_dates = ProfileOptions(categories=frozenset(CATEGORIES) - {"time_and_date"})
    assert "113106" in load_profile(no_dates).codes and "113100" in load_profile(no_dates).codes
    no_patient = ProfileOptions(categories=frozenset(CATEGORIES) - {"patient"})
    assert "113100" not in load_profile(no_patient).codes


def options_of(raw: dict[str, Any]) -> ProfileOptions:
    """The options a service builds from the config it received (secrets withheld: no password)."""
    return ProfileOptions.from_config(
        read_stage_config(AnonymizationConfig, raw, Settings(), secrets_withheld=True)
    )


def test_from_config_reads_the_user_keys() -> None:
    opts = options_of(
        {
            "anonymize_categories": ["patient", "time_and_date", "private"],
            "study_dates": {"enabled": True, "offset_range_days": [-100, -10]},
            "patient_id": {"strategy": "sequential", "prefix": "S", "digits": 3},
            "retain_uids": True,
        }
    )
    assert opts.categories == {"patient", "time_and_date", "private"}
    assert opts.shift_dates and opts.offset_range_days == (-100, -10)
    assert opts.patient_id.strategy == "sequential" and opts.patient_id.digits == 3
    assert opts.retain_uids
    with pytest.raises(StageConfigError):
        options_of({"anonymize_categories": ["everything"]})
    with pytest.raises(StageConfigError):
        options_of({"patient_id": {"strategy": "guess"}})
    with pytest.raises(StageConfigError):
        options_of({"patient_id": {"strategy": "hash", "hash_bits": 32}})


def test_the_model_defaults_are_the_core_defaults() -> None:
    assert options_of({}) == ProfileOptions()


def test_from_config_accepts_dotted_keys() -> None:
    opts = options_of(
        {"study_dates.enabled": True, "patient_id.strategy": "folder", "patient_id": {"prefix": ""}}
    )
    assert (
        opts.shift_dates and opts.patient_id.strategy == "folder" and opts.patient_id.prefix == ""
    )


def test_timepoint_label_options() -> None:
    opts = options_of(
        {"study_dates": {"enabled": True, "timepoint_labels": True, "timepoint_step_months": 3}}
    )
    assert (opts.shift_dates, opts.timepoint_labels, opts.timepoint_step_months) == (True, True, 3)
    assert not options_of({}).timepoint_labels
    with pytest.raises(StageConfigError, match="timepoint_step_months"):
        options_of({"study_dates.timepoint_step_months": 0})


@pytest.mark.parametrize("options", [ProfileOptions(), ProfileOptions(shift_dates=True)])
def test_collected_first_are_the_identifying_rules_not_kept(options: ProfileOptions) -> None:
    """What the walk gathers before it starts: worked out once per profile, in the table's order."""
    profile = load_profile(options)
    expected = [t for t, r in profile.rules.items() if r.identifying and r.action != "K"]
    assert list(profile.collected_first) == expected
    assert 0x00100010 in profile.collected_first  # PatientName
    assert profile.collected_first is profile.collected_first  # computed once
