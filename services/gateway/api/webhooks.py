"""Webhook subscriptions of other systems, their deliveries, and replaying a delivery.

A subscription names a URL and the event names it wants (`job.completed`, ... or `*`); its signing
secret is in the response of the POST only. Deliveries are signed per Standard Webhooks and retried
with backoff (services/gateway/outbound.py).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Query, Response, status
from pydantic import AnyHttpUrl, BaseModel, Field, field_validator

from services.gateway.api.dependencies import Context
from services.gateway.api.schemas import MAX_OFFSET
from services.gateway.errors import NotFound
from services.gateway.outbound import EVENT_NAMES, subscribe

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class WebhookIn(BaseModel):
    url: AnyHttpUrl = Field(description="where events are POSTed (http or https)")
    event_types: list[str] = Field(
        min_length=1,
        max_length=len(EVENT_NAMES) + 1,
        description=f"event names ({', '.join(EVENT_NAMES)}) or '*' for all",
    )
    description: str = Field("", max_length=500)

    @field_validator("event_types")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - {*EVENT_NAMES, "*"})
        if unknown:
            raise ValueError(
                f"unknown event names {unknown}; known: {', '.join(EVENT_NAMES)} (or '*')"
            )
        return sorted(set(value))


class WebhookOut(BaseModel):
    id: uuid.UUID
    url: str
    event_types: list[str]
    description: str
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(
        description="the signing secret (Standard Webhooks `whsec_...`): shown only here"
    )


class DeliveryOut(BaseModel):
    id: uuid.UUID
    webhook_id: uuid.UUID
    event_id: uuid.UUID = Field(description="the CloudEvent id, sent as `webhook-id`")
    event_type: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime
    last_status: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    body: dict[str, Any] = Field(description="the structured CloudEvent sent")


def _webhook(row: Any) -> dict[str, Any]:
    return {k: row[k] for k in WebhookOut.model_fields}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=WebhookCreated)
async def create_webhook(body: WebhookIn, ctx: Context) -> WebhookCreated:
    """Subscribe a URL to events; the response holds the signing secret, shown this once."""
    async with ctx.pool.acquire() as conn:
        row, secret = await subscribe(
            conn,
            ctx.settings,
            url=str(body.url),
            event_types=body.event_types,
            description=body.description,
        )
    return WebhookCreated(**_webhook(row), secret=secret)


@router.get("", response_model=list[WebhookOut])
async def list_webhooks(ctx: Context) -> list[WebhookOut]:
    async with ctx.pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM gateway.webhooks ORDER BY created_at")
    return [WebhookOut(**_webhook(r)) for r in rows]


@router.delete("/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_webhook(webhook_id: uuid.UUID, ctx: Context) -> Response:
    """Stop sending to this URL (its delivery log goes with it)."""
    async with ctx.pool.acquire() as conn:
        deleted = await conn.fetchval(
            "DELETE FROM gateway.webhooks WHERE id = $1 RETURNING id", webhook_id
        )
    if deleted is None:
        raise NotFound(f"no webhook with id {webhook_id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{webhook_id}/deliveries", response_model=list[DeliveryOut])
async def list_deliveries(
    webhook_id: uuid.UUID,
    ctx: Context,
    delivery_status: Literal["pending", "delivered", "failed"] | None = Query(None, alias="status"),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> list[DeliveryOut]:
    """The delivery log, newest first: each event sent, its attempts and the last outcome."""
    async with ctx.pool.acquire() as conn:
        if not await conn.fetchval("SELECT true FROM gateway.webhooks WHERE id = $1", webhook_id):
            raise NotFound(f"no webhook with id {webhook_id}")
        rows = await conn.fetch(
            "SELECT * FROM gateway.webhook_deliveries WHERE webhook_id = $1"
            " AND ($2::text IS NULL OR status = $2) ORDER BY created_at DESC, id"
            " LIMIT $3 OFFSET $4",
            webhook_id,
            delivery_status,
            limit,
            offset,
        )
    return [DeliveryOut(**{k: r[k] for k in DeliveryOut.model_fields}) for r in rows]


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/replay",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeliveryOut,
)
async def replay_delivery(
    webhook_id: uuid.UUID, delivery_id: uuid.UUID, ctx: Context
) -> DeliveryOut:
    """Send a delivery again now (delivered or given up alike; the same `webhook-id`, so a receiver
    that deduplicates sees the same event)."""
    async with ctx.pool.acquire() as conn:
        row = await conn.fetchrow(
            "UPDATE gateway.webhook_deliveries SET status = 'pending', next_attempt_at = now(),"
            " attempts = 0 WHERE id = $1 AND webhook_id = $2 RETURNING *",
            delivery_id,
            webhook_id,
        )
    if row is None:
        raise NotFound(f"no delivery {delivery_id} of webhook {webhook_id}")
    return DeliveryOut(**{k: row[k] for k in DeliveryOut.model_fields})
