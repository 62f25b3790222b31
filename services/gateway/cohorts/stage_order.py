"""The fixed stage order and what it allows.

Stages run anonymization (only when the cohort enables it) -> extraction -> sorting -> export; each
stage needs the previous applicable one completed. A stage's state is the status of its latest
whole-cohort job (scoped "new study" runs do not change it), or `not_started`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from shared.topics import STAGE_ORDER, Stage


class StageState(StrEnum):
    not_started = "not_started"
    pending = "pending"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


ACTIVE_STATES = frozenset({StageState.pending, StageState.running})


class StageOrderError(Exception):
    """A run that the stage order (or a run already in progress) does not allow; says why."""


def applicable_stages(anonymization_enabled: bool) -> tuple[Stage, ...]:
    """The stages a cohort runs, in order."""
    return tuple(s for s in STAGE_ORDER if anonymization_enabled or s is not Stage.anonymization)


def previous_stage(stage: Stage, anonymization_enabled: bool) -> Stage | None:
    stages = applicable_stages(anonymization_enabled)
    index = stages.index(stage)
    return stages[index - 1] if index > 0 else None


def _state(states: Mapping[Stage, StageState], stage: Stage) -> StageState:
    return states.get(stage, StageState.not_started)


def _refuse_while_active(states: Mapping[Stage, StageState], stages: tuple[Stage, ...]) -> None:
    for stage in stages:
        if _state(states, stage) in ACTIVE_STATES:
            raise StageOrderError(
                f"the {stage.value} stage is already {_state(states, stage).value}; "
                "wait for it to finish or cancel its job"
            )


def check_stage_run(
    stage: Stage, anonymization_enabled: bool, states: Mapping[Stage, StageState]
) -> None:
    """Raise `StageOrderError` unless `stage` may start now on this cohort."""
    if stage is Stage.anonymization and not anonymization_enabled:
        raise StageOrderError(
            "anonymization is not enabled on this cohort (set anonymization_enabled to run it)"
        )
    stages = applicable_stages(anonymization_enabled)
    _refuse_while_active(states, stages)
    before = previous_stage(stage, anonymization_enabled)
    if before is not None and _state(states, before) is not StageState.completed:
        raise StageOrderError(
            f"{stage.value} needs {before.value} completed first "
            f"({before.value} is {_state(states, before).value})"
        )


def remaining_stages(
    anonymization_enabled: bool, states: Mapping[Stage, StageState]
) -> tuple[Stage, ...]:
    """The stages a pipeline run still has to run: from the first one not completed to the end.

    Raises `StageOrderError` when a stage is pending or running, or when every stage is completed.
    """
    stages = applicable_stages(anonymization_enabled)
    _refuse_while_active(states, stages)
    for index, stage in enumerate(stages):
        if _state(states, stage) is not StageState.completed:
            return stages[index:]
    raise StageOrderError(
        "every stage of this cohort is already completed; run a single stage to redo it"
    )
