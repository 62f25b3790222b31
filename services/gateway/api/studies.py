""" "New study" notices over HTTP, the twin of the `cohortflow.studies.received` topic for systems
without Kafka: `POST /api/events` takes a CloudEvent 1.0 (binary or structured mode), `POST
/api/studies` our own `StudyReceived` body; `GET /api/studies` lists every notice and what came of it.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from fastapi import APIRouter, Query, Request, Response, status

from services.gateway import repository as repo
from services.gateway.api.dependencies import Context, Publishing
from services.gateway.api.schemas import MAX_OFFSET, JobOut, ReceivedStudyOut, StudyAcceptedOut
from services.gateway.errors import Invalid
from services.gateway.handlers import StudyAccepted, receive_notice, receive_study
from services.gateway.notices import EXAMPLE_TYPE, NoticeError, notice_from_http
from shared.events import StudyReceived

router = APIRouter(tags=["studies"])

_ACCEPTED_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "model": StudyAcceptedOut,
        "description": "a duplicate (nothing new started), or a retraction recorded",
    },
}


def _out(accepted: StudyAccepted, response: Response) -> StudyAcceptedOut:
    if accepted.outcome in ("duplicate", "retracted"):
        response.status_code = status.HTTP_200_OK
    return StudyAcceptedOut(
        cohort_id=accepted.cohort_id,
        study_instance_uid=accepted.study_instance_uid,
        location=accepted.location,
        outcome=accepted.outcome,
        notice=accepted.seq,
        duplicate_of=accepted.duplicate_of,
        run_id=accepted.run.run_id if accepted.run else None,
        jobs=[JobOut.from_row(j) for j in accepted.run.jobs] if accepted.run else [],
    )


@router.post(
    "/studies",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=StudyAcceptedOut,
    responses=_ACCEPTED_DOC,
)
async def post_study(body: StudyReceived, ctx: Publishing, response: Response) -> StudyAcceptedOut:
    """Add a study to the named cohort (`cohort`: name or id) and run the pipeline for it only.

    The body is the `StudyReceived` payload of the Kafka topic; `location` is the study's folder
    under an allowed data root or its `s3://bucket/prefix`. The same files of the same study sent
    again start nothing (200, `outcome: duplicate`, the earlier notice's run).
    """
    return _out(await receive_study(ctx.pool, ctx.settings, body, "http"), response)


_CLOUDEVENT_EXAMPLE = {
    "specversion": "1.0",
    "type": EXAMPLE_TYPE,
    "source": "/hospital/orthanc-1",
    "id": "7d2c1d8e-5b0f-4a58-9d7e-0d8f3b1c2a11",
    "subject": "1.2.826.0.1.3680043.8.498.12345",
    "datacontenttype": "application/json",
    "data": {
        "location": "/data/incoming/1.2.826.0.1.3680043.8.498.12345",
        "cohort": "memory-study",
        "modalities": ["MR"],
        "expected_instances": 1840,
        "complete": True,
        "origin": {"system": "orthanc-1", "calling_ae": "MRI3T", "called_ae": "COHORTFLOW"},
    },
}
_EVENT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/cloudevents+json": {
                "schema": {
                    "type": "object",
                    "required": ["specversion", "type", "source", "id"],
                    "properties": {
                        "specversion": {"const": "1.0"},
                        "type": {"type": "string"},
                        "source": {"type": "string"},
                        "id": {"type": "string"},
                        "subject": {"type": "string"},
                        "data": {"$ref": "#/components/schemas/StudyReceived"},
                    },
                },
                "example": _CLOUDEVENT_EXAMPLE,
            },
            "application/json": {
                "schema": {"$ref": "#/components/schemas/StudyReceived"},
                "example": _CLOUDEVENT_EXAMPLE["data"],
            },
        },
    }
}


@router.post(
    "/events",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=StudyAcceptedOut,
    responses=_ACCEPTED_DOC,
    openapi_extra=_EVENT_BODY,
)
async def post_event(request: Request, ctx: Publishing, response: Response) -> StudyAcceptedOut:
    """A study notice as a CloudEvent 1.0, in structured mode (`application/cloudevents+json`)
    or binary mode (`ce-specversion`, `ce-type`, `ce-source`, `ce-id`, `ce-subject` headers, the
    data as `application/json`).

    `type` ends in `.study.available.v1` after the sender's reverse-DNS name; `subject` is the
    StudyInstanceUID; `data` is the study notice (location, cohort, modalities, expected_instances,
    complete, origin). The same `source` and `id` again, or the same files of the same study, start
    nothing (200, `outcome: duplicate`).

    `type` ending in `.study.retracted.v1` leaves the study out of its cohort's next export (200,
    `outcome: retracted`; `data.reason` is kept with it, except in an anonymized cohort, where it
    may name the patient); the cohort is `data.cohort`, else the one the study was accepted into.
    `subject` is the original StudyInstanceUID in an anonymized cohort too. A later
    `.study.available.v1` for the study takes that back.
    """
    try:
        notice = notice_from_http(dict(request.headers), await request.body())
    except NoticeError as exc:
        raise Invalid(str(exc)) from None
    return _out(await receive_notice(ctx.pool, ctx.settings, notice, "http"), response)


@router.get("/studies", response_model=list[ReceivedStudyOut])
async def list_received_studies(
    ctx: Context,
    cohort_id: uuid.UUID | None = None,
    refused: bool | None = None,
    outcome: Literal["accepted", "duplicate", "refused", "waiting", "retracted"] | None = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> list[ReceivedStudyOut]:
    """The "new study" notices received (HTTP and Kafka), newest first: accepted, duplicates (with
    the notice they repeat) and refusals with their reason."""
    async with ctx.pool.acquire() as conn:
        rows = await repo.received_studies(
            conn, cohort_id=cohort_id, refused=refused, outcome=outcome, limit=limit, offset=offset
        )
    return [ReceivedStudyOut(**{k: r[k] for k in ReceivedStudyOut.model_fields}) for r in rows]
