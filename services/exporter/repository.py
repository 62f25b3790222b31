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


async def cohort_stacks(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, studies: Sequence[str] | None = None
) -> list[asyncpg.Record]:
    """Every stack of the cohort (or of these studies) with its current classification (columns
    NULL when unsorted)."""
    columns = ", ".join(f"c.{f}" for f in CLASSIFICATION_FIELDS)
    scope = "" if studies is None else " AND s.study_instance_uid = ANY($2::text[])"
    return list(
        await conn.fetch(
            "SELECT s.series_instance_uid, s.stack_key, s.summary, s.sop_instance_uids,"
            f" s.study_instance_uid, s.subject_id, c.stack_key IS NOT NULL AS classified, {columns}"
            " FROM catalog.stack_summary_v s LEFT JOIN sorting.classification_v c"
            " ON c.cohort_id = s.cohort_id AND c.series_instance_uid = s.series_instance_uid"
            " AND c.stack_key = s.stack_key"
            f" WHERE s.cohort_id = $1{scope}"
            " ORDER BY s.study_instance_uid, s.series_instance_uid, s.stack_key",
            cohort_id,
            *([] if studies is None else [list(studies)]),
        )
    )


async def cohort_studies(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, subjects: Sequence[str] | None = None
) -> list[asyncpg.Record]:
    """The cohort's studies (or those of these catalog subjects)."""
    scope = "" if subjects is None else " AND subject_id = ANY($2::text[])"
    return list(
        await conn.fetch(
            "SELECT study_instance_uid, subject_id, study_date, study_time, timepoint"
            f" FROM catalog.study_v WHERE cohort_id = $1{scope}",
            cohort_id,
            *([] if subjects is None else [list(subjects)]),
        )
    )


async def subjects_of_studies(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, studies: Sequence[str]
) -> set[str]:
    """The catalog subjects these studies belong to (the studies the catalog does not hold add none)."""
    rows = await conn.fetch(
        "SELECT DISTINCT subject_id FROM catalog.study_v"
        " WHERE cohort_id = $1 AND study_instance_uid = ANY($2::text[])",
        cohort_id,
        list(studies),
    )
    return {r["subject_id"] for r in rows}


async def cohort_instances(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, series: Sequence[str] | None = None
) -> dict[str, SourceInstance]:
    """Where the bytes of every instance of the cohort (or of these series) are, by SOP Instance
    UID."""
    scope = "" if series is None else " AND series_instance_uid = ANY($2::text[])"
    rows = await conn.fetch(
        "SELECT sop_instance_uid, object_key, sha256, size, series_instance_uid, instance_number"
        f" FROM catalog.instance_v WHERE cohort_id = $1{scope}"
        " ORDER BY series_instance_uid, instance_number NULLS LAST, sop_instance_uid",
        cohort_id,
        *([] if series is None else [list(series)]),
    )
    # positionally: the columns are the fields, in order (a cohort has thousands of instances)
    return {r[0]: SourceInstance(*r) for r in rows}


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


async def manifest_at(
    conn: asyncpg.Connection, job_id: uuid.UUID, paths: Sequence[str]
) -> list[ManifestRow]:
    """The job's manifest rows at these paths."""
    rows = await conn.fetch(
        f"SELECT {', '.join(_MANIFEST_COLUMNS)} FROM export.manifest"
        " WHERE job_id = $1 AND path = ANY($2::text[]) ORDER BY path",
        job_id,
        list(paths),
    )
    return [_manifest_row(r) for r in rows]


# --- the tree: what an export holds, and what a scoped export carries from the previous one ------


async def save_tree(
    conn: asyncpg.Connection,
    job_id: uuid.UUID,
    cohort_id: uuid.UUID,
    options: dict[str, Any],
    subjects: Sequence[str] | None,
) -> None:
    """The job's tree options and the subjects it plans (None: the whole cohort)."""
    await conn.execute(
        "INSERT INTO export.tree (job_id, cohort_id, options, subjects) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (job_id) DO UPDATE SET options = EXCLUDED.options,"
        " subjects = EXCLUDED.subjects",
        job_id,
        cohort_id,
        options,
        None if subjects is None else list(subjects),
    )


