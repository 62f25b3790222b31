from __future__ import annotations

import pytest

from services.gateway.cohorts.progress import (
    MAX_ERRORS_KEPT,
    CohortStatus,
    StageSnapshot,
    cohort_progress,
    job_progress,
    merge_job_errors,
)
from services.gateway.cohorts.stage_order import StageState
from shared.topics import Stage

A, E, S, X = Stage.anonymization, Stage.extraction, Stage.sorting, Stage.export
C, R, P, F = StageState.completed, StageState.running, StageState.pending, StageState.failed


@pytest.mark.parametrize(
    ("total", "done", "failed", "expected"),
    [(0, 0, 0, 0.0), (10, 5, 0, 50.0), (10, 4, 1, 50.0), (3, 1, 0, 33.3), (4, 9, 0, 100.0)],
)
def test_job_progress(total: int, done: int, failed: int, expected: float) -> None:
    assert job_progress(total, done, failed) == expected


@pytest.mark.parametrize(
    ("anon", "stages", "status", "percentage"),
    [
        (False, {}, CohortStatus.idle, 0.0),
        (False, {E: StageSnapshot(P)}, CohortStatus.in_progress, 0.0),
        (False, {E: StageSnapshot(R, 50)}, CohortStatus.in_progress, 16.7),
        (
            False,
            {E: StageSnapshot(C, 100), S: StageSnapshot(R, 50)},
            CohortStatus.in_progress,
            50.0,
        ),
        (True, {A: StageSnapshot(C), E: StageSnapshot(C)}, CohortStatus.idle, 50.0),
        (False, {E: StageSnapshot(C), S: StageSnapshot(F, 30)}, CohortStatus.idle, 33.3),
        (
            False,
            {E: StageSnapshot(C), S: StageSnapshot(C), X: StageSnapshot(C)},
            CohortStatus.completed,
            100.0,
        ),
        # anonymization switched on after a run without it: not complete any more
        (
            True,
            {E: StageSnapshot(C), S: StageSnapshot(C), X: StageSnapshot(C)},
            CohortStatus.idle,
            75.0,
        ),
        # the last stage re-running at 100 % is still work in progress
        (
            False,
            {E: StageSnapshot(C), S: StageSnapshot(C), X: StageSnapshot(R, 100)},
            CohortStatus.in_progress,
            99.9,
        ),
    ],
)
def test_cohort_progress(
    anon: bool, stages: dict[Stage, StageSnapshot], status: CohortStatus, percentage: float
) -> None:
    result = cohort_progress(anon, stages)
    assert (result.status, result.completion_percentage) == (status, percentage)


def test_a_scoped_run_makes_a_completed_cohort_busy() -> None:
    done = {E: StageSnapshot(C), S: StageSnapshot(C), X: StageSnapshot(C)}
    assert cohort_progress(False, done).status is CohortStatus.completed
    assert cohort_progress(False, done, [R]).status is CohortStatus.in_progress
    assert cohort_progress(False, done, [StageState.cancelled]).status is CohortStatus.completed


def test_job_errors_are_merged_without_repeats_and_bounded() -> None:
    kept = [{"item": "a", "message": "bad"}, {"item": "b", "message": "worse"}]
    new = [{"item": "a", "message": "bad"}, {"item": "c", "message": "new"}]
    assert merge_job_errors(kept, new) == [
        {"item": "b", "message": "worse"},
        {"item": "a", "message": "bad"},
        {"item": "c", "message": "new"},
    ]
    many = [{"item": str(i), "message": "x"} for i in range(MAX_ERRORS_KEPT + 50)]
    merged = merge_job_errors([], many)
    assert len(merged) == MAX_ERRORS_KEPT and merged[-1]["item"] == str(MAX_ERRORS_KEPT + 49)
