"""Retracted studies: a hospital system's `study.retracted.v1` notice takes a study out of its
cohort's next export. For a cohort without anonymization the gateway records the retraction
(`gateway.retracted_studies`, taken back by a later `study.available.v1`) and publishes it as
`gateway.retracted_studies_v`. For an anonymized cohort the catalog holds only de-identified study
UIDs: the gateway asks the anonymizer, which records it under the de-identified UID and publishes
`anonymizer.retracted_studies_v` (ADR 0025). The exporter reads both when it plans and leaves the
studies' stacks out, with the reason, in `not_exported`.
See docs/adr-0021-study-notices-and-outbound-events.md and docs/adr-0025-retraction-in-anonymized-cohorts.md.
"""

from __future__ import annotations

import uuid

import asyncpg

from shared.db import relation_exists

RETRACTED_VIEW = "gateway.retracted_studies_v"
ANONYMIZED_RETRACTED_VIEW = "anonymizer.retracted_studies_v"


async def load_retracted(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> dict[str, str]:
    """StudyInstanceUID (as the catalog has it) -> why it was retracted, for the cohort (nothing
    from a view that does not exist)."""
    retracted: dict[str, str] = {}
    for view in (RETRACTED_VIEW, ANONYMIZED_RETRACTED_VIEW):
        if not await relation_exists(conn, view):
            continue
        rows = await conn.fetch(
            f"SELECT study_instance_uid, reason FROM {view} WHERE cohort_id = $1", cohort_id
        )
        retracted.update({r["study_instance_uid"]: r["reason"] for r in rows})
    return retracted
