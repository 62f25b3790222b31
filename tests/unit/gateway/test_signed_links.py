"""Signed download links: the token middleware lets exactly the signed GET through, until it expires."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from services.gateway.api import auth
from services.gateway.api.auth import sign_path, token_middleware
from shared.settings import Settings


def app_with_token(settings: Settings) -> FastAPI:
    app = FastAPI()
    app.middleware("http")(token_middleware(settings))

    @app.get("/api/files/{path:path}")
    async def file(path: str) -> dict[str, str]:
        return {"path": path}

    return app


def get(app: FastAPI, url: str) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get(url)

    return asyncio.run(go())


def test_a_signed_link_opens_without_the_token_and_only_its_own_path() -> None:
    settings = Settings(api_token=SecretStr("secret-token"))
    app = app_with_token(settings)
    link = sign_path(settings, "/api/files/sub-01/anat%20x.nii.gz")
    assert get(app, link).json() == {"path": "sub-01/anat x.nii.gz"}
    assert get(app, "/api/files/sub-01/anat%20x.nii.gz").status_code == 401
    other = link.replace("sub-01", "sub-02")
    assert get(app, other).status_code == 401
    forged = link[:-4] + "0000"
    assert get(app, forged).status_code == 401


def test_an_expired_link_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(api_token=SecretStr("secret-token"))
    app = app_with_token(settings)
    link = sign_path(settings, "/api/files/a", ttl_s=10)
    later = time.time() + 11
    monkeypatch.setattr(auth.time, "time", lambda: later)
    assert get(app, link).status_code == 401


def test_without_a_token_links_stay_plain() -> None:
    assert sign_path(Settings(api_token=None), "/api/files/a") == "/api/files/a"
