"""The one place that knows topic names.

Stages run in a fixed order; anonymization is optional. A stage service consumes its `requested`
topic (a run was asked for) and its `items` topic (the run's work items, keyed so that one study
stays on one partition), and emits `completed` or `failed` when the run's last item is done.
"""

from __future__ import annotations

from enum import StrEnum

PREFIX = "cohortflow"


class Stage(StrEnum):
    anonymization = "anonymization"
    extraction = "extraction"
    sorting = "sorting"
    export = "export"


# fixed order of the pipeline (docs/architecture.md, "Stages")
STAGE_ORDER: tuple[Stage, ...] = (
    Stage.anonymization,
    Stage.extraction,
    Stage.sorting,
    Stage.export,
)

# the service that runs each stage
STAGE_SERVICE: dict[Stage, str] = {
    Stage.anonymization: "anonymizer",
    Stage.extraction: "extractor",
    Stage.sorting: "sorter",
    Stage.export: "exporter",
}


def requested(stage: Stage | str) -> str:
    return f"{PREFIX}.{Stage(stage).value}.requested"


def items(stage: Stage | str) -> str:
    return f"{PREFIX}.{Stage(stage).value}.items"


def completed(stage: Stage | str) -> str:
    return f"{PREFIX}.{Stage(stage).value}.completed"


def failed(stage: Stage | str) -> str:
    return f"{PREFIX}.{Stage(stage).value}.failed"


def dlq(stage: Stage | str) -> str:
    return f"{PREFIX}.dlq.{Stage(stage).value}"


JOBS_PROGRESS = f"{PREFIX}.jobs.progress"
JOBS_CONTROL = f"{PREFIX}.jobs.control"
STUDIES_RECEIVED = f"{PREFIX}.studies.received"
# a cohort was deleted at the gateway: every stage service drops its rows and objects of it
COHORTS_DELETED = f"{PREFIX}.cohorts.deleted"
# a study of an anonymized cohort retracted (or available again): the gateway asks the anonymizer,
# the one service that can map the original StudyInstanceUID to the de-identified one (ADR 0025)
STUDY_RETRACTIONS = f"{PREFIX}.anonymization.retractions"
# what the system tells other systems (jobs, studies, exports), as CloudEvents in binary mode
EVENTS_OUT = f"{PREFIX}.events"


def all_topics() -> list[str]:
    """Every topic the system uses; the local stack creates them up front."""
    names = [JOBS_PROGRESS, JOBS_CONTROL, STUDIES_RECEIVED, COHORTS_DELETED, EVENTS_OUT]
    names.append(STUDY_RETRACTIONS)
    for stage in STAGE_ORDER:
        names += [requested(stage), items(stage), completed(stage), failed(stage), dlq(stage)]
    return names


def consumer_group(service: str, purpose: str) -> str:
    """Replicas of one service share a group per purpose, so they split the work."""
    return f"{PREFIX}.{service}.{purpose}"
