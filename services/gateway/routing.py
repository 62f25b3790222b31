"""Which cohort a "new study" notice belongs to, when the sender does not say.

An explicit cohort (name or id) always wins. Otherwise each cohort's routing rules are tried: a rule
holds when every condition it sets holds (the sender's CloudEvent `source`, the calling and called
AE titles, the study's modalities, description and institution); among the rules that hold the
lowest `priority` wins, and rules of different cohorts tied at that priority make the notice
ambiguous (refused: name the cohort). With no rule holding, the study goes to the one cohort whose
source folder contains its location, else it is refused with what was tried.

Patterns are shell-style globs (`*`, `?`, `[...]`), case-insensitive: no regular expressions, so a
rule cannot make matching slow.
"""

from __future__ import annotations

import fnmatch
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RouteRule(BaseModel):
    """A cohort's routing rule: the conditions a study notice must meet (all that are set)."""

    model_config = ConfigDict(extra="forbid")
    source: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="glob on the sender: the CloudEvent `source`, or `origin.system`",
    )
    calling_ae: list[str] = Field(
        default_factory=list, max_length=50, description="any of these calling AE titles"
    )
    called_ae: list[str] = Field(
        default_factory=list, max_length=50, description="any of these called AE titles"
    )
    modality: list[str] = Field(
        default_factory=list, max_length=50, description="the study holds any of these modalities"
    )
    study_description: str | None = Field(
        default=None, min_length=1, max_length=256, description="glob on the StudyDescription"
    )
    institution: str | None = Field(
        default=None, min_length=1, max_length=256, description="glob on the InstitutionName"
    )
    priority: int = Field(
        default=100, ge=0, le=10000, description="lower wins when rules of several cohorts hold"
    )

    @model_validator(mode="after")
    def _tests_something(self) -> RouteRule:
        if not self.conditions():
            raise ValueError(
                "a rule must set at least one condition: source, calling_ae, called_ae,"
                " modality, study_description or institution"
            )
        return self

    def conditions(self) -> list[str]:
        given = self.model_dump(exclude={"priority"}, exclude_defaults=True)
        return sorted(k for k, v in given.items() if v)

    def needs_header(self) -> bool:
        """Whether the rule tests what only the study's DICOM may tell (when the notice does not)."""
        return bool(self.modality or self.study_description or self.institution)


@dataclass(frozen=True)
class StudyFacts:
    """What is known about a noticed study for routing (from the notice, else one header)."""

    source: str | None = None
    calling_ae: str | None = None
    called_ae: str | None = None
    modalities: frozenset[str] = field(default_factory=frozenset)
    study_description: str | None = None
    institution: str | None = None


def _glob(pattern: str | None, value: str | None) -> bool:
    if pattern is None:
        return True
    return value is not None and fnmatch.fnmatchcase(value.casefold(), pattern.casefold())


def _any_of(wanted: Sequence[str], value: str | None) -> bool:
    if not wanted:
        return True
    return value is not None and value.strip().casefold() in {w.strip().casefold() for w in wanted}


def holds(rule: RouteRule, facts: StudyFacts) -> bool:
    modalities = {m.casefold() for m in facts.modalities}
    return (
        _glob(rule.source, facts.source)
        and _any_of(rule.calling_ae, facts.calling_ae)
        and _any_of(rule.called_ae, facts.called_ae)
        and (not rule.modality or bool(modalities & {m.casefold() for m in rule.modality}))
        and _glob(rule.study_description, facts.study_description)
        and _glob(rule.institution, facts.institution)
    )


@dataclass(frozen=True)
class CohortRule:
    cohort_id: uuid.UUID
    cohort_name: str
    rule: RouteRule


class Ambiguous(ValueError):
    """Rules of several cohorts hold at the same priority."""


def choose(rules: Iterable[CohortRule], facts: StudyFacts) -> uuid.UUID | None:
    """The cohort whose rule holds with the lowest priority; None when no rule holds; `Ambiguous`
    when rules of several cohorts tie."""
    held = [r for r in rules if holds(r.rule, facts)]
    if not held:
        return None
    best = min(r.rule.priority for r in held)
    winners = {r.cohort_id: r.cohort_name for r in held if r.rule.priority == best}
    if len(winners) > 1:
        names = ", ".join(repr(n) for n in sorted(winners.values()))
        raise Ambiguous(
            f"routing rules of {len(winners)} cohorts ({names}) hold at priority {best}:"
            " name the cohort, or give one rule a lower priority"
        )
    return next(iter(winners))
