"""The one settings object. Every value comes from a `COHORTFLOW_*` environment variable.

The local stack (`cohortflow stack up`) writes these variables into `<home>/stack.env` and exports them
to the services it starts, so a service, a test and the CLI all read configuration the same way.
"""

from __future__ import annotations

import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# the bucket the local stack's broker (Tansu) keeps its log in: like the data and audit buckets,
# never a source
BROKER_BUCKET = "cohortflow-broker"


def default_home() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "cohortflow"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COHORTFLOW_", extra="ignore")

    # where the local stack keeps its state (databases, broker, objects, logs, pid files)
    home: Path = Field(default_factory=default_home)

    # Postgres: one database, one schema per service
    database_url: str = "postgresql://cohortflow@127.0.0.1:5432/cohortflow"
    db_pool_min: int = 1
    db_pool_max: int = 8

    # Kafka protocol
    kafka_bootstrap: str = "127.0.0.1:9092"
    # Real Kafka needs >= 6000; the local broker wants short timeouts so group joins are quick.
    kafka_session_timeout_ms: int = 10000
    kafka_heartbeat_interval_ms: int = 3000
    kafka_max_poll_interval_ms: int = 900000
    # how long a fetch waits for new records when there are none: each stage hop (request -> plan
    # -> items -> finalize -> completion) can wait this long once. The local broker answers a fetch
    # of several partitions only when it times out (measured: a record waits ~max/2 on average), so
    # this is a hand-over's latency there; 200 against 500: a run ~1.5 s shorter, the idle stack
    # ~0.05 cores busier (ADR 0032). Real Kafka answers as soon as a record arrives.
    kafka_fetch_max_wait_ms: int = 200
    # the same for job control, off the hand-over path: a stage reads a cancel from the database
    # too (before each item, every 0.25 s within one), so this wait delays no cancel (ADR 0031)
    kafka_control_fetch_max_wait_ms: int = 5000
    kafka_partitions: int = 4
    kafka_replication_factor: int = 1

    # S3-compatible object storage (MinIO in production)
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = "cohortflow"
    s3_secret_key: SecretStr = SecretStr("cohortflow-secret")
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    data_bucket: str = "cohortflow"
    audit_bucket: str = "cohortflow-audit"

    # gateway
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    api_token: SecretStr | None = None
    # larger request bodies are refused with 413 before they are parsed; the largest legitimate
    # one is an anonymization config with an inline patient_id.csv table (at most 10 MB of text)
    api_max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # local source folders a cohort may name; anything else (but s3://) is refused
    data_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # s3:// sources a cohort may name: `s3://bucket` or `s3://bucket/prefix`, comma-separated;
    # anything else (and the system's own buckets, always) is refused
    s3_sources: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # every service serves /healthz /readyz /metrics on this port (the gateway on gateway_port)
    service_host: str = "127.0.0.1"
    service_port: int = 0

    # project secret: keys pseudonyms and new UIDs, encrypts pseudonym maps. Keep it in a Secret.
    project_secret: SecretStr = SecretStr("")

    # processing
    item_max_attempts: int = 3
    progress_interval_s: float = 1.0
    # a pipeline run streams studies through its stages (ADR 0023): a study's next stage starts
    # when it passed this one, while other studies are still in it. Off: each stage waits for the
    # whole cohort to finish the one before. Read by the run's first stage.
    stream_stages: bool = True
    # while a stage service works (an item or a plan in hand), it tells the gateway which runs it
    # is on this often; a job nobody reported on (heartbeat or progress) for `stall_after_s` is
    # marked stalled in its status reason (ADR 0019). A single long item is not a stall.
    heartbeat_interval_s: float = Field(default=15.0, gt=0)
    stall_after_s: float = Field(default=300.0, gt=0)
    outbox_poll_interval_s: float = 0.5
    # webhook deliveries: the first retry after this many seconds, doubling up to an hour; a
    # delivery that failed this many times is given up (and can be replayed through the API)
    webhook_retry_base_s: float = Field(default=5.0, gt=0)
    webhook_max_attempts: int = Field(default=8, ge=1)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # how often the gateway looks at new studies waiting for their quiet period
    study_watch_interval_s: float = Field(default=2.0, gt=0)

    # the exporter keeps the last validated tree of this many cohorts here (least recently used
    # go first) and syncs it by manifest, so the BIDS validator downloads only what changed
    export_tree_cache_dir: Path = Field(
        default_factory=lambda: Path(tempfile.gettempdir()) / "cohortflow-export-trees"
    )
    export_tree_cache_cohorts: int = Field(default=4, ge=1)

    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("api_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: object) -> object:
        # compose passes COHORTFLOW_API_TOKEN="" when none is configured: that means no auth
        return None if value in ("", None) else value

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]
        return value

    @field_validator("s3_sources", mode="before")
    @classmethod
    def _split_s3_sources(cls, value: object) -> object:
        if isinstance(value, str):
            value = [p for p in re.split(r"[,\s]+", value) if p]
        if isinstance(value, list):
            for entry in value:
                bucket = str(entry)[5:].partition("/")[0]
                if not str(entry).startswith("s3://") or not bucket:
                    raise ValueError(
                        f"COHORTFLOW_S3_SOURCES entries are s3://bucket[/prefix], not {entry!r}"
                    )
            return [str(e).rstrip("/") for e in value]
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
