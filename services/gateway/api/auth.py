"""Bearer-token protection of `/api` when `COHORTFLOW_API_TOKEN` is set, and signed download links.

Health, metrics and the web page's static files stay open (the page asks for the token itself).
The comparison is constant-time so the token cannot be guessed byte by byte from response times.

A browser cannot put a header on a link opened in a new tab or on an `<img>`: for those, a holder
of the token gets a short-lived signed link (`sign_path`, `POST /api/download-links`), a GET of
exactly that path with `expires` and `signature` in the query, an HMAC keyed with the token.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from shared.settings import Settings

Middleware = Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]
LINK_TTL_S = 3600


def _signature(key: bytes, path: str, expires: int) -> str:
    message = f"GET\n{path}\n{expires}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _key(settings: Settings) -> bytes | None:
    return settings.api_token.get_secret_value().encode() if settings.api_token else None


def sign_path(settings: Settings, path: str, ttl_s: int = LINK_TTL_S) -> str:
    """`path` (URL-quoted as it goes on the wire) as a link a browser can open without the token
    for `ttl_s` seconds; unchanged when the API has no token."""
    key = _key(settings)
    if key is None:
        return path
    expires = int(time.time()) + ttl_s
    return f"{path}?expires={expires}&signature={_signature(key, unquote(path), expires)}"


def _signed_ok(key: bytes, request: Request) -> bool:
    if request.method not in ("GET", "HEAD"):
        return False
    given = request.query_params.get("signature", "")
    try:
        expires = int(request.query_params.get("expires", ""))
    except ValueError:
        return False
    if expires < time.time():
        return False
    expected = _signature(key, request.scope["path"], expires)
    return hmac.compare_digest(given.encode(), expected.encode())


def token_middleware(settings: Settings) -> Middleware:
    expected = _key(settings)

    async def check_token(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        if expected and (path == "/api" or path.startswith("/api/")):
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if (
                scheme.lower() != "bearer"
                or not hmac.compare_digest(given.strip().encode(), expected)
            ) and not _signed_ok(expected, request):
                return JSONResponse(
                    {"detail": "missing or wrong API token: send 'Authorization: Bearer <token>'"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)

    return check_token
