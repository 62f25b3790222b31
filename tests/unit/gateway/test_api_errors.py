"""The API's error plumbing without servers: which errors the spec lists, the body cap, the broker
probe, and how unreachable servers and bugs are answered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
from fastapi import FastAPI
from pydantic import BaseModel

from services.gateway.api import error_responses, install_error_handlers
from services.gateway.api.dependencies import BrokerProbe
from services.gateway.api.limits import BodyLimit
from services.gateway.errors import Unavailable


class Body(BaseModel):
    name: str


def small_app(max_bytes: int = 100) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(body: Body) -> Body:
        return body

    @app.get("/db-down")
    async def db_down() -> None:
        raise ConnectionRefusedError(111, "Connect call failed")

    @app.get("/pg-closed")
    async def pg_closed() -> None:
        raise asyncpg.InterfaceError("connection is closed")

    @app.get("/pg-misuse")
    async def pg_misuse() -> None:
        raise asyncpg.InterfaceError("cannot perform operation: another operation is in progress")

    @app.get("/broker-down")
    async def broker_down() -> None:
        raise Unavailable("the message broker is unreachable; retry later")

    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    return app


async def call(app: FastAPI, method: str, path: str, **kwargs: object) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        return await client.request(method, path, **kwargs)  # type: ignore[arg-type]


def test_the_spec_lists_what_each_kind_of_operation_can_answer() -> None:
    read_one: dict[str, Any] = {"parameters": [{"in": "path", "name": "cohort_id"}]}
    assert set(error_responses("get", read_one, token=True)) == {"401", "404", "422", "503"}
    assert set(error_responses("get", {}, token=False)) == {"503"}
    create: dict[str, Any] = {"requestBody": {}}
    assert set(error_responses("post", create, token=False)) == {
        "400", "409", "413", "422", "503",
    }  # fmt: skip
    unavailable = error_responses("get", {}, token=False)["503"]
    assert unavailable["headers"]["Retry-After"]["required"] is True
    schema = unavailable["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/Error"}


def test_a_declared_body_over_the_cap_is_413_before_reading() -> None:
    response = asyncio.run(
        call(small_app(), "POST", "/echo", content=b"x" * 1000,
             headers={"content-type": "application/json"})
    )  # fmt: skip
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/json"
    assert "at most 100 bytes" in response.json()["detail"]


def test_a_chunked_body_over_the_cap_is_413_and_one_under_it_passes() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 50

    over = asyncio.run(
        call(small_app(), "POST", "/echo", content=chunks(),
             headers={"content-type": "application/json"})
    )  # fmt: skip
    assert over.status_code == 413 and "too large" in over.json()["detail"]
    fine = asyncio.run(call(small_app(), "POST", "/echo", json={"name": "a"}))
    assert fine.status_code == 200 and fine.json() == {"name": "a"}


def test_unreachable_servers_are_503_with_retry_after_and_bugs_500() -> None:
    app = small_app()
    for path in ("/db-down", "/pg-closed", "/broker-down"):
        response = asyncio.run(call(app, "GET", path))
        assert response.status_code == 503, path
        assert int(response.headers["retry-after"]) > 0
        assert isinstance(response.json()["detail"], str)
    bug = asyncio.run(call(app, "GET", "/pg-misuse"))
    assert bug.status_code == 500 and "internal error" in bug.json()["detail"]


def test_the_broker_probe_asks_at_most_once_per_ttl() -> None:
    asked: list[int] = []
    answers = iter([False, True])

    async def ping() -> bool:
        asked.append(1)
        return next(answers)

    async def scenario() -> list[bool]:
        probe = BrokerProbe(ping, ttl=0.2)
        seen = [await probe.reachable(), await probe.reachable()]
        await asyncio.sleep(0.25)
        return [*seen, await probe.reachable()]

    assert asyncio.run(scenario()) == [False, False, True]
    assert len(asked) == 2


def test_a_failing_ping_counts_as_unreachable() -> None:
    async def ping() -> bool:
        raise OSError("connection refused")

    assert asyncio.run(BrokerProbe(ping).reachable()) is False
