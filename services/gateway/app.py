"""The gateway process: HTTP API and web page (FastAPI), Kafka consumers (FastStream) and the
outbox relay, in one process.

`app_factory(settings)` builds the app; its lifespan opens the pool, applies the migrations, starts
the broker with the gateway's subscribers and the outbox relay, and stops them in reverse order.
`main()` serves it with uvicorn on `gateway_host:gateway_port`; SIGTERM stops it gracefully.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from pydantic import ValidationError

from services.gateway import SCHEMA, dead_letters, handlers
from services.gateway.api import api_router, document_errors, install_error_handlers
from services.gateway.api.auth import token_middleware
from services.gateway.api.dependencies import BrokerProbe, GatewayContext
from services.gateway.api.limits import BodyLimit
from services.gateway.job_watch import JobWatch
from services.gateway.notices import NoticeError, is_kafka_cloudevent, notice_from_kafka
from services.gateway.outbound import WebhookDispatcher
from services.gateway.stalls import StallWatch
from shared import topics
from shared.asyncapi import asyncapi_document
from shared.broker import MessageHandler, by_topic, make_broker
from shared.broker import subscribe as subscribe_topics
from shared.db import create_pool, migrate
from shared.events import Envelope
from shared.observability import HTTP_REQUESTS, configure_logging, health_router
from shared.outbox import OutboxRelay
from shared.settings import Settings, get_settings
from shared.storage import ObjectStore
from shared.topics import STAGE_ORDER

log = logging.getLogger(__name__)

SERVICE = "gateway"
HERE = Path(__file__).resolve().parent
MIGRATIONS = HERE / "migrations"
WEB = HERE / "web"

# what the gateway follows: run outcomes and progress, and "new study" notices
EVENT_TOPICS = [
    topics.JOBS_PROGRESS,
    *(topics.completed(s) for s in STAGE_ORDER),
    *(topics.failed(s) for s in STAGE_ORDER),
]


def _consumer(
    handle: Callable[[Envelope], Awaitable[None]],
) -> Callable[[KafkaMessage], Awaitable[None]]:
    """Decode the envelope, then handle it; a message that is no envelope is logged and skipped
    (retrying cannot fix it), an error while handling is raised so the message comes back."""

    async def consume(message: KafkaMessage) -> None:
        try:
            envelope = Envelope.model_validate_json(message.body)
        except ValidationError as exc:
            log.error(
                "undecodable message skipped",
                extra={
                    "topic": getattr(message.raw_message, "topic", "?"),
                    "error": str(exc)[:500],
                },
            )
            return
        await handle(envelope)

    return consume


def subscribe(
    broker: KafkaBroker, pool_ref: Callable[[], asyncpg.Pool], settings: Settings
) -> None:
    """Attach the gateway's consumer: run events, received studies and dead letters, one group
    member dispatching by topic (ADR 0031); the group keeps the name it had for the events."""

    async def on_event(envelope: Envelope) -> None:
        await handlers.on_event(pool_ref(), settings, envelope)

    envelopes = _consumer(on_event)

    async def on_study(message: KafkaMessage) -> None:
        # hospital systems send CloudEvents in binary mode (`ce_*` headers); our own producers and
        # older senders the `StudyReceived` envelope
        record = message.raw_message
        headers = list(getattr(record, "headers", None) or ())
        if not is_kafka_cloudevent(headers):
            await envelopes(message)
            return
        try:
            notice = notice_from_kafka(headers, getattr(record, "key", None), message.body)
        except NoticeError as exc:
            log.error("unreadable study CloudEvent skipped", extra={"error": str(exc)[:500]})
            return
        await handlers.on_study_cloudevent(pool_ref(), settings, notice)

    async def on_dead_letter(message: KafkaMessage) -> None:
        # the topic names the stage (a letter of an undecodable message carries no more)
        topic = str(getattr(message.raw_message, "topic", ""))

        async def keep(envelope: Envelope) -> None:
            try:
                await dead_letters.record(pool_ref(), envelope, topic)
            except (ValueError, asyncpg.DataError) as exc:
                log.error("dead letter skipped: it cannot be kept", extra={"error": str(exc)[:500]})

        await _consumer(keep)(message)

    routes: dict[str, MessageHandler] = dict.fromkeys(EVENT_TOPICS, envelopes)
    routes |= dict.fromkeys((topics.dlq(s) for s in STAGE_ORDER), on_dead_letter)
    routes[topics.STUDIES_RECEIVED] = on_study
    subscribe_topics(
        broker, list(routes), by_topic(routes), settings, topics.consumer_group(SERVICE, "events")
    )


def app_factory(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    broker = make_broker(settings, SERVICE)
    resources: dict[str, asyncpg.Pool] = {}

    def pool_ref() -> asyncpg.Pool:
        return resources["pool"]

    subscribe(broker, pool_ref, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await create_pool(settings)
        resources["pool"] = pool
        try:
            await migrate(pool, SCHEMA, MIGRATIONS)
            job_watch = JobWatch(pool)
            app.state.gateway = GatewayContext(
                settings,
                pool,
                ObjectStore(settings),
                BrokerProbe(lambda: broker.ping(timeout=2.0)),
                job_watch,
            )
            relay = OutboxRelay(pool, SCHEMA, broker, settings)
            webhooks = WebhookDispatcher(pool, settings)
            watcher = handlers.StudyWatcher(pool, settings)
            stalls = StallWatch(pool, settings)
            await broker.start()
            await relay.start()
            await webhooks.start()
            await watcher.start()
            await stalls.start()
            await job_watch.start()
            log.info("gateway started", extra={"port": settings.gateway_port})
            try:
                yield
            finally:
                log.info("gateway stopping")
                await job_watch.stop()
                await stalls.stop()
                await watcher.stop()
                await webhooks.stop()
                await relay.stop()
                await broker.stop()
        finally:
            await pool.close()

    async def ready() -> bool:
        pool = resources.get("pool")
        if pool is None:
            return False
        async with pool.acquire() as conn:
            if not await conn.fetchval("SELECT true"):
                return False
        return bool(await broker.ping(timeout=2.0))

    app = FastAPI(
        title="Cohortflow gateway",
        summary="Cohorts, stage runs and jobs, catalog and exports of the Cohortflow pipeline",
        version="1",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    document_errors(app, token=settings.api_token is not None)
    # innermost (added first), so the route reads the body straight through it: a body over the
    # limit is refused before anything parses it, after the token check
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)
    app.middleware("http")(token_middleware(settings))
    app.middleware("http")(_count_requests)
    app.include_router(health_router(ready))
    app.include_router(api_router())
    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/", include_in_schema=False)
    async def web_page() -> FileResponse:
        return FileResponse(WEB / "index.html")

    contracts: dict[str, Any] = {}

    @app.get("/api/asyncapi.json", include_in_schema=False)
    async def asyncapi() -> dict[str, Any]:
        """Every topic (address, key, headers, payload schema), as AsyncAPI 3.0 (built once, on
        first request: start-up does not wait for the payload models' schemas)."""
        if not contracts:
            contracts.update(asyncapi_document(settings.kafka_bootstrap))
        return contracts

    return app


async def _count_requests(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    response = await call_next(request)
    route = request.scope.get("route")
    HTTP_REQUESTS.labels(
        request.method, getattr(route, "path", "unmatched"), str(response.status_code)
    ).inc()
    return response


def main() -> None:
    """Serve the gateway until SIGTERM/SIGINT (uvicorn then runs the lifespan's shutdown)."""
    settings = get_settings()
    configure_logging(SERVICE, settings)
    uvicorn.run(
        app_factory(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,
        proxy_headers=True,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