async def tree(conn: asyncpg.Connection, job_id: uuid.UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT * FROM export.tree WHERE job_id = $1", job_id
    )
    return row


async def latest_tree(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, options: dict[str, Any], job_id: uuid.UUID
) -> asyncpg.Record | None:
    """The cohort's most recently completed export tree with these options, other than `job_id`."""
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT * FROM export.tree WHERE cohort_id = $1 AND options = $2 AND job_id <> $3"
        " AND finalized_at IS NOT NULL ORDER BY finalized_at DESC LIMIT 1",
        cohort_id,
        options,
        job_id,
    )
    return row


async def lock_trees(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> None:
    """One export of a cohort at a time chooses what it carries and completes its tree (held until
    `unlock_trees` or the connection's end): two scoped exports finishing together must not
    both carry the same previous tree, each without the other's subjects."""
    await conn.execute(
        "SELECT pg_advisory_lock(hashtextextended($1, 0))", f"export.tree:{cohort_id}"
    )


async def unlock_trees(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> None:
    await conn.execute(
        "SELECT pg_advisory_unlock(hashtextextended($1, 0))", f"export.tree:{cohort_id}"
    )


async def carry_over(
    conn: asyncpg.Connection, job_id: uuid.UUID, base_job_id: uuid.UUID, subjects: Sequence[str]
) -> int:
    """List in this job every file and subject part of `base_job_id` that belongs to a subject
    other than `subjects`: rows copied inside Postgres, objects referenced where they are (no
    object is read, listed or copied). Returns how many files were carried."""
    columns = ", ".join(_MANIFEST_COLUMNS)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _MANIFEST_COLUMNS if c != "path")
    status = await conn.execute(
        f"INSERT INTO export.manifest (job_id, cohort_id, {columns})"
        f" SELECT $1, cohort_id, {columns} FROM export.manifest"
        " WHERE job_id = $2 AND subject IS NOT NULL AND NOT (subject = ANY($3::text[]))"
        f" ON CONFLICT (job_id, path) DO UPDATE SET {updates}",
        job_id,
        base_job_id,
        list(subjects),
    )
    await conn.execute(
        "INSERT INTO export.subject_part (job_id, cohort_id, subject, part)"
        " SELECT $1, cohort_id, subject, part FROM export.subject_part"
        " WHERE job_id = $2 AND NOT (subject = ANY($3::text[]))"
        " ON CONFLICT (job_id, subject) DO UPDATE SET part = EXCLUDED.part",
        job_id,
        base_job_id,
        list(subjects),
    )
    return int(status.split()[-1])


async def subject_ids_of_parts(
    conn: asyncpg.Connection, job_id: uuid.UUID, subjects: Sequence[str]
) -> set[str]:
    """The catalog subject ids an export gave these `sub-` labels."""
    rows = await conn.fetch(
        "SELECT json_array_elements_text(part -> 'subject_ids') AS subject_id"
        " FROM export.subject_part WHERE job_id = $1 AND subject = ANY($2::text[])",
        job_id,
        list(subjects),
    )
    return {r["subject_id"] for r in rows}


async def save_parts(
    conn: asyncpg.Connection,
    job_id: uuid.UUID,
    cohort_id: uuid.UUID,
    parts: dict[str, dict[str, Any]],
) -> None:
    await conn.executemany(
        "INSERT INTO export.subject_part (job_id, cohort_id, subject, part) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (job_id, subject) DO UPDATE SET part = EXCLUDED.part",
        [(job_id, cohort_id, subject, part) for subject, part in parts.items()],
    )


async def subject_parts(conn: asyncpg.Connection, job_id: uuid.UUID) -> list[Any]:
    """Every subject part of the job (its own and the carried ones), in label order."""
    rows = await conn.fetch(
        "SELECT part FROM export.subject_part WHERE job_id = $1 ORDER BY subject", job_id
    )
    return [r["part"] for r in rows]


async def finish_tree(
    conn: asyncpg.Connection, job_id: uuid.UUID, carried_from: uuid.UUID | None
) -> None:
    """The job's tree is complete: a later scoped export may carry from it."""
    await conn.execute(
        "UPDATE export.tree SET carried_from = $2, finalized_at = now() WHERE job_id = $1",
        job_id,
        carried_from,
    )
