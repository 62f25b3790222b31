"""One logging setup, one metrics registry, and the health routes every service serves.

Logs are key=value lines for people (or JSON lines with `COHORTFLOW_LOG_JSON=true` for collectors).
No log line may carry an identifying value: log ids, keys and counts, never DICOM header values.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from shared.settings import Settings, get_settings

REGISTRY = CollectorRegistry(auto_describe=True)

ITEMS_PROCESSED = Counter(
    "cohortflow_items_total",
    "Work items processed, by stage and outcome",
    ["stage", "outcome"],
    registry=REGISTRY,
)
ITEM_SECONDS = Histogram(
    "cohortflow_item_seconds",
    "Time to process one work item",
    ["stage"],
    registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
FILES_PROCESSED = Counter(
    "cohortflow_files_total",
    "Files handled by a stage, by outcome",
    ["stage", "outcome"],
    registry=REGISTRY,
)
RUNS_ACTIVE = Gauge("cohortflow_runs_active", "Runs in progress", ["stage"], registry=REGISTRY)
HTTP_REQUESTS = Counter(
    "cohortflow_http_requests_total",
    "HTTP requests served",
    ["method", "route", "status"],
    registry=REGISTRY,
)

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class _Formatter(logging.Formatter):
    def __init__(self, service: str, as_json: bool) -> None:
        super().__init__()
        self._service = service
        self._json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")
        }
        if self._json:
            doc = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                "level": record.levelname.lower(),
                "service": self._service,
                "logger": record.name,
                "message": record.getMessage(),
                **fields,
            }
            if record.exc_info:
                doc["exc"] = self.formatException(record.exc_info)
            return json.dumps(doc, default=str)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{stamp} {record.levelname:<7} {self._service} {record.getMessage()}"
        if extra:
            line += f"  {extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(service: str, settings: Settings | None = None) -> None:
    """Route every logger of the process to stderr in the one format."""
    settings = settings or get_settings()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(service, settings.log_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for noisy in ("aiokafka", "kafka", "botocore", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def health_router(ready: Callable[[], Awaitable[bool]]) -> APIRouter:
    """`/healthz` (the process answers), `/readyz` (its dependencies answer), `/metrics`."""
    router = APIRouter(include_in_schema=False)

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz(response: Response) -> dict[str, str]:
        try:
            ok = await ready()
        except Exception:
            ok = False
        if not ok:
            response.status_code = 503
            return {"status": "not ready"}
        return {"status": "ready"}

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router
