"""The exporter's SQL: the views it reads (catalog, sorting) and the `export` schema it owns.

Reads go only through the views other services publish (`catalog.stack_summary_v`,
`catalog.instance_v`, `catalog.study_v`, `sorting.classification_v`), always filtered by cohort.
Writes are upserts keyed by job and natural ids, so a redelivered item rewrites the same rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.exporter.selection import CLASSIFICATION_FIELDS


@dataclass(frozen=True)
class SourceInstance:
    """One DICOM instance of a stack, as `catalog.instance_v` lists it."""

    sop_instance_uid: str
    object_key: str
    sha256: str
    size: int
    series_instance_uid: str = ""
    instance_number: int | None = None


@dataclass(frozen=True)
class ManifestRow:
    """One file of an export (a row of `export.manifest`)."""

    path: str
    object_key: str
    kind: str
    size: int
    sha256: str
    series_instance_uid: str | None = None
    stack_key: str | None = None
    source_sop_instance_uids: list[str] | None = None
    classification: dict[str, Any] | None = None
    tool: str | None = None
    tool_version: str | None = None


_MANIFEST_COLUMNS = (
    "path", "object_key", "kind", "size", "sha256", "series_instance_uid", "stack_key",
    "source_sop_instance_uids", "classification", "tool", "tool_version",
)  # fmt: skip


def _manifest_row(record: asyncpg.Record) -> ManifestRow:
    values = {c: record[c] for c in _MANIFEST_COLUMNS}
    if values["source_sop_instance_uids"] is not None:
        values["source_sop_instance_uids"] = list(values["source_sop_instance_uids"])
    return ManifestRow(**values)


# --- inputs (other services' views) -----------------------------------------------------------


async def cohort_stacks(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> list[asyncpg.Record]:
    """Every stack of the cohort with its current classification (columns NULL when unsorted)."""
    columns = ", ".join(f"c.{f}" for f in CLASSIFICATION_FIELDS)
    return list(
        await conn.fetch(
            "SELECT s.series_instance_uid, s.stack_key, s.summary, s.sop_instance_uids,"
            f" s.study_instance_uid, s.subject_id, c.stack_key IS NOT NULL AS classified, {columns}"
            " FROM catalog.stack_summary_v s LEFT JOIN sorting.classification_v c"
            " ON c.cohort_id = s.cohort_id AND c.series_instance_uid = s.series_instance_uid"
            " AND c.stack_key = s.stack_key"
            " WHERE s.cohort_id = $1 ORDER BY s.study_instance_uid, s.series_instance_uid, s.stack_key",
            cohort_id,
        )
    )


async def cohort_studies(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT study_instance_uid, subject_id, study_date, study_time, timepoint"
            " FROM catalog.study_v"
            " WHERE cohort_id = $1",
            cohort_id,
        )
    )


async def cohort_instances(
    conn: asyncpg.Connection, cohort_id: uuid.UUID
) -> dict[str, SourceInstance]:
    """Where the bytes of every instance of the cohort are, by SOP Instance UID."""
    rows = await conn.fetch(
        "SELECT sop_instance_uid, object_key, sha256, size, series_instance_uid, instance_number"
        " FROM catalog.instance_v WHERE cohort_id = $1"
        " ORDER BY series_instance_uid, instance_number NULLS LAST, sop_instance_uid",
        cohort_id,
    )
    return {r["sop_instance_uid"]: SourceInstance(**dict(r)) for r in rows}


# --- the plan -----------------------------------------------------------------------------------


async def save_plan(conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Upsert planned stacks: (job_id, cohort_id, series, stack_key, base_path, stack, sources,
    classification, not_exported_reason, problem)."""
    await conn.executemany(
        "INSERT INTO export.planned_stack (job_id, cohort_id, series_instance_uid, stack_key, base_path,"
        " stack, sources, classification, not_exported_reason, problem)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        " ON CONFLICT (job_id, series_instance_uid, stack_key) DO UPDATE SET"
        " base_path = EXCLUDED.base_path, stack = EXCLUDED.stack, sources = EXCLUDED.sources,"
        " classification = EXCLUDED.classification,"
        " not_exported_reason = EXCLUDED.not_exported_reason, problem = EXCLUDED.problem",
        rows,
    )


async def planned_stack(
    conn: asyncpg.Connection, job_id: uuid.UUID, series_uid: str, stack_key: str
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT * FROM export.planned_stack WHERE job_id = $1 AND series_instance_uid = $2"
        " AND stack_key = $3",
        job_id,
        series_uid,
        stack_key,
    )
    return row


async def not_exported(conn: asyncpg.Connection, job_id: uuid.UUID) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT series_instance_uid, stack_key, not_exported_reason FROM export.planned_stack"
            " WHERE job_id = $1 AND not_exported_reason IS NOT NULL"
            " ORDER BY series_instance_uid, stack_key",
            job_id,
        )
    )


