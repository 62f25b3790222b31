"""What the system tells other systems: CloudEvents on `cohortflow.events` and signed webhooks.

Every event is written in the transaction of the state change it announces (the outbox, and one
pending delivery per matching webhook subscription), so nothing is announced that did not happen and
nothing that happened goes unannounced. Types (`org.cohortflow.<name>.v1`):

- `job.started`, `job.completed`, `job.failed`, `job.cancelled`: a job's status changed (subject: the
  job id; data: cohort, run, stage, status, reason, counts, whether work was left behind);
- `export.published`: an export job completed (data: where the tree is, the BIDS validator's
  verdict, counts);
- `study.accepted`, `study.refused`: a "new study" notice and what came of it (never the patient id
  or accession number).

`WebhookDispatcher` delivers pending deliveries per Standard Webhooks (`webhook-id` = the CloudEvent
id, `webhook-timestamp`, `webhook-signature` HMAC-SHA256 with the subscription's secret), retrying
with exponential backoff and keeping every attempt's outcome for the API.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from standardwebhooks import Webhook

from services.gateway import SCHEMA
from shared import topics
from shared.events import (
    OUTBOUND_EVENTS,
    Envelope,
    ExportPublished,
    JobEvent,
    Payload,
    cloudevent,
    work_left_behind,
)
from shared.loops import BackgroundLoop
from shared.outbox import enqueue
from shared.retry import backoff_s
from shared.secrets import seal, unseal
from shared.settings import Settings

log = logging.getLogger(__name__)

SOURCE = "/cohortflow/gateway"
EVENT_NAMES = tuple(OUTBOUND_EVENTS)
_JOB_EVENTS = {
    "running": "job.started",
    "completed": "job.completed",
    "failed": "job.failed",
    "cancelled": "job.cancelled",
}
_MAX_BACKOFF_S = 3600.0


def structured(envelope: Envelope) -> dict[str, Any]:
    """The envelope as a structured-mode CloudEvent (the body of a webhook)."""
    event = {
        "specversion": "1.0",
        "id": str(envelope.id),
        "source": envelope.source,
        "type": envelope.type,
        "time": envelope.time.isoformat(),
        "datacontenttype": "application/json",
        "data": envelope.payload,
    }
    if envelope.subject:
        event["subject"] = envelope.subject
    return event


async def emit(conn: asyncpg.Connection, data: Payload, *, name: str, subject: str) -> None:
    """Announce an event: on the outbound topic and to every subscribed webhook. Call inside the
    transaction of the state change."""
    assert isinstance(data, OUTBOUND_EVENTS[name]), name
    cohort_id = getattr(data, "cohort_id", None)
    payload = data.model_dump(mode="json")
    envelope = cloudevent(name, payload, source=SOURCE, subject=subject, cohort_id=cohort_id)
    key = str(cohort_id) if cohort_id else subject
    await enqueue(conn, SCHEMA, topics.EVENTS_OUT, envelope, key=key)
    await conn.execute(
        "INSERT INTO gateway.webhook_deliveries (id, webhook_id, event_id, event_type, body)"
        " SELECT gen_random_uuid(), w.id, $1, $2, $3 FROM gateway.webhooks w"
        " WHERE $2 = ANY(w.event_types) OR '*' = ANY(w.event_types)"
        " ON CONFLICT (webhook_id, event_id) DO NOTHING",
        envelope.id,
        name,
        structured(envelope),
    )


async def job_changed(conn: asyncpg.Connection, job: asyncpg.Record) -> None:
    """The events of a job whose status just changed (`job` is the updated row)."""
    name = _JOB_EVENTS.get(job["status"])
    if name is None:
        return
    summary = job["summary"] or {}
    behind = work_left_behind(job["items_total"], job["items_failed"], summary)
    data = JobEvent(
        job_id=job["id"],
        cohort_id=job["cohort_id"],
        run_id=job["run_id"],
        stage=job["stage"],
        status=job["status"],
        reason=job["status_reason"],
        scoped=job["scoped"],
        items_total=job["items_total"],
        items_done=job["items_done"],
        items_failed=job["items_failed"],
        left_work_behind=job["status"] == "completed" and behind is not None,
    )
    await emit(conn, data, name=name, subject=str(job["id"]))
    if name == "job.completed" and job["stage"] == "export":
        validator = summary.get("validator")
        published = ExportPublished(
            job_id=job["id"],
            cohort_id=job["cohort_id"],
            scoped=job["scoped"],
            output_prefix=job["output_prefix"],
            files_api=f"/api/cohorts/{job['cohort_id']}/exports/{job['id']}",
            validator={k: v for k, v in validator.items() if k != "issues"}
            if isinstance(validator, dict)
            else {},
            summary={k: v for k, v in summary.items() if isinstance(v, int | float | bool)},
        )
        await emit(conn, published, name="export.published", subject=str(job["id"]))


# --- subscriptions -----------------------------------------------------------------------------


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def subscribe(
    conn: asyncpg.Connection,
    settings: Settings,
    *,
    url: str,
    event_types: list[str],
    description: str,
) -> tuple[asyncpg.Record, str]:
    """A new subscription and its secret (returned once, kept sealed)."""
    secret = new_secret()
    row = await conn.fetchrow(
        "INSERT INTO gateway.webhooks (id, url, event_types, description, secret_sealed)"
        " VALUES ($1, $2, $3, $4, $5) RETURNING *",
        uuid.uuid4(),
        url,
        event_types,
        description,
        seal(secret, settings),
    )
    assert row is not None
    return row, secret


# --- delivery ----------------------------------------------------------------------------------


class WebhookDispatcher(BackgroundLoop):
    """Delivers due webhook deliveries (every gateway replica runs one; rows are claimed with
    `FOR UPDATE SKIP LOCKED`, so each delivery goes out from one replica at a time)."""

    name = "webhook-dispatcher"

    def __init__(self, pool: asyncpg.Pool, settings: Settings, poll_s: float = 0.5) -> None:
        super().__init__(poll_s)
        self._pool = pool
        self._settings = settings
        self._client = httpx.AsyncClient(timeout=settings.webhook_timeout_s)

    async def stop(self) -> None:
        await super().stop()
        await self._client.aclose()

    async def step(self) -> bool:
        return bool(await self.deliver_due())

    async def deliver_due(self, limit: int = 20) -> int:
        """Attempt up to `limit` due deliveries; returns how many were attempted."""
        attempted = 0
        for _ in range(limit):
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    "SELECT d.*, w.url, w.secret_sealed FROM gateway.webhook_deliveries d"
                    " JOIN gateway.webhooks w ON w.id = d.webhook_id"
                    " WHERE d.status = 'pending' AND d.next_attempt_at <= now()"
                    " ORDER BY d.next_attempt_at LIMIT 1 FOR UPDATE OF d SKIP LOCKED"
                )
                if row is None:
                    return attempted
                await self._attempt(conn, row)
                attempted += 1
        return attempted

    async def _attempt(self, conn: asyncpg.Connection, row: asyncpg.Record) -> None:
        body = json.dumps(row["body"], separators=(",", ":"))
        now = datetime.now(UTC)
        signer = Webhook(unseal(row["secret_sealed"], self._settings))
        headers = {
            "content-type": "application/json",
            "webhook-id": str(row["event_id"]),
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signer.sign(str(row["event_id"]), now, body),
        }
        status: int | None = None
        error: str | None = None
        try:
            response = await self._client.post(row["url"], content=body, headers=headers)
            status = response.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        attempts = row["attempts"] + 1
        if error is None:
            await conn.execute(
                "UPDATE gateway.webhook_deliveries SET status = 'delivered', attempts = $2,"
                " last_status = $3, last_error = NULL, delivered_at = now() WHERE id = $1",
                row["id"],
                attempts,
                status,
            )
            return
        gave_up = attempts >= self._settings.webhook_max_attempts
        delay = backoff_s(attempts, self._settings.webhook_retry_base_s, _MAX_BACKOFF_S)
        await conn.execute(
            "UPDATE gateway.webhook_deliveries SET status = $2, attempts = $3, last_status = $4,"
            " last_error = $5, next_attempt_at = $6 WHERE id = $1",
            row["id"],
            "failed" if gave_up else "pending",
            attempts,
            status,
            error,
            now + timedelta(seconds=delay),
        )
        log.warning(
            "webhook delivery failed" + ("; given up" if gave_up else "; will retry"),
            extra={"delivery_id": str(row["id"]), "attempts": attempts, "error": error},
        )
