"""Postgres access: the asyncpg pool and per-schema migrations.

One database, one schema per service. A service owns its schema and migrates it at start-up with
`migrate(pool, schema, migrations_dir)`: numbered `NNN_name.sql` files applied in order, each in its
own transaction, under an advisory lock so that replicas starting together do not race. Before its
own, every schema gets the shared migrations of `shared/migrations/every_schema/` (the transactional
outbox, `shared.outbox`), and a stage service's schema those of `shared/migrations/stage/` (the stage
runtime's tables, `shared.stage`): files written once with `{schema}` for the schema's name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

# asyncpg's ways of saying Postgres is away, restarting, full or dropped the connection
POSTGRES_AWAY: tuple[type[Exception], ...] = (
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,  # "connection is closed", "pool is closing"
)
# what a database call meets while Postgres is away: worth trying again later, and no fault of the
# data being written (OSError: ConnectionRefusedError, ConnectionResetError, ...)
UNREACHABLE: tuple[type[Exception], ...] = (OSError, *POSTGRES_AWAY)


def unreachable(exc: BaseException) -> bool:
    """True when `exc` says the database is away, not that the values sent are wrong (asyncpg's
    client-side `DataError`, a value it cannot encode, is an `InterfaceError` too)."""
    return isinstance(exc, UNREACHABLE) and not isinstance(exc, ValueError)


_MIGRATION_NAME = re.compile(r"^(\d{3,})_[\w-]+\.sql$")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")

# migrations every schema gets before its own (the outbox), recorded as `every_schema/NNN_name`
EVERY_SCHEMA_MIGRATIONS = Path(__file__).with_name("migrations") / "every_schema"


class JsonText(str):
    """A value already serialized as JSON: written to json/jsonb columns as it is."""


def json_bytes(value: Any) -> bytes:
    """Compact JSON of `value` (orjson; NaN and infinities become null, as JSON has neither).
    Integers beyond 64 bits, which orjson refuses, go through the standard library."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


def json_text(value: Any) -> JsonText:
    """`value` serialized once, to be written to a json/jsonb column later (or in another process)."""
    return JsonText(json_bytes(value).decode())


def _json_text(value: Any) -> bytes:
    if isinstance(value, JsonText):
        return value.encode()
    return json_bytes(value)


def _jsonb_encode(value: Any) -> bytes:
    return b"\x01" + _json_text(value)


def _jsonb_decode(data: bytes) -> Any:
    return orjson.loads(data[1:])  # binary jsonb is a version byte, then the JSON text


async def _init_connection(conn: asyncpg.Connection) -> None:
    # binary codecs, so that COPY (which is binary in asyncpg) can load json columns too
    await conn.set_type_codec(
        "jsonb", encoder=_jsonb_encode, decoder=_jsonb_decode, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec(
        "json",
        encoder=_json_text,
        decoder=orjson.loads,
        schema="pg_catalog",
        format="binary",
    )


async def create_pool(settings: Settings | None = None, **overrides: Any) -> asyncpg.Pool:
    """A connection pool with json/jsonb mapped to Python dicts and lists."""
    settings = settings or get_settings()
    options: dict[str, Any] = {
        "dsn": settings.database_url,
        "min_size": settings.db_pool_min,
        "max_size": settings.db_pool_max,
        "init": _init_connection,
        "command_timeout": 120,
    }
    options.update(overrides)
    pool = await asyncpg.create_pool(**options)
    assert pool is not None
    return pool


def _lock_id(schema: str) -> int:
    digest = hashlib.sha256(f"cohortflow-migrate:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def migration_files(migrations_dir: Path) -> list[tuple[str, Path]]:
    """The `NNN_name.sql` files of a folder, in order; anything else there is an error."""
    found: list[tuple[str, Path]] = []
    for path in sorted(migrations_dir.glob("*.sql")):
        if not _MIGRATION_NAME.match(path.name):
            raise ValueError(f"migration file name must look like 001_name.sql: {path}")
        found.append((path.stem, path))
    return found


def migrations_of(
    schema: str, shared: tuple[Path, ...], migrations_dir: Path | None
) -> list[tuple[str, str]]:
    """(recorded name, SQL) of every migration of a schema, in order: the shared folders' first."""
    found = [
        (f"{folder.name}/{name}", path.read_text().replace("{schema}", schema))
        for folder in shared
        for name, path in migration_files(folder)
    ]
    own = migration_files(migrations_dir) if migrations_dir else []
    return found + [(name, path.read_text()) for name, path in own]


async def migrate(
    pool: asyncpg.Pool,
    schema: str,
    migrations_dir: Path | None,
    shared: tuple[Path, ...] = (EVERY_SCHEMA_MIGRATIONS,),
) -> list[str]:
    """Create `schema` and apply its pending migrations, the `shared` folders' first (their
    `{schema}` replaced by the schema's name); returns the ones applied."""
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"bad schema name {schema!r}")
    applied: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _lock_id(schema))
        try:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            await conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                        name text PRIMARY KEY,
                        applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {
                r["name"] for r in await conn.fetch(f"SELECT name FROM {schema}.schema_migrations")
            }
            for name, sql in migrations_of(schema, shared, migrations_dir):
                if name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        f"INSERT INTO {schema}.schema_migrations (name) VALUES ($1)", name
                    )
                applied.append(name)
                log.info("migration applied", extra={"schema": schema, "migration": name})
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _lock_id(schema))
    return applied


async def relation_exists(
    conn: asyncpg.Connection, qualified_name: str, seen: set[str] | None = None
) -> bool:
    """Whether a table or view exists (views of other services may not be there yet). `seen`: the
    caller's relations found to exist before, not asked again (a relation, once there, stays; one
    not there yet is asked again next time)."""
    if seen is not None and qualified_name in seen:
        return True
    exists = bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", qualified_name))
    if exists and seen is not None:
        seen.add(qualified_name)
    return exists
