"""The S3 server of the local stack and its buckets.

`roto-server` (PyPI `roto-aws`) keeps objects on disk under the state dir and passed every `minio`
client operation we use; `moto_server` (PyPI `moto[server]`, installed with the test tools only) is
the in-memory fallback when roto is not installed. Neither checks request signatures. See docs/adr-0001-local-stack.md.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from minio import Minio
from minio.error import S3Error
from urllib3.exceptions import HTTPError as Urllib3HTTPError


class ObjectStoreError(RuntimeError):
    """The S3 server could not be found or did not come up."""


@dataclass(frozen=True)
class S3Server:
    """How to run one S3 server: its command line and whether it keeps data across restarts."""

    engine: str
    argv: list[str]
    persistent: bool


def venv_program(name: str) -> str | None:
    """`name` next to the running interpreter (an un-activated venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


# choose the engine explicitly (`roto` or `moto`); default: roto when installed
ENGINE_ENV = "COHORTFLOW_STACK_S3"


def s3_server(port: int, data_dir: Path) -> S3Server:
    """roto-server on `data_dir` when installed, else moto_server (memory only)."""
    wanted = os.environ.get(ENGINE_ENV, "").strip().lower()
    if wanted not in ("", "roto", "moto"):
        raise ObjectStoreError(f"{ENGINE_ENV}={wanted!r}: use roto or moto")
    roto = venv_program("roto-server") if wanted in ("", "roto") else None
    if wanted == "roto" and not roto:
        raise ObjectStoreError(f"{ENGINE_ENV}=roto but roto-server is not installed")
    if wanted == "moto" and not venv_program("moto_server"):
        raise ObjectStoreError(
            f"{ENGINE_ENV}=moto but moto_server is not installed: `.venv/bin/pip install"
            " 'moto[server]'` (scripts/test installs it)"
        )
    if roto:
        data_dir.mkdir(parents=True, exist_ok=True)
        return S3Server(
            engine="roto",
            argv=[roto, "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)],
            persistent=True,
        )
    moto = venv_program("moto_server")
    if moto:
        return S3Server(
            engine="moto", argv=[moto, "-H", "127.0.0.1", "-p", str(port)], persistent=False
        )
    raise ObjectStoreError(
        "no S3 server: install roto-aws (`.venv/bin/pip install roto-aws`, a dependency of the"
        " project), or for the in-memory fallback `.venv/bin/pip install 'moto[server]'`"
    )


def s3_client(endpoint: str, access_key: str, secret_key: str, region: str) -> Minio:
    """A minio client for the local (plain HTTP) endpoint."""
    return Minio(
        endpoint, access_key=access_key, secret_key=secret_key, secure=False, region=region
    )


def ensure_buckets(client: Minio, buckets: list[str], timeout: float = 30.0) -> None:
    """Create the buckets that do not exist yet, retrying while the server starts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            for bucket in buckets:
                if not client.bucket_exists(bucket):
                    client.make_bucket(bucket)
            return
        except (S3Error, Urllib3HTTPError, OSError) as exc:
            if time.monotonic() > deadline:
                raise ObjectStoreError(f"S3 server did not answer: {exc}") from exc
            time.sleep(0.1)
