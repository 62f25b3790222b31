"""What a route needs from the running gateway: the pool, the settings, the object store, and
whether the broker answers."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated

import asyncpg
from fastapi import Depends, Request

from services.gateway.errors import Unavailable
from services.gateway.job_watch import JobWatch
from shared.settings import Settings
from shared.storage import ObjectStore


class BrokerProbe:
    """Whether the broker answers, asked at most every `ttl` seconds (a request that publishes
    must not wait for a ping each time)."""

    def __init__(self, ping: Callable[[], Awaitable[bool]], ttl: float = 2.0) -> None:
        self._ping = ping
        self._ttl = ttl
        self._checked = -float("inf")
        self._reachable = True

    async def reachable(self) -> bool:
        now = time.monotonic()
        if now - self._checked >= self._ttl:
            try:
                self._reachable = bool(await self._ping())
            except Exception:
                self._reachable = False
            self._checked = time.monotonic()
        return self._reachable


async def _always() -> bool:
    return True


@dataclass
class GatewayContext:
    """Set on `app.state.gateway` by the app's lifespan, once its resources are up."""

    settings: Settings
    pool: asyncpg.Pool
    store: ObjectStore
    broker: BrokerProbe = field(default_factory=lambda: BrokerProbe(_always))
    # wakes requests held until a run's jobs change; None: such requests answer at once
    job_watch: JobWatch | None = None


def gateway_context(request: Request) -> GatewayContext:
    context: GatewayContext = request.app.state.gateway
    return context


async def publishing_context(request: Request) -> GatewayContext:
    """The context of a request that starts or stops work: refused with 503 while the broker does
    not answer, rather than accepted into an outbox nobody can deliver."""
    context = gateway_context(request)
    if not await context.broker.reachable():
        raise Unavailable("the message broker is unreachable; retry later")
    return context


Context = Annotated[GatewayContext, Depends(gateway_context)]
# routes that publish (run, pipeline, cancel, delete, new study) take this instead of `Context`
Publishing = Annotated[GatewayContext, Depends(publishing_context)]
