"""`POST /api/studies`: the HTTP twin of `cohortflow.studies.received` for systems without Kafka."""

from __future__ import annotations

from fastapi import APIRouter, status

from services.gateway.api.dependencies import Context
from services.gateway.api.schemas import JobOut, StudyAcceptedOut
from services.gateway.handlers import receive_study
from shared.events import StudyReceived

router = APIRouter(prefix="/studies", tags=["studies"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=StudyAcceptedOut)
async def post_study(body: StudyReceived, ctx: Context) -> StudyAcceptedOut:
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