async def review_required_planned(conn: asyncpg.Connection, job_id: uuid.UUID) -> int:
    """Stacks named for export although the sorter asked for a review of their classification."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM export.planned_stack WHERE job_id = $1 AND base_path IS NOT NULL"
        " AND (classification ->> 'review_required')::boolean",
        job_id,
    )
    return count


# --- stacks and their files ---------------------------------------------------------------------


async def reusable_export(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, job_id: uuid.UUID, fingerprint: str
) -> tuple[asyncpg.Record, list[ManifestRow]] | None:
    """An earlier export of this cohort with the same fingerprint, and its stack's files."""
    earlier = await conn.fetchrow(
        "SELECT * FROM export.stack_export WHERE cohort_id = $1 AND fingerprint = $2"
        " AND job_id <> $3 AND status IN ('exported', 'reused') ORDER BY updated_at DESC LIMIT 1",
        cohort_id,
        fingerprint,
        job_id,
    )
    if earlier is None:
        return None
    files = await conn.fetch(
        f"SELECT {', '.join(_MANIFEST_COLUMNS)} FROM export.manifest WHERE job_id = $1"
        " AND series_instance_uid = $2 AND stack_key = $3 ORDER BY path",
        earlier["job_id"],
        earlier["series_instance_uid"],
        earlier["stack_key"],
    )
    return earlier, [_manifest_row(f) for f in files]


async def save_stack(
    conn: asyncpg.Connection,
    *,
    job_id: uuid.UUID,
    cohort_id: uuid.UUID,
    series_uid: str,
    stack_key: str,
    base_path: str,
    fingerprint: str,
    status: str,
    record: dict[str, Any] | None,
    files: Sequence[ManifestRow],
    tool: str | None = None,
    tool_version: str | None = None,
    error: str | None = None,
    reused_from: uuid.UUID | None = None,
) -> None:
    """Record what a stack became and replace its manifest rows in this job, in one transaction."""
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO export.stack_export (job_id, cohort_id, series_instance_uid, stack_key, base_path,"
            " fingerprint, status, reused_from, record, tool, tool_version, error)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            " ON CONFLICT (job_id, series_instance_uid, stack_key) DO UPDATE SET"
            " base_path = EXCLUDED.base_path, fingerprint = EXCLUDED.fingerprint,"
            " status = EXCLUDED.status, reused_from = EXCLUDED.reused_from, record = EXCLUDED.record,"
            " tool = EXCLUDED.tool, tool_version = EXCLUDED.tool_version, error = EXCLUDED.error,"
            " updated_at = now()",
            job_id, cohort_id, series_uid, stack_key, base_path, fingerprint, status, reused_from,
            record, tool, tool_version, error,
        )  # fmt: skip
        await conn.execute(
            "DELETE FROM export.manifest WHERE job_id = $1 AND series_instance_uid = $2"
            " AND stack_key = $3",
            job_id,
            series_uid,
            stack_key,
        )
        await upsert_manifest(conn, job_id, cohort_id, files)


async def upsert_manifest(
    conn: asyncpg.Connection, job_id: uuid.UUID, cohort_id: uuid.UUID, rows: Sequence[ManifestRow]
) -> None:
    """Insert or replace manifest rows by path; a row without a stack keeps the stack it had."""
    columns = ", ".join(_MANIFEST_COLUMNS)
    params = ", ".join(f"${i}" for i in range(3, len(_MANIFEST_COLUMNS) + 3))
    keep = ("series_instance_uid", "stack_key", "source_sop_instance_uids", "classification",
            "tool", "tool_version")  # fmt: skip
    updates = ", ".join(
        f"{c} = COALESCE(EXCLUDED.{c}, export.manifest.{c})" if c in keep else f"{c} = EXCLUDED.{c}"
        for c in _MANIFEST_COLUMNS
        if c != "path"
    )
    await conn.executemany(
        f"INSERT INTO export.manifest (job_id, cohort_id, {columns}) VALUES ($1, $2, {params})"
        f" ON CONFLICT (job_id, path) DO UPDATE SET {updates}",
        [(job_id, cohort_id, *(getattr(r, c) for c in _MANIFEST_COLUMNS)) for r in rows],
    )


async def exported_records(conn: asyncpg.Connection, job_id: uuid.UUID) -> list[asyncpg.Record]:
    """The stacks of a job that have outputs (exported or reused), in base-path order."""
    return list(
        await conn.fetch(
            "SELECT series_instance_uid, stack_key, status, record, reused_from"
            " FROM export.stack_export WHERE job_id = $1 AND status IN ('exported', 'reused')"
            " ORDER BY base_path",
            job_id,
        )
    )


async def failed_stacks(conn: asyncpg.Connection, job_id: uuid.UUID) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT series_instance_uid, stack_key, base_path, error FROM export.stack_export"
            " WHERE job_id = $1 AND status = 'failed' ORDER BY base_path",
            job_id,
        )
    )


async def manifest(conn: asyncpg.Connection, job_id: uuid.UUID) -> list[ManifestRow]:
    rows = await conn.fetch(
        f"SELECT {', '.join(_MANIFEST_COLUMNS)} FROM export.manifest WHERE job_id = $1 ORDER BY path",
        job_id,
    )
    return [_manifest_row(r) for r in rows]


async def object_with_content(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, path: str, sha256: str
) -> str | None:
    """An object of an earlier export of the cohort holding exactly this file at this path."""
    key: str | None = await conn.fetchval(
        "SELECT object_key FROM export.manifest WHERE cohort_id = $1 AND path = $2 AND sha256 = $3"
        " ORDER BY created_at LIMIT 1",
        cohort_id,
        path,
        sha256,
    )
    return key
