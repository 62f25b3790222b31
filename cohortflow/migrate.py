"""`cohortflow migrate`: apply every service's schema migrations once (the Kubernetes migration Job).

Services also migrate their own schema at start-up; both paths call the same functions, under the
same advisory locks, so running this while services start is safe.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from shared.broker import ensure_topics
from shared.db import create_pool, migrate
from shared.settings import Settings, get_settings
from shared.stage import migrate_stage_schema

# the services that own a schema, and whether it holds a stage runtime
SERVICE_PACKAGES: tuple[tuple[str, bool], ...] = (
    ("services.gateway", False),
    ("services.anonymizer", True),
    ("services.extractor", True),
    ("services.sorter", True),
    ("services.exporter", True),
)
# schema -> (its service's package, has a stage runtime); each package names its schema (`SCHEMA`)
SCHEMAS: dict[str, tuple[str, bool]] = {
    importlib.import_module(module).SCHEMA: (module, runtime)
    for module, runtime in SERVICE_PACKAGES
}


def _migrations_dir(module: str) -> Path | None:
    package = importlib.import_module(module)
    folder = Path(package.__file__ or "").parent / "migrations"
    return folder if folder.is_dir() else None


async def migrate_all(settings: Settings | None = None) -> dict[str, list[str]]:
    settings = settings or get_settings()
    pool = await create_pool(settings, min_size=1, max_size=2)
    applied: dict[str, list[str]] = {}
    try:
        for schema, (module, runtime) in SCHEMAS.items():
            folder = _migrations_dir(module)
            if runtime:
                applied[schema] = await migrate_stage_schema(pool, schema, folder)
            else:
                applied[schema] = await migrate(pool, schema, folder)
    finally:
        await pool.close()
    applied["topics"] = await ensure_topics(settings)
    return applied
