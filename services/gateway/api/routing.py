"""A cohort's routing rules: which "new study" notices that do not name a cohort are its own
(services/gateway/routing.py says how rules are matched)."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
from fastapi import APIRouter, Response, status

from services.gateway import repository as repo
from services.gateway.api.dependencies import Context
from services.gateway.errors import NotFound
from services.gateway.routing import RouteRule

router = APIRouter(prefix="/cohorts/{cohort_id}/routing-rules", tags=["studies"])


class RouteRuleOut(RouteRule):
    id: uuid.UUID
    cohort_id: uuid.UUID
    created_at: datetime


def _out(row: asyncpg.Record) -> RouteRuleOut:
    rule = RouteRule.model_validate(row["rule"])
    return RouteRuleOut(
        **rule.model_dump(), id=row["id"], cohort_id=row["cohort_id"], created_at=row["created_at"]
    )


async def _cohort_exists(ctx: Context, cohort_id: uuid.UUID) -> None:
    async with ctx.pool.acquire() as conn:
        if await repo.get_cohort(conn, cohort_id) is None:
            raise NotFound(f"no cohort with id {cohort_id}")


@router.get("", response_model=list[RouteRuleOut])
async def list_rules(cohort_id: uuid.UUID, ctx: Context) -> list[RouteRuleOut]:
    await _cohort_exists(ctx, cohort_id)
    async with ctx.pool.acquire() as conn:
        return [_out(r) for r in await repo.routing_rules(conn, cohort_id)]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RouteRuleOut)
async def add_rule(cohort_id: uuid.UUID, body: RouteRule, ctx: Context) -> RouteRuleOut:
    """A rule that sends matching notices (that name no cohort) to this cohort."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await repo.lock_cohort(conn, cohort_id) is None:
            raise NotFound(f"no cohort with id {cohort_id}")
        row = await repo.insert_routing_rule(
            conn, cohort_id, body.model_dump(mode="json"), body.priority
        )
    return _out(row)


@router.delete("/{rule_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_rule(cohort_id: uuid.UUID, rule_id: uuid.UUID, ctx: Context) -> Response:
    async with ctx.pool.acquire() as conn:
        if not await repo.delete_routing_rule(conn, cohort_id, rule_id):
            raise NotFound(f"no routing rule {rule_id} of cohort {cohort_id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
