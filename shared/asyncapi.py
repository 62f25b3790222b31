"""The AsyncAPI 3.0 document of every topic: address, key, headers, payload schema, who sends and
who receives. Built from the topic registry and the payload models, so it cannot drift from them;
the gateway serves it at `/api/asyncapi.json` beside the OpenAPI spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shared import topics
from shared.events import (
    OUTBOUND_EVENTS,
    CohortDeleted,
    DeadLetter,
    Envelope,
    JobControl,
    JobHeartbeat,
    JobProgress,
    Payload,
    StageCompleted,
    StageFailed,
    StageRequested,
    StudiesPassed,
    StudyReceived,
    StudyRetraction,
    WorkItem,
    cloudevent_type,
)
from shared.topics import STAGE_ORDER, STAGE_SERVICE

_REF = "#/components/schemas/"


@dataclass(frozen=True)
class Channel:
    name: str
    address: str
    description: str
    payloads: tuple[type[Payload], ...]
    key: str
    senders: tuple[str, ...]
    receivers: tuple[str, ...]
    cloudevents: tuple[tuple[str, type[Payload]], ...] = ()  # (CloudEvents type, data model)


def channels() -> list[Channel]:
    """Every topic of `topics.all_topics()`, described."""
    found: list[Channel] = []
    for stage in STAGE_ORDER:
        service = STAGE_SERVICE[stage]
        before = tuple(STAGE_SERVICE[s] for s in STAGE_ORDER[: STAGE_ORDER.index(stage)])
        name = stage.value
        found += [
            Channel(
                f"{name}Requested",
                topics.requested(stage),
                f"a run of {name} was asked for, with the routing slip of the stages after it;"
                " in a streamed pipeline run, the studies that passed the stage before it",
                (StageRequested, StudiesPassed),
                "the cohort id",
                ("gateway", *before),
                (service,),
            ),
            Channel(
                f"{name}Items",
                topics.items(stage),
                f"the work items of {name} runs, shared by the {service}'s replicas",
                (WorkItem,),
                "the item's partition key (a study or a folder: one study stays on one partition)",
                (service,),
                (service,),
            ),
            Channel(
                f"{name}Completed",
                topics.completed(stage),
                f"a {name} run reached its end (possibly with failed items)",
                (StageCompleted,),
                "the cohort id",
                (service,),
                ("gateway",),
            ),
            Channel(
                f"{name}Failed",
                topics.failed(stage),
                f"a {name} run failed; the rest of its slip is cancelled",
                (StageFailed,),
                "the cohort id",
                (service,),
                ("gateway",),
            ),
            Channel(
                f"{name}DeadLetters",
                topics.dlq(stage),
                f"{name} work items, plans and unreadable messages given up on, kept by the"
                " gateway for a person to replay or discard (/api/dead-letters)",
                (DeadLetter,),
                "the item key (the job id for a plan)",
                (service,),
                ("gateway",),
            ),
        ]
    stages = tuple(STAGE_SERVICE[s] for s in STAGE_ORDER)
    found += [
        Channel(
            "jobsProgress",
            topics.JOBS_PROGRESS,
            "throttled progress of runs, and heartbeats while a service works on them, for the"
            " gateway's job rows (a job nothing is heard from is marked stalled)",
            (JobProgress, JobHeartbeat),
            "the job id",
            stages,
            ("gateway",),
        ),
        Channel(
            "jobsControl",
            topics.JOBS_CONTROL,
            "cancel a job: every replica of every stage service hears it",
            (JobControl,),
            "the job id",
            ("gateway",),
            stages,
        ),
        Channel(
            "studiesReceived",
            topics.STUDIES_RECEIVED,
            "a hospital system announces a new study: a CloudEvent in binary mode (`ce_*` headers,"
            " type `<reverse-dns>.study.available.v1`, subject the StudyInstanceUID, the notice as"
            " the value) or a `StudyReceived` envelope; `<reverse-dns>.study.retracted.v1` (the"
            " same data, with an optional `reason`) takes the study out of its cohort's next export",
            (StudyReceived,),
            "the StudyInstanceUID",
            ("hospital systems",),
            ("gateway",),
            (
                ("<reverse-dns>.study.available.v1", StudyReceived),
                ("<reverse-dns>.study.retracted.v1", StudyReceived),
            ),
        ),
        Channel(
            "studyRetractions",
            topics.STUDY_RETRACTIONS,
            "a study of an anonymized cohort was retracted or is available again: the anonymizer"
            " records it under the de-identified study UID for the exporter (the original UID"
            " travels sealed)",
            (StudyRetraction,),
            "the cohort id",
            ("gateway",),
            ("anonymizer",),
        ),
        Channel(
            "cohortsDeleted",
            topics.COHORTS_DELETED,
            "a cohort is gone: each stage service drops its rows and objects of it",
            (CohortDeleted,),
            "the cohort id",
            ("gateway",),
            stages,
        ),
        Channel(
            "events",
            topics.EVENTS_OUT,
            "what the system tells other systems, as CloudEvents in binary mode (`ce_*` headers,"
            " the data as the value); the same events go to subscribed webhooks",
            (),
            "the cohort id (or the subject)",
            ("gateway",),
            ("other systems",),
            tuple((cloudevent_type(n), m) for n, m in OUTBOUND_EVENTS.items()),
        ),
    ]
    return found


_CLOUDEVENT_HEADERS = {
    "type": "object",
    "required": ["ce_specversion", "ce_id", "ce_source", "ce_type"],
    "properties": {
        "ce_specversion": {"const": "1.0"},
        "ce_id": {"type": "string"},
        "ce_source": {"type": "string"},
        "ce_type": {"type": "string"},
        "ce_subject": {"type": "string"},
        "ce_time": {"type": "string", "format": "date-time"},
        "content-type": {"const": "application/json"},
    },
}
_ENVELOPE_HEADERS = {
    "type": "object",
    "properties": {
        "content-type": {"const": "application/json"},
        "type": {"type": "string", "description": "the envelope's type: the payload model's name"},
    },
}


def _enveloped(model: type[BaseModel]) -> dict[str, Any]:
    """The envelope carrying `model` as its payload."""
    return {
        "allOf": [
            {"$ref": f"{_REF}Envelope"},
            {
                "type": "object",
                "properties": {
                    "type": {"const": model.__name__},
                    "payload": {"$ref": f"{_REF}{model.__name__}"},
                },
            },
        ]
    }


def asyncapi_document(bootstrap: str = "localhost:9092") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of Cohortflow's topics."""
    listed = channels()
    models: set[type[BaseModel]] = {Envelope}
    for channel in listed:
        models.update(channel.payloads)
        models.update(m for _, m in channel.cloudevents)
    _, defs = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
        ref_template=_REF + "{model}",
    )
    messages: dict[str, Any] = {}
    doc_channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for channel in listed:
        refs: dict[str, Any] = {}
        for model in channel.payloads:
            message = f"{channel.name}{model.__name__}"
            messages[message] = {
                "name": model.__name__,
                "title": f"{model.__name__} envelope",
                "summary": (model.__doc__ or "").strip().split("\n")[0],
                "contentType": "application/json",
                "headers": _ENVELOPE_HEADERS,
                "payload": _enveloped(model),
                "bindings": {"kafka": {"key": {"type": "string", "description": channel.key}}},
            }
            refs[message] = {"$ref": f"#/components/messages/{message}"}
        for ce_type, model in channel.cloudevents:
            message = f"{channel.name}{ce_type.replace('.', '_').replace('<', '').replace('>', '')}"
            messages[message] = {
                "name": ce_type,
                "title": f"CloudEvent {ce_type}",
                "summary": (model.__doc__ or "").strip().split("\n")[0],
                "contentType": "application/json",
                "headers": _CLOUDEVENT_HEADERS,
                "payload": {"$ref": f"{_REF}{model.__name__}"},
                "bindings": {"kafka": {"key": {"type": "string", "description": channel.key}}},
            }
            refs[message] = {"$ref": f"#/components/messages/{message}"}
        doc_channels[channel.name] = {
            "address": channel.address,
            "description": channel.description,
            "messages": refs,
        }
        to_channel = {"$ref": f"#/channels/{channel.name}"}
        operation_messages = [{"$ref": f"#/channels/{channel.name}/messages/{m}"} for m in refs]
        sides = (("send", "sent", channel.senders), ("receive", "received", channel.receivers))
        for action, done, parties in sides:
            if parties:
                operations[f"{action}_{channel.name}"] = {
                    "action": action,
                    "channel": to_channel,
                    "summary": f"{done} by {', '.join(parties)}",
                    "messages": operation_messages,
                }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Cohortflow topics",
            "version": "1",
            "description": "Every Kafka topic of Cohortflow: the stages' requests, work items,"
            " outcomes and dead letters, job progress and control, new-study notices in, and"
            " the events other systems receive.",
        },
        "defaultContentType": "application/json",
        "servers": {"kafka": {"host": bootstrap, "protocol": "kafka"}},
        "channels": doc_channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": defs["$defs"]},
    }
