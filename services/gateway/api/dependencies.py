"""What a route needs from the running gateway: the pool, the settings, the object store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import asyncpg
from fastapi import Depends, Request

from shared.settings import Settings
from shared.storage import ObjectStore


@dataclass
class GatewayContext:
    """Set on `app.state.gateway` by the app's lifespan, once its resources are up."""

    settings: Settings
    pool: asyncpg.Pool
    store: ObjectStore


def gateway_context(request: Request) -> GatewayContext:
    context: GatewayContext = request.app.state.gateway
    return context


Context = Annotated[GatewayContext, Depends(gateway_context)]
