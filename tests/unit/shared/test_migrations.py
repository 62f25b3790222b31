"""What a schema's migrations are: the shared folders' first, written once for every schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from cohortflow.migrate import SCHEMAS, _migrations_dir
from shared.db import EVERY_SCHEMA_MIGRATIONS, migration_files, migrations_of
from shared.stage import STAGE_MIGRATIONS


def test_a_stage_schema_gets_the_outbox_then_the_runtime_then_its_own() -> None:
    own = _migrations_dir("services.sorter")
    found = migrations_of("sorting", (EVERY_SCHEMA_MIGRATIONS, STAGE_MIGRATIONS), own)
    names = [name for name, _ in found]
    shared = [
        "every_schema/001_outbox",
        "stage/001_runtime",
        "stage/002_plan_attempts",
        "stage/003_upstream_open",
    ]
    assert names[: len(shared)] == shared
    assert names[len(shared) :] == [name for name, _ in migration_files(own or Path())]
    outbox, runtime = found[0][1], found[1][1]
    assert "CREATE TABLE IF NOT EXISTS sorting.outbox" in outbox
    assert "CREATE TABLE IF NOT EXISTS sorting.runs" in runtime
    assert "REFERENCES sorting.runs" in runtime and "{schema}" not in runtime
    assert "DEFAULT '{}'" in runtime, "only {schema} is a placeholder"


@pytest.mark.parametrize("schema", sorted(SCHEMAS))
def test_recorded_names_never_collide(schema: str) -> None:
    module, _ = SCHEMAS[schema]
    found = migrations_of(
        schema, (EVERY_SCHEMA_MIGRATIONS, STAGE_MIGRATIONS), _migrations_dir(module)
    )
    names = [name for name, _ in found]
    assert len(names) == len(set(names))
