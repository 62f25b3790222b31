from __future__ import annotations

import pytest

from services.gateway.cohorts.stage_order import (
    StageOrderError,
    StageState,
    applicable_stages,
    check_stage_run,
    remaining_stages,
)
from shared.topics import Stage

A, E, S, X = Stage.anonymization, Stage.extraction, Stage.sorting, Stage.export
C, R, P, F = StageState.completed, StageState.running, StageState.pending, StageState.failed


def test_applicable_stages_follow_the_anonymization_switch() -> None:
    assert applicable_stages(True) == (A, E, S, X)
    assert applicable_stages(False) == (E, S, X)


@pytest.mark.parametrize(
    ("stage", "anon", "states"),
    [
        (E, False, {}),
        (A, True, {}),
        (E, True, {A: C}),
        (S, False, {E: C}),
        (X, False, {E: C, S: C}),
        (S, False, {E: C, S: C, X: C}),  # redo a completed stage
        (S, False, {E: C, S: F}),  # retry a failed stage
    ],
)
def test_allowed_runs(stage: Stage, anon: bool, states: dict[Stage, StageState]) -> None:
    check_stage_run(stage, anon, states)


@pytest.mark.parametrize(
    ("stage", "anon", "states", "reason"),
    [
        (A, False, {}, "anonymization is not enabled"),
        (
            E,
            True,
            {},
            "extraction needs anonymization completed first (anonymization is not_started)",
        ),
        (E, True, {A: F}, "needs anonymization completed first (anonymization is failed)"),
        (S, False, {}, "sorting needs extraction completed"),
        (X, False, {E: C}, "export needs sorting completed"),
        (E, False, {E: R}, "extraction stage is already running"),
        (X, False, {E: C, S: P}, "sorting stage is already pending"),
        (E, False, {E: C, S: R}, "sorting stage is already running"),
    ],
)
def test_refused_runs_say_why(
    stage: Stage, anon: bool, states: dict[Stage, StageState], reason: str
) -> None:
    with pytest.raises(StageOrderError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check_stage_run(stage, anon, states)


@pytest.mark.parametrize(
    ("anon", "states", "expected"),
    [
        (True, {}, (A, E, S, X)),
        (False, {}, (E, S, X)),
        (False, {E: C}, (S, X)),
        (False, {E: C, S: F}, (S, X)),
        (True, {A: C, E: C, S: C}, (X,)),
        (False, {E: C, S: StageState.cancelled, X: C}, (S, X)),
        (True, {E: C, S: C, X: C}, (A, E, S, X)),  # anonymization switched on afterwards
    ],
)
def test_remaining_stages(
    anon: bool, states: dict[Stage, StageState], expected: tuple[Stage, ...]
) -> None:
    assert remaining_stages(anon, states) == expected


def test_remaining_stages_refuses_when_everything_is_done_or_busy() -> None:
    with pytest.raises(StageOrderError, match="already completed"):
        remaining_stages(False, {E: C, S: C, X: C})
    with pytest.raises(StageOrderError, match="already running"):
        remaining_stages(False, {E: R})
