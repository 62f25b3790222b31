"""Retracted studies: a hospital system's `study.retracted.v1` notice takes a study out of its
cohort's next export. The gateway records retractions (`gateway.retracted_studies`, taken back by a
later `study.available.v1`) and publishes them as `gateway.retracted_studies_v`; the exporter reads
them when it plans and leaves the studies' stacks out, with the reason, in `not_exported`.
See docs/adr-0021-study-notices-and-outbound-events.md.
"""

from __future__ import annotations

import uuid

import asyncpg

from shared.db import relation_exists

RETRACTED_VIEW = "gateway.retracted_studies_v"


async def load_retracted(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> dict[str, str]:
    """StudyInstanceUID -> why it was retracted, for the cohort (none when the gateway's view does
    not exist)."""
    if not await relation_exists(conn, RETRACTED_VIEW):
        return {}
    rows = await conn.fetch(
        f"SELECT study_instance_uid, reason FROM {RETRACTED_VIEW} WHERE cohort_id = $1",
        cohort_id,
    )
    return {r["study_instance_uid"]: r["reason"] for r in rows}
