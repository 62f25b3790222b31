"""`POST /api/studies`: the HTTP twin of `cohortflow.studies.received` for systems without Kafka."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Query, status

from services.gateway import repository as repo
from services.gateway.api.dependencies import Context, Publishing
from services.gateway.api.schemas import MAX_OFFSET, JobOut, ReceivedStudyOut, StudyAcceptedOut
from services.gateway.handlers import receive_study
from shared.events import StudyReceived

router = APIRouter(prefix="/studies", tags=["studies"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=StudyAcceptedOut)
async def post_study(body: StudyReceived, ctx: Publishing) -> StudyAcceptedOut:
    """Add a study to the named cohort (`cohort`: name or id) and run the pipeline for it only.

    The body is the `StudyReceived` payload of the Kafka topic; `location` is the study's folder
    under an allowed data root or its `s3://bucket/prefix`.
    """
    accepted = await receive_study(ctx.pool, ctx.settings, body, "http")
    return StudyAcceptedOut(
        cohort_id=accepted.cohort_id,
        study_instance_uid=accepted.study_instance_uid,
        location=accepted.location,
        run_id=accepted.run.run_id if accepted.run else None,
        jobs=[JobOut.from_row(j) for j in accepted.run.jobs] if accepted.run else [],
    )


@router.get("", response_model=list[ReceivedStudyOut])
async def list_received_studies(
    ctx: Context,
    cohort_id: uuid.UUID | None = None,
    refused: bool | None = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> list[ReceivedStudyOut]:
    """The "new study" notices received (HTTP and Kafka), newest first, refusals with their reason."""
    async with ctx.pool.acquire() as conn:
        rows = await repo.received_studies(
            conn, cohort_id=cohort_id, refused=refused, limit=limit, offset=offset
        )
    return [ReceivedStudyOut(**{k: r[k] for k in ReceivedStudyOut.model_fields}) for r in rows]
