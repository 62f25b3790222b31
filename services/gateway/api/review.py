"""Review and correction of the classification: a cohort's mapping rules (shared.mapping_rules).

Every save is a new version, attributed to the cohort's owner; the newest version per
(series description, stack key) is the rule in force, and a withdrawn one hands the stacks back to
the sorter. The exporter applies the rules in force when it plans (docs/adr-0020-web-review.md).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, status
from pydantic import BaseModel, Field, StringConstraints

from services.gateway import repository as repo
from services.gateway.api.dependencies import Context
from services.gateway.errors import Invalid, NotFound
from shared.db import json_text

router = APIRouter(prefix="/cohorts", tags=["review"])

# the BIDS datatypes a person may name (those the exporter writes)
Datatype = Annotated[str, StringConstraints(pattern=r"^(anat|dwi|func|fmap|perf)$")]
Suffix = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]{1,32}$")]
EntityValue = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]{1,64}$")]
EntityName = Annotated[
    str, StringConstraints(pattern=r"^(task|acq|ce|rec|dir|run|echo|part|inv|flip|mt)$")
]


class MappingRuleIn(BaseModel):
    """A correction of one kind of stack: its new BIDS name, or its exclusion, or (withdrawn) the
    end of an earlier correction."""

    series_description: str = Field(max_length=1024)
    stack_key: str = Field(min_length=1, max_length=1024)
    bids_datatype: Datatype | None = None
    bids_suffix: Suffix | None = None
    entities: dict[EntityName, EntityValue] = Field(default_factory=dict, max_length=12)
    excluded: bool = False
    withdrawn: bool = False
    note: str = Field(default="", max_length=2000)
    proposed: dict[str, Any] = Field(
        default_factory=dict, description="the sorter's proposal the person saw"
    )


class MappingRuleOut(BaseModel):
    cohort_id: uuid.UUID
    version: int
    series_description: str
    stack_key: str
    bids_datatype: str | None
    bids_suffix: str | None
    entities: dict[str, Any]
    excluded: bool
    withdrawn: bool
    author: str
    note: str
    proposed: dict[str, Any]
    created_at: datetime


_COLUMNS = (
    "cohort_id, version, series_description, stack_key, bids_datatype, bids_suffix, entities,"
    " excluded, withdrawn, author, note, proposed, created_at"
)


def _out(row: asyncpg.Record) -> MappingRuleOut:
    return MappingRuleOut(**dict(row))


@router.get("/{cohort_id}/mapping-rules", response_model=list[MappingRuleOut])
async def mapping_rules(
    cohort_id: uuid.UUID, ctx: Context, history: bool = False
) -> list[MappingRuleOut]:
    """The rules in force (`history=true`: every version, newest first)."""
    async with ctx.pool.acquire() as conn:
        if await repo.get_cohort(conn, cohort_id) is None:
            raise NotFound(f"no cohort with id {cohort_id}")
        source = "gateway.mapping_rules" if history else "gateway.mapping_rules_v"
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM {source} WHERE cohort_id = $1 ORDER BY version DESC",
            cohort_id,
        )
    return [_out(r) for r in rows]


@router.post(
    "/{cohort_id}/mapping-rules",
    status_code=status.HTTP_201_CREATED,
    response_model=MappingRuleOut,
)
async def save_mapping_rule(
    cohort_id: uuid.UUID, body: MappingRuleIn, ctx: Context
) -> MappingRuleOut:
    """Save a correction as the cohort's next rule version (attributed to the cohort's owner).
    A rule that is neither an exclusion nor a withdrawal needs a datatype and a suffix (422)."""
    if not (body.excluded or body.withdrawn) and not (body.bids_datatype and body.bids_suffix):
        raise Invalid("a correction needs a BIDS datatype and a suffix, or exclude the stack")
    async with ctx.pool.acquire() as conn, conn.transaction():
        cohort = await repo.lock_cohort(conn, cohort_id)
        if cohort is None:
            raise NotFound(f"no cohort with id {cohort_id}")
        row = await conn.fetchrow(
            "INSERT INTO gateway.mapping_rules (cohort_id, version, series_description, stack_key,"
            " bids_datatype, bids_suffix, entities, excluded, withdrawn, author, note, proposed)"
            " SELECT $1, coalesce(max(version), 0) + 1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9,"
            " $10, $11::jsonb FROM gateway.mapping_rules WHERE cohort_id = $1"
            f" RETURNING {_COLUMNS}",
            cohort_id,
            body.series_description,
            body.stack_key,
            None if body.excluded else body.bids_datatype,
            None if body.excluded else body.bids_suffix,
            json_text({} if body.excluded else body.entities),
            body.excluded,
            body.withdrawn,
            cohort["owner"] or "the cohort's owner (unnamed)",
            body.note,
            json_text(body.proposed),
        )
    return _out(row)
