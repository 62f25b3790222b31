"""Bearer-token protection of `/api` when `COHORTFLOW_API_TOKEN` is set.

Health, metrics and the web page's static files stay open (the page asks for the token itself).
The comparison is constant-time so the token cannot be guessed byte by byte from response times.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from shared.settings import Settings

Middleware = Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]


def token_middleware(settings: Settings) -> Middleware:
    expected = settings.api_token.get_secret_value().encode() if settings.api_token else None

    async def check_token(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        if expected and (path == "/api" or path.startswith("/api/")):
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), expected
            ):
                return JSONResponse(
                    {"detail": "missing or wrong API token: send 'Authorization: Bearer <token>'"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)

    return check_token
