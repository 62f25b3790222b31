"""Anonymization is one-way for a cohort (docs/adr-0017-sources.md): the PATCH rule, on its own."""

from __future__ import annotations

import pytest

from services.gateway.api.cohorts import _check_anonymization_change
from services.gateway.errors import Conflict
from shared.topics import Stage


def test_turning_it_off_after_any_anonymization_job_is_a_conflict() -> None:
    with pytest.raises(Conflict, match=r"cannot be turned off.*new cohort"):
        _check_anonymization_change(True, {Stage.anonymization})
    with pytest.raises(Conflict, match="cannot be turned off"):
        _check_anonymization_change(True, {Stage.anonymization, Stage.extraction})


def test_turning_it_on_after_an_identified_extraction_is_a_conflict() -> None:
    with pytest.raises(Conflict, match=r"cannot be turned on.*new cohort"):
        _check_anonymization_change(False, {Stage.extraction})


def test_before_any_run_either_way_is_allowed() -> None:
    _check_anonymization_change(True, set())
    _check_anonymization_change(False, set())
    _check_anonymization_change(True, {Stage.extraction})  # never anonymized: nothing to keep
