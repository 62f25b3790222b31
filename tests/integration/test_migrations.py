"""Every schema's migrations against the real Postgres: the shared ones (outbox, stage runtime)
first, each applied once, and a schema whose runtime tables predate them is taken over as is."""

from __future__ import annotations

import asyncpg
import pytest

from cohortflow.migrate import SCHEMAS, migrate_all
from shared.db import create_pool
from shared.settings import Settings
from shared.stage import migrate_stage_schema

pytestmark = pytest.mark.asyncio(loop_scope="session")

# the runtime tables as services created them inline before they were migrations
_OLD_INLINE_DDL = """
CREATE SCHEMA legacy_stage;
CREATE TABLE legacy_stage.runs (job_id uuid PRIMARY KEY, cohort_id uuid NOT NULL,
    stage text NOT NULL, request jsonb NOT NULL, status text NOT NULL);
CREATE TABLE legacy_stage.run_items (job_id uuid NOT NULL REFERENCES legacy_stage.runs (job_id),
    item_key text NOT NULL, status text NOT NULL DEFAULT 'pending', PRIMARY KEY (job_id, item_key));
"""


async def test_every_schema_is_migrated_once(
    stack_settings: Settings, db_pool: asyncpg.Pool
) -> None:
    await migrate_all(stack_settings)
    again = await migrate_all(stack_settings)
    assert {k: v for k, v in again.items() if k != "topics"} == {s: [] for s in SCHEMAS}
    for schema, (_, stage) in SCHEMAS.items():
        names = {
            r["name"] for r in await db_pool.fetch(f"SELECT name FROM {schema}.schema_migrations")
        }
        assert "every_schema/001_outbox" in names
        assert ("stage/001_runtime" in names) is stage
        assert await db_pool.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{schema}.outbox")
        has_runs = await db_pool.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{schema}.runs")
        assert has_runs is stage


async def test_runtime_tables_made_before_the_migrations_are_completed(
    stack_settings: Settings, db_pool: asyncpg.Pool
) -> None:
    await db_pool.execute("DROP SCHEMA IF EXISTS legacy_stage CASCADE")
    await db_pool.execute(_OLD_INLINE_DDL)
    pool = await create_pool(stack_settings, min_size=1, max_size=2)
    try:
        applied = await migrate_stage_schema(pool, "legacy_stage", None)
    finally:
        await pool.close()
    assert applied == [
        "every_schema/001_outbox",
        "stage/001_runtime",
        "stage/002_plan_attempts",
        "stage/003_upstream_open",
    ]

    async def columns(table: str) -> set[str]:
        rows = await db_pool.fetch(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = 'legacy_stage' AND table_name = $1",
            table,
        )
        return {r["column_name"] for r in rows}

    assert "worker" in await columns("run_items")  # columns added after the tables were made
    assert {"plan_attempts", "upstream_open"} <= await columns("runs")
    await db_pool.execute("DROP SCHEMA legacy_stage CASCADE")
