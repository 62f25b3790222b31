"""Routing rules for study notices that name no cohort: conditions, priority, ties, globs."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from services.gateway.routing import Ambiguous, CohortRule, RouteRule, StudyFacts, choose, holds

MR = StudyFacts(
    source="/hospital/orthanc-1",
    calling_ae="MRI3T",
    called_ae="CF",
    modalities=frozenset({"MR", "SR"}),
    study_description="Brain MRI with contrast",
    institution="St. Elsewhere",
)


def rule(**conditions: object) -> RouteRule:
    return RouteRule.model_validate(conditions)


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({"source": "/hospital/*"}, True),
        ({"source": "/other/*"}, False),
        ({"calling_ae": ["ct1", "mri3t"]}, True),  # AE titles ignore case
        ({"called_ae": ["PACS"]}, False),
        ({"modality": ["mr"]}, True),
        ({"modality": ["CT", "PT"]}, False),
        ({"study_description": "*brain*"}, True),
        ({"study_description": "knee*"}, False),
        ({"institution": "st. elsewhere"}, True),
        ({"source": "/hospital/*", "modality": ["CT"]}, False),  # every condition must hold
    ],
)
def test_a_rule_holds_when_all_its_conditions_do(conditions: dict, expected: bool) -> None:
    assert holds(rule(**conditions), MR) is expected


def test_unknown_facts_do_not_match() -> None:
    assert not holds(rule(institution="*"), StudyFacts())
    assert holds(rule(institution="*"), StudyFacts(institution=""))


def test_a_rule_must_test_something_and_knows_no_other_keys() -> None:
    with pytest.raises(ValidationError, match="at least one condition"):
        rule(priority=3)
    with pytest.raises(ValidationError):
        rule(source="*", regex=".*")


def test_lowest_priority_wins_and_ties_are_refused() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    rules = [
        CohortRule(a, "memory", rule(modality=["MR"], priority=50)),
        CohortRule(b, "oncology", rule(source="/hospital/*")),
    ]
    assert choose(rules, MR) == a
    assert choose(rules, StudyFacts(source="/hospital/x")) == b
    assert choose(rules, StudyFacts(source="/elsewhere")) is None
    tie = [*rules, CohortRule(b, "oncology", rule(calling_ae=["MRI3T"], priority=50))]
    with pytest.raises(Ambiguous, match="'memory', 'oncology'"):
        choose(tie, MR)
    same_cohort = [*rules, CohortRule(a, "memory", rule(calling_ae=["MRI3T"], priority=50))]
    assert choose(same_cohort, MR) == a
