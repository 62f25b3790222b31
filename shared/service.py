"""Hosting a stage service: the wiring every stage shares, so each service's `app.py` stays small.

`serve_stage(plugin)` migrates the plugin's schema, subscribes the stage runtime to its topics with
commit-after-processing, starts the outbox relay and a small HTTP server for `/healthz`, `/readyz`
and `/metrics`, and runs until SIGTERM or SIGINT, then drains and stops in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import uvicorn
from fastapi import FastAPI
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from pydantic import ValidationError

from shared import topics
from shared.broker import MessageHandler, by_topic, make_broker, subscribe
from shared.db import create_pool
from shared.events import DeadLetter, Envelope, WrongPayload
from shared.observability import configure_logging, health_router
from shared.outbox import OutboxRelay
from shared.secrets import SecretError
from shared.settings import Settings, get_settings
from shared.stage import StagePlugin, StageRuntime, migrate_stage_schema
from shared.storage import ObjectStore

log = logging.getLogger(__name__)

Handler = Callable[[Envelope], Awaitable[None]]


def envelope_handler(
    broker: KafkaBroker, service: str, dlq_topic: str, handle: Handler
) -> Callable[[KafkaMessage], Awaitable[None]]:
    """Wrap a handler of envelopes: a message that is not a valid envelope, or whose payload does
    not validate, is dead-lettered and acknowledged (retrying it cannot help), anything else the
    handler raises is retried."""

    async def consume(message: KafkaMessage) -> None:
        try:
            envelope = Envelope.model_validate_json(message.body)
        except ValidationError as exc:
            topic = str(getattr(message.raw_message, "topic", "?"))
            log.error("undecodable message dead-lettered", extra={"topic": topic})
            letter = DeadLetter(
                topic=topic,
                error=f"not a valid envelope: {exc.errors()[:3]}",
                attempts=1,
                original={"raw": message.body[:4096].decode("utf-8", "replace")},
            )
            await broker.publish(
                Envelope.wrap(letter, source=service).model_dump_json().encode(), topic=dlq_topic
            )
            return
        try:
            await handle(envelope)
        except (ValidationError, WrongPayload, SecretError) as exc:
            # a valid envelope whose payload is not (or holds a value sealed under another
            # project secret): no redelivery could read it differently (and with one record per
            # poll it would block its partition), so it is dead-lettered and acknowledged (work
            # items are also failed: StageRuntime.handle_item)
            topic = str(getattr(message.raw_message, "topic", "?"))
            log.error(
                "unreadable payload dead-lettered", extra={"topic": topic, "type": envelope.type}
            )
            letter = DeadLetter(
                topic=topic,
                error=f"not a valid {envelope.type}: {exc}"[:2000],
                attempts=1,
                original=envelope.payload,
            )
            dead = Envelope.wrap(
                letter,
                source=service,
                cohort_id=envelope.cohort_id,
                job_id=envelope.job_id,
                correlation_id=envelope.correlation_id,
            )
            await broker.publish(dead.model_dump_json().encode(), topic=dlq_topic)

    return consume


async def run_health_server(
    settings: Settings, ready: Callable[[], Awaitable[bool]], stop: asyncio.Event
) -> None:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.include_router(health_router(ready))
    config = uvicorn.Config(
        app,
        host=settings.service_host,
        port=settings.service_port,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    # the service owns the signals: run uvicorn's loop without its signal capture
    task = asyncio.create_task(server._serve())
    await stop.wait()
    server.should_exit = True
    await task


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


async def database_ready(pool: asyncpg.Pool) -> bool:
    async with pool.acquire() as conn:
        return bool(await conn.fetchval("SELECT true"))


def item_consumers(plugin: StagePlugin) -> dict[str, Any]:
    """Subscriber options for a plugin that works on several items at once (`item_workers`, default
    1): that many consumers of the items topic in this process, in the service's group, each with
    its own partitions and commit-after-processing, as that many replicas would be."""
    workers = int(getattr(plugin, "item_workers", 1))
    return {"max_workers": workers} if workers > 1 else {}


async def warm_up(plugin: StagePlugin) -> None:
    """Start the plugin's worker processes in the background (`warm_up()`, when it has one); a
    failure is logged, never fatal: the first item would start them anyway."""
    warm = getattr(plugin, "warm_up", None)
    if warm is None:
        return
    started = time.perf_counter()
    try:
        workers = await asyncio.to_thread(warm)
    except Exception:
        log.warning("worker processes did not start ahead of the first item", exc_info=True)
        return
    log.info(
        "worker processes started",
        extra={"workers": workers, "seconds": round(time.perf_counter() - started, 2)},
    )


def subscribe_stage(
    broker: KafkaBroker, plugin: StagePlugin, runtime: StageRuntime, settings: Settings
) -> None:
    """Subscribe the runtime to the stage's topics (ADR 0031 for why these three consumers):

    - items: the service's replicas share them (a group), `item_workers` consumers per process;
    - requests, cohort deletions and the topics the plugin handles itself (`subscriptions(pool)`:
      topic, envelope handler; the anonymizer's retractions, ADR 0025): one consumer in one group,
      dispatching by topic, since each of them is rare and brief;
    - job control: heard by every replica (no group), polled less often, since a cancel is also
      read from the database before every item.
    """
    dlq = topics.dlq(plugin.stage)

    def wrap(handle: Handler) -> MessageHandler:
        return envelope_handler(broker, plugin.service, dlq, handle)

    subscribe(
        broker,
        [topics.items(plugin.stage)],
        wrap(runtime.handle_item),
        settings,
        topics.consumer_group(plugin.service, "items"),
        **item_consumers(plugin),
    )
    rare: dict[str, Handler] = {
        topics.requested(plugin.stage): runtime.handle_requested,
        topics.COHORTS_DELETED: runtime.handle_cohort_deleted,
    }
    own = getattr(plugin, "subscriptions", None)
    rare.update(own(runtime.pool) if own is not None else {})
    # the group keeps the name it had when it read the requests alone: their offsets stay valid
    subscribe(
        broker,
        list(rare),
        by_topic({topic: wrap(handle) for topic, handle in rare.items()}),
        settings,
        topics.consumer_group(plugin.service, "requested"),
    )
    subscribe(
        broker,
        [topics.JOBS_CONTROL],
        wrap(runtime.handle_control),
        settings,
        None,
        fetch_max_wait_ms=settings.kafka_control_fetch_max_wait_ms,
    )


async def serve_stage(
    plugin: StagePlugin, migrations_dir: Path | None, settings: Settings | None = None
) -> None:
    """Run one stage service until SIGTERM, with `settings` (default: from the environment)."""
    settings = settings or get_settings()
    configure_logging(plugin.service, settings)
    stop = asyncio.Event()
    install_stop_signals(stop)

    pool = await create_pool(settings)
    runtime = StageRuntime(plugin, pool, settings)
    await migrate_stage_schema(pool, plugin.schema, migrations_dir)
    await asyncio.to_thread(ObjectStore(settings).ensure_buckets)

    broker = make_broker(settings, plugin.service)
    subscribe_stage(broker, plugin, runtime, settings)
    stage = plugin.stage

    relay = OutboxRelay(pool, plugin.schema, broker, settings)

    async def ready() -> bool:
        return await database_ready(pool) and bool(await broker.ping(timeout=2.0))

    health = asyncio.create_task(run_health_server(settings, ready, stop))
    await broker.start()
    await relay.start()
    warming = asyncio.create_task(warm_up(plugin))
    log.info("service started", extra={"service": plugin.service, "stage": stage.value})
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({stopping, health}, return_when=asyncio.FIRST_COMPLETED)
    if health.done() and health.exception() is not None:
        stop.set()
        log.error("health server failed; stopping", exc_info=health.exception())
    log.info("service stopping", extra={"service": plugin.service})
    warming.cancel()
    await broker.stop()
    await runtime.stop_heartbeats()
    await relay.stop()
    with contextlib.suppress(Exception):
        await health
    await pool.close()
    if health.exception() is not None:
        raise SystemExit(f"{plugin.service}: health server failed: {health.exception()}")
