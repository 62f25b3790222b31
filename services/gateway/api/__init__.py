"""The gateway's public HTTP API under `/api`, and how its errors look.

Every error is `{"detail": ...}` (a sentence, or for bad input possibly a list of `{loc, msg, type}`):
401 a missing token, 404 unknown ids, 409 conflicts with the current state (duplicate name, stage
order, a run in progress), 413 a body over the limit, 422 bad input, 503 with `Retry-After` when
Postgres, the broker or object storage does not answer (or a server-side setting is missing), 500
(the same shape) only for a bug. Bad input never becomes a 500. `document_errors` puts exactly these
into the OpenAPI spec (docs/adr-0018-stack-settings.md).
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import urllib3
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from services.gateway.api import (
    catalog,
    cohorts,
    config_schema,
    dead_letters,
    downloads,
    jobs,
    review,
    routing,
    studies,
    thumbnails,
    webhooks,
)
from services.gateway.errors import Conflict, Invalid, NotFound, Unavailable
from shared.db import POSTGRES_AWAY
from shared.secrets import SecretError
from shared.stage_config import StageConfigError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5
# what a request meets when Postgres is down, restarting or dropped its connection, or when a
# server (Postgres, object storage) refuses or resets the connection or does not answer in time
UNREACHABLE: tuple[type[Exception], ...] = (
    ConnectionError,  # not every OSError: a missing file is a bug here, not an outage
    *POSTGRES_AWAY,
    urllib3.exceptions.MaxRetryError,  # object storage (minio's client) refused or unresolvable
    urllib3.exceptions.ProtocolError,  # object storage dropped the connection
)


def api_router() -> APIRouter:
    router = APIRouter(prefix="/api")
    for module in (
        cohorts,
        catalog,
        jobs,
        studies,
        routing,
        webhooks,
        dead_letters,
        review,
        downloads,
        config_schema,
        thumbnails,
    ):
        router.include_router(module.router)
    return router


def install_error_handlers(app: FastAPI) -> None:
    def reply(status: int, detail: object, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    def retry_later(detail: str, seconds: int = RETRY_AFTER_S) -> JSONResponse:
        return reply(503, detail, {"Retry-After": str(seconds)})

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        # FastAPI's and Starlette's own refusals (404 no route, 405, 400 undecodable body) in the
        # same shape; a 405 names every method the path has (Starlette names one route's only)
        assert isinstance(exc, HTTPException)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return reply(exc.status_code, exc.detail, headers)

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
        # a setting of the deployment, not a passing outage: retrying soon will not help
        return retry_later(f"the gateway cannot pass secrets to the stages: {exc}", 60)

    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Unavailable)
        return retry_later(str(exc), exc.retry_after)

    async def unreachable(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, asyncpg.InterfaceError) and "clos" not in str(exc):
            return await internal(request, exc)  # misuse of a connection: a bug, not an outage
        log.warning(
            "a server the gateway needs did not answer",
            extra={"path": request.url.path, "error": f"{type(exc).__name__}: {exc}"[:300]},
        )
        return retry_later(
            "a server the gateway needs (the database or object storage) is unreachable"
            f" ({type(exc).__name__}); retry later"
        )

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc, extra={"path": request.url.path})
        return reply(500, "internal error; the gateway's log has the details")

    async def unstorable(_: Request, exc: Exception) -> JSONResponse:
        # values Postgres refuses (a NUL character in a text or JSON string, out-of-range numbers)
        return reply(422, f"a value cannot be stored: {exc}")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(Conflict, conflict)
    app.add_exception_handler(Invalid, invalid)
    app.add_exception_handler(StageConfigError, bad_config)
    app.add_exception_handler(SecretError, no_secret)
    app.add_exception_handler(asyncpg.DataError, unstorable)
    app.add_exception_handler(Unavailable, unavailable)
    for kind in UNREACHABLE:
        app.add_exception_handler(kind, unreachable)
    app.add_exception_handler(Exception, internal)


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """The methods some route fully matches for this path (asked per method, so routes of
    included routers count too)."""
    allowed = []
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


# ---- the errors in the OpenAPI spec ---------------------------------------------------------------
_VALIDATION_ISSUE = {
    "title": "ValidationIssue",
    "type": "object",
    "required": ["loc", "msg", "type"],
    "properties": {
        "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
        "msg": {"type": "string"},
        "type": {"type": "string"},
    },
}
_ERROR = {
    "title": "Error",
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"$ref": "#/components/schemas/ValidationIssue"}},
            ],
            "description": "what went wrong, for a person; for bad input possibly one entry "
            "per problem",
        }
    },
}
_WRITES = {"post", "put", "patch", "delete"}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if headers:
        response["headers"] = headers
    return response


def error_responses(method: str, operation: dict[str, Any], token: bool) -> dict[str, Any]:
    """The error responses an operation can give, each in the `Error` shape."""
    params = operation.get("parameters", [])
    body = "requestBody" in operation
    found: dict[str, Any] = {}
    if token:
        found["401"] = _error(
            "missing or wrong API token",
            {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
        )
    if any(p.get("in") == "path" for p in params):
        found["404"] = _error("no such cohort, job, export or file")
    if method in _WRITES:
        found["409"] = _error(
            "the request clashes with the current state (a duplicate name, stage order, "
            "a run in progress, a job that has ended)"
        )
    if body:
        found["400"] = _error("the body cannot be decoded (not UTF-8 JSON)")
        found["413"] = _error("the request body is larger than COHORTFLOW_API_MAX_BODY_BYTES")
    if params or body:
        found["422"] = _error("the input is not acceptable; `detail` says why")
    found["503"] = _error(
        "a server the gateway needs (database, broker, object storage) does not answer, or a "
        "server-side setting is missing; retry after `Retry-After` seconds",
        {"Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 0}}},
    )
    return found


# how a response's ids lead to further operations (OpenAPI links: clients and stateful testers follow
# them from a created cohort to its runs and jobs)
_COHORT_OPS = {
    "getCohort": ("get", "/api/cohorts/{cohort_id}"),
    "updateCohort": ("patch", "/api/cohorts/{cohort_id}"),
    "deleteCohort": ("delete", "/api/cohorts/{cohort_id}"),
    "runPipeline": ("post", "/api/cohorts/{cohort_id}/pipeline"),
    "runStage": ("post", "/api/cohorts/{cohort_id}/stages/{stage}/run"),
    "cohortJobs": ("get", "/api/cohorts/{cohort_id}/jobs"),
    "cohortSeries": ("get", "/api/cohorts/{cohort_id}/series"),
}
_JOB_OPS = {
    "getJob": ("get", "/api/jobs/{job_id}"),
    "jobEvents": ("get", "/api/jobs/{job_id}/events"),
    "cancelJob": ("post", "/api/jobs/{job_id}/cancel"),
}
_LINKS = {
    ("post", "/api/cohorts", "201"): (_COHORT_OPS, "cohort_id", "$response.body#/id"),
    ("post", "/api/cohorts/{cohort_id}/pipeline", "202"): (
        _JOB_OPS,
        "job_id",
        "$response.body#/jobs/0/id",
    ),
    ("post", "/api/cohorts/{cohort_id}/stages/{stage}/run", "202"): (
        _JOB_OPS,
        "job_id",
        "$response.body#/id",
    ),
}


def _add_links(spec: dict[str, Any]) -> None:
    paths = spec.get("paths", {})
    for (method, path, code), (targets, parameter, value) in _LINKS.items():
        response = paths.get(path, {}).get(method, {}).get("responses", {}).get(code)
        if response is None:
            continue
        links = response.setdefault("links", {})
        for name, (target_method, target_path) in targets.items():
            target = paths.get(target_path, {}).get(target_method)
            if target is not None:
                links[name] = {
                    "operationId": target["operationId"],
                    "parameters": {parameter: value},
                }


def document_errors(app: FastAPI, token: bool) -> None:
    """Make `app.openapi()` list every error each `/api` operation can answer, with its real body
    (and the bearer token when one is configured)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas["Error"] = _ERROR
        schemas["ValidationIssue"] = _VALIDATION_ISSUE
        # FastAPI's own 422 shape is one case of `Error`
        schemas.pop("HTTPValidationError", None)
        for path, item in spec.get("paths", {}).items():
            if not path.startswith("/api"):
                continue
            for method, operation in item.items():
                responses = operation.setdefault("responses", {})
                for code, response in error_responses(method, operation, token).items():
                    responses[code] = response
        _add_links(spec)
        if token:
            spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            spec["security"] = [{"bearer": []}]
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
