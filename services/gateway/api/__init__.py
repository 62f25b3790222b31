"""The gateway's public HTTP API under `/api` (DESIGN.md §5), and how its errors look.

Errors are `{"detail": ...}`: 404 unknown ids, 409 conflicts with the current state (duplicate name,
stage order, a run in progress), 422 bad input, 401 a missing token, 503 a server-side setting
missing. Bad input never becomes a 500.
"""

from __future__ import annotations

import asyncpg
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from services.gateway.api import catalog, cohorts, jobs, studies
from services.gateway.cohorts.stage_config import StageConfigError
from services.gateway.errors import Conflict, Invalid, NotFound
from shared.secrets import SecretError


def api_router() -> APIRouter:
    router = APIRouter(prefix="/api")
    for module in (cohorts, catalog, jobs, studies):
        router.include_router(module.router)
    return router


def install_error_handlers(app: FastAPI) -> None:
    def reply(status: int, detail: object) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status)

    async def not_found(_: Request, exc: Exception) -> JSONResponse:
        return reply(404, str(exc))

    async def conflict(_: Request, exc: Exception) -> JSONResponse:
        return reply(409, str(exc))

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        return reply(422, str(exc))

    async def bad_config(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StageConfigError)
        return reply(422, exc.errors)

    async def no_secret(_: Request, exc: Exception) -> JSONResponse:
        return reply(503, f"the gateway cannot pass secrets to the stages: {exc}")

    async def unstorable(_: Request, exc: Exception) -> JSONResponse:
        # values Postgres refuses (a NUL character in a text or JSON string, out-of-range numbers)
        return reply(422, f"a value cannot be stored: {exc}")

    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(Conflict, conflict)
    app.add_exception_handler(Invalid, invalid)
    app.add_exception_handler(StageConfigError, bad_config)
    app.add_exception_handler(SecretError, no_secret)
    app.add_exception_handler(asyncpg.DataError, unstorable)
