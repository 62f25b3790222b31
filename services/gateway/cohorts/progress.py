"""Job progress, cohort status and completion percentage, from job states alone.

A cohort is `in_progress` while any of its jobs is pending or running, `completed` when every stage
that applies to it is completed, `idle` otherwise (never run, or stopped by a failure or a cancel).
Its completion percentage counts the applicable stages done plus the running stage's own progress.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from services.gateway.cohorts.stage_order import ACTIVE_STATES, StageState, applicable_stages
from shared.topics import Stage


class CohortStatus(StrEnum):
    idle = "idle"
    in_progress = "in_progress"
    completed = "completed"


@dataclass(frozen=True)
class StageSnapshot:
    """A stage's state (its latest whole-cohort job) and that job's progress, 0-100."""

    state: StageState = StageState.not_started
    progress: float = 0.0


@dataclass(frozen=True)
class CohortProgress:
    status: CohortStatus
    completion_percentage: float


MAX_ERRORS_KEPT = 200


def merge_job_errors(
    kept: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]]
) -> list[dict[str, str]]:
    """A job's errors so far plus new ones (`{item, message}`), without repeats, the most recent
    `MAX_ERRORS_KEPT` (progress events resend their latest errors)."""
    merged: dict[tuple[str, str], dict[str, str]] = {}
    for error in [*kept, *new]:
        item, message = str(error.get("item", "")), str(error.get("message", ""))
        merged.pop((item, message), None)
        merged[(item, message)] = {"item": item, "message": message}
    return list(merged.values())[-MAX_ERRORS_KEPT:]


def job_progress(items_total: int, items_done: int, items_failed: int) -> float:
    """Percentage of a job's items handled (done or failed), 0-100, one decimal."""
    if items_total <= 0:
        return 0.0
    handled = min(items_done + items_failed, items_total)
    return round(100.0 * handled / items_total, 1)


def cohort_progress(
    anonymization_enabled: bool,
    stages: Mapping[Stage, StageSnapshot],
    other_active_jobs: Iterable[StageState] = (),
) -> CohortProgress:
    """Status and completion of a cohort.

    `stages` holds each stage's latest whole-cohort job; `other_active_jobs` the states of scoped
    ("new study") jobs, which make the cohort busy without changing its stage states.
    """
    applicable = applicable_stages(anonymization_enabled)
    done = 0.0
    busy = any(state in ACTIVE_STATES for state in other_active_jobs)
    for stage in applicable:
        snapshot = stages.get(stage, StageSnapshot())
        if snapshot.state is StageState.completed:
            done += 1.0
        elif snapshot.state is StageState.running:
            done += max(0.0, min(snapshot.progress, 100.0)) / 100.0
        busy = busy or snapshot.state in ACTIVE_STATES
    all_done = all(stages.get(s, StageSnapshot()).state is StageState.completed for s in applicable)
    percentage = round(100.0 * done / len(applicable), 1)
    if busy:
        # a re-run of one stage keeps the others done; never show 100 while work remains
        return CohortProgress(CohortStatus.in_progress, min(percentage, 99.9))
    if all_done:
        return CohortProgress(CohortStatus.completed, 100.0)
    return CohortProgress(CohortStatus.idle, percentage)
