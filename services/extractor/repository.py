"""The extractor's SQL: the `catalog` schema it owns.

Rows go in through COPY into per-connection staging tables, then one INSERT ... SELECT per table,
the merges sent together: a dozen round trips per chunk of files, whatever its size. Merges are
keyed by natural ids (the first two columns), so a redelivered item writes nothing twice.
Instances, the bulk of the bytes, are copied straight into their table when they are new.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

DETAIL_KINDS = ("mr", "ct", "pet")


async def known_files(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, only: Sequence[str] | None = None
) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every source file recorded for the cohort (of these keys, when
    given: a study's hand-over looks up its own files, not the cohort's), by source key."""
    rows = await conn.fetch(
        "SELECT source_key, size, mtime_ns FROM catalog.source_file WHERE cohort_id = $1"
        " AND ($2::text[] IS NULL OR source_key = ANY($2::text[]))",
        cohort_id,
        None if only is None else list(only),
    )
    return {r["source_key"]: (r["size"], r["mtime_ns"]) for r in rows}


async def prepare_staging(conn: asyncpg.Connection) -> None:
    """The staging tables, once per connection (call inside the writing transaction)."""
    await conn.execute(_STAGING_DDL)


async def save_catalog_rows(
    conn: asyncpg.Connection,
    *,
    subjects: list[tuple[Any, ...]],
    studies: list[tuple[Any, ...]],
    series: list[tuple[Any, ...]],
    instances: list[tuple[Any, ...]],
    details: dict[str, list[tuple[Any, ...]]],
) -> tuple[int, dict[str, str]]:
    """Merge a chunk's rows; the series that gained rows are marked for a stack rebuild. Returns
    the instances newly inserted, and the source key each SOP instance of `instances` is
    catalogued from (its own, or another file's when the instance was catalogued before)."""
    inserted, owners = await _insert_instances(conn, instances)
    await _stage_and_merge(
        conn,
        [
            # a subject's values differ between its studies (the age at each): the row kept is
            # the smallest by `subject_order`, whichever item commits first
            ("catalog.subject", SUBJECT_COLUMNS, subjects, SUBJECT_COLUMNS[2:], _SUBJECT_KEPT),
            ("catalog.study", STUDY_COLUMNS, studies, None, None),
            # a series that gains rows is marked for a stack rebuild (its staged rows carry the
            # column's default, true), in the merge itself: rows are locked in key order, so
            # two items merging rows of the same series at once cannot deadlock
            ("catalog.series", SERIES_COLUMNS, series, ["stacks_dirty"], None),
            *(
                (f"catalog.{kind}_detail", _detail_columns(kind), rows, None, None)
                for kind, rows in details.items()
            ),
        ],
    )
    return inserted, owners


async def _insert_instances(
    conn: asyncpg.Connection, rows: list[tuple[Any, ...]]
) -> tuple[int, dict[str, str]]:
    """Insert the instances not catalogued yet: (how many were inserted, the source key each of
    the rows' SOP instances is now catalogued from).

    Their rows (the header is most of a chunk's bytes) are copied straight into the table, not
    through a staging table, which would have Postgres write, compress and read every header one
    more time. Rows already there (a redelivered item) are left out first. Of two files holding
    the same instance, the one whose key sorts first (bytewise) is catalogued and the other is
    the duplicate, whichever item commits first: a row from a file that sorts before the
    catalogued one takes the instance over (`_replace_instances`), as does a file changed in
    place since it was catalogued. Should another item insert one of the new rows meanwhile, the
    copy fails on the key and the rows are looked at again. Rows go in key order, as the merges
    do, so two chunks waiting on each other's keys cannot deadlock."""
    if not rows:
        return 0, {}
    cohort_id = rows[0][0]
    uids = [r[1] for r in rows]
    for _ in range(3):
        known = await conn.fetch(
            "SELECT sop_instance_uid, source_key, sha256, size FROM catalog.instance"
            " WHERE cohort_id = $1 AND sop_instance_uid = ANY($2::text[])",
            cohort_id,
            uids,
        )
        stored = {r["sop_instance_uid"]: tuple(r)[1:] for r in known}
        replacing = sorted(
            (r for r in rows if (k := stored.get(r[1])) and _replaces(r, k)), key=lambda r: r[1]
        )
        if replacing:
            await _replace_instances(conn, replacing, stored)
            owners = await instance_sources(conn, cohort_id, uids)
        else:
            owners = {r["sop_instance_uid"]: r["source_key"] for r in known}
        new = sorted((r for r in rows if r[1] not in owners), key=lambda r: r[1])
        if not new:
            return 0, owners
        try:
            async with conn.transaction():  # a savepoint: rolled back, the rows are looked at again
                await conn.copy_records_to_table(
                    "instance", schema_name="catalog", records=new, columns=INSTANCE_COLUMNS
                )
        except asyncpg.UniqueViolationError:
            continue  # another item inserted some of them (and committed): its rows are seen now
        owners.update((r[1], r[_SOURCE_KEY]) for r in new)
        return len(new), owners
    # still racing after three looks: the merge leaves what others wrote alone
    await _stage(conn, "catalog.instance", INSTANCE_COLUMNS, new)
    inserted = _count(await conn.execute(_merge("catalog.instance", INSTANCE_COLUMNS)))
    return inserted, await instance_sources(conn, cohort_id, uids)


def _replaces(row: tuple[Any, ...], stored: tuple[Any, ...]) -> bool:
    """True when `row` is to replace the catalogued instance (`stored`: source key, SHA-256,
    size): its file sorts before the catalogued one, or is that file with other bytes."""
    key, stored_key = row[_SOURCE_KEY], stored[0]
    return bool(key < stored_key or (key == stored_key and row[_SHA] != stored[1]))


DUPLICATE_REASON = "duplicate of an instance already catalogued (SOP Instance UID {})"


async def _replace_instances(
    conn: asyncpg.Connection, rows: list[tuple[Any, ...]], stored: dict[str, tuple[Any, ...]]
) -> None:
    """Rows that replace their instance's (`_replaces`): each takes the row where the catalogued
    file still sorts after or is its own, its details are dropped (the chunk's merges write them
    from the new bytes), and a file it took the instance from is recorded as the duplicate."""
    cohort_id = rows[0][0]
    await _stage(conn, "catalog.instance", INSTANCE_COLUMNS, rows)
    await conn.execute(
        _merge(
            "catalog.instance",
            INSTANCE_COLUMNS,
            INSTANCE_COLUMNS[2:],
            'catalog.instance.source_key COLLATE "C" >= EXCLUDED.source_key COLLATE "C"',
        )
    )
    await conn.execute(f"TRUNCATE {_staging('catalog.instance')}")
    deletes = [
        f"DELETE FROM catalog.{kind}_detail"
        " WHERE cohort_id = $1 AND sop_instance_uid = ANY($2::text[])"
        for kind in DETAIL_KINDS
    ]
    # one statement: the first deletes as data-modifying CTEs of the last
    ctes = ", ".join(f"d{i} AS ({d})" for i, d in enumerate(deletes[:-1]))
    await conn.execute(f"WITH {ctes} {deletes[-1]}", cohort_id, [r[1] for r in rows])
    now = await instance_sources(conn, cohort_id, [r[1] for r in rows])
    displaced = [
        (
            cohort_id,
            stored[r[1]][0],
            DUPLICATE_REASON.format(r[1]),
            stored[r[1]][2],
            stored[r[1]][1],
            r[_JOB],
        )
        for r in rows
        if stored[r[1]][0] != r[_SOURCE_KEY] and now.get(r[1]) == r[_SOURCE_KEY]
    ]
    if displaced:
        await _stage_and_merge(
            conn,
            [("catalog.rejected_file", REJECTED_COLUMNS, displaced, REJECTED_COLUMNS[2:], None)],
        )
        await conn.execute(
            "UPDATE catalog.source_file SET status = 'rejected', updated_at = now()"
            " WHERE cohort_id = $1 AND source_key = ANY($2::text[])",
            cohort_id,
            [d[1] for d in displaced],
        )


async def _by_sop(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, sop_instance_uids: Sequence[str], column: str
) -> dict[str, Any]:
    rows = await conn.fetch(
        f"SELECT sop_instance_uid, {column} FROM catalog.instance"
        " WHERE cohort_id = $1 AND sop_instance_uid = ANY($2::text[])",
        cohort_id,
        list(sop_instance_uids),
    )
    return {r["sop_instance_uid"]: r[column] for r in rows}


async def instance_sources(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, sop_instance_uids: Sequence[str]
) -> dict[str, str]:
    """The source key each of these SOP instances is catalogued from."""
    return await _by_sop(conn, cohort_id, sop_instance_uids, "source_key")


async def save_file_outcomes(
    conn: asyncpg.Connection,
    rejected: list[tuple[Any, ...]],
    sources: list[tuple[Any, ...]],
) -> None:
    """Rejected files with their reasons, and every source file's state (size, mtime, status)."""
    await _stage_and_merge(
        conn,
        [
            ("catalog.rejected_file", REJECTED_COLUMNS, rejected, REJECTED_COLUMNS[2:], None),
            (
                "catalog.source_file",
                SOURCE_COLUMNS,
                sources,
                [*SOURCE_COLUMNS[2:], "updated_at"],
                None,
            ),
        ],
    )


async def dirty_series(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> list[str]:
    """The series whose stacks are to be rebuilt (they gained instances)."""
    rows = await conn.fetch(
        "SELECT series_instance_uid FROM catalog.series WHERE cohort_id = $1 AND stacks_dirty ORDER BY 1",
        cohort_id,
    )
    return [r["series_instance_uid"] for r in rows]


def series_records(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, series_uids: Sequence[str]
) -> Any:
    """The instances' records of these series, streamed in series order without their headers
    (`async for`, inside a transaction); each row's `record` is JSON text (`decoded`)."""
    return conn.cursor(
        "SELECT series_instance_uid, record FROM catalog.instance"
        " WHERE cohort_id = $1 AND series_instance_uid = ANY($2::text[])"
        " ORDER BY series_instance_uid",
        cohort_id,
        list(series_uids),
        prefetch=500,
    )


async def instance_headers(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, sop_instance_uids: Sequence[str]
) -> dict[str, Any]:
    """The catalogued DICOM JSON header of each of these SOP instances."""
    found = await _by_sop(conn, cohort_id, sop_instance_uids, "header")
    return {uid: decoded(text) for uid, text in found.items()}


def decoded(text: str) -> Any:
    """An instance's `record` or `header` as stored: JSON text, kept as text (migration 005)."""
    return orjson.loads(text)


async def replace_stacks(
    conn: asyncpg.Connection,
    cohort_id: uuid.UUID,
    series_uids: Sequence[str],
    stack_rows: list[tuple[Any, ...]],
) -> None:
    """The stacks of these series replaced by `stack_rows`, the series marked clean (a series left
    without instances ends with no stacks, and clean, as well)."""
    await conn.execute(
        "DELETE FROM catalog.series_stack WHERE cohort_id = $1 AND series_instance_uid = ANY($2::text[])",
        cohort_id,
        list(series_uids),
    )
    await conn.executemany(
        "INSERT INTO catalog.series_stack (cohort_id, series_instance_uid, stack_key, n_instances, n_frames,"
        " summary, sop_instance_uids) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        stack_rows,
    )
    await conn.execute(
        "UPDATE catalog.series SET stacks_dirty = false WHERE cohort_id = $1 AND series_instance_uid = ANY($2::text[])",
        cohort_id,
        list(series_uids),
    )


async def cohort_counts(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> dict[str, int]:
    row = await conn.fetchrow(
        """SELECT
            (SELECT count(*) FROM catalog.subject WHERE cohort_id = $1) AS subjects,
            (SELECT count(*) FROM catalog.study WHERE cohort_id = $1) AS studies,
            (SELECT count(*) FROM catalog.series WHERE cohort_id = $1) AS series,
            (SELECT count(*) FROM catalog.instance WHERE cohort_id = $1) AS instances,
            (SELECT count(*) FROM catalog.series_stack WHERE cohort_id = $1) AS stacks,
            (SELECT count(*) FROM catalog.rejected_file WHERE cohort_id = $1) AS rejected""",
        cohort_id,
    )
    return {k: int(v) for k, v in dict(row).items()}


SUBJECT_COLUMNS = ["cohort_id", "subject_id", "patient_sex", "patient_age", "attributes"]


def subject_order(row: Sequence[Any]) -> tuple[str, str, str]:
    """How a subject's rows (one per study it was seen in: PatientAge differs between visits) are
    ordered: the catalog keeps the smallest, the youngest age first, so it holds the same row
    whatever order the items that read its files end in. `_SUBJECT_KEPT` is the same order in the
    table; a chunk keeps its own smallest first."""
    _, _, sex, age, attributes = row
    return (age or "", sex or "", json.dumps(attributes, sort_keys=True, default=str))


# `subject_order` in SQL (byte order, as Python compares strings)
_SUBJECT_KEPT = (
    "(COALESCE(EXCLUDED.patient_age, '') COLLATE \"C\", COALESCE(EXCLUDED.patient_sex, '')"
    ' COLLATE "C", EXCLUDED.attributes::text COLLATE "C") < (COALESCE(catalog.subject.patient_age,'
    " '') COLLATE \"C\", COALESCE(catalog.subject.patient_sex, '') COLLATE \"C\","
    ' catalog.subject.attributes::text COLLATE "C")'
)
STUDY_COLUMNS = [
    "cohort_id",
    "study_instance_uid",
    "subject_id",
    "study_date",
    "study_time",
    "accession_number",
    "study_description",
    "attributes",
]
SERIES_COLUMNS = [
    "cohort_id",
    "series_instance_uid",
    "study_instance_uid",
    "subject_id",
    "modality",
    "series_number",
    "series_description",
    "protocol_name",
    "manufacturer",
    "manufacturer_model",
    "attributes",
]
INSTANCE_COLUMNS = [
    "cohort_id",
    "sop_instance_uid",
    "series_instance_uid",
    "study_instance_uid",
    "sop_class_uid",
    "instance_number",
    "n_frames",
    "transfer_syntax_uid",
    "source_key",
    "object_key",
    "sha256",
    "size",
    "job_id",
    "record",
    "header",
]
_SOURCE_KEY = INSTANCE_COLUMNS.index("source_key")
_SHA = INSTANCE_COLUMNS.index("sha256")
_JOB = INSTANCE_COLUMNS.index("job_id")
REJECTED_COLUMNS = ["cohort_id", "source_key", "reason", "size", "sha256", "job_id"]
SOURCE_COLUMNS = [
    "cohort_id",
    "source_key",
    "size",
    "mtime_ns",
    "sha256",
    "status",
    "sop_instance_uid",
    "job_id",
]
_STAGED = [
    "catalog.subject",
    "catalog.study",
    "catalog.series",
    "catalog.instance",
    "catalog.mr_detail",
    "catalog.ct_detail",
    "catalog.pet_detail",
    "catalog.rejected_file",
    "catalog.source_file",
]


def _staging(table: str) -> str:
    return "_stage_" + table.replace(".", "_")


# one round trip per transaction (the tables live as long as the connection; their rows, one
# transaction)
_STAGING_DDL = ";\n".join(
    f"CREATE TEMP TABLE IF NOT EXISTS {_staging(t)} (LIKE {t} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    for t in _STAGED
)


async def _stage(
    conn: asyncpg.Connection, table: str, columns: list[str], rows: list[tuple[Any, ...]]
) -> bool:
    """COPY `rows` into `table`'s staging table (in the current transaction); False when none."""
    if not rows:
        return False
    await conn.copy_records_to_table(_staging(table), records=rows, columns=columns)
    return True


def _merge(
    table: str, columns: list[str], update: list[str] | None = None, when: str | None = None
) -> str:
    """INSERT ... SELECT from the staging table. Rows whose natural key (the first two columns)
    exists are left alone, or, with `update`, get those columns from the new row (a column not
    among `columns` takes its default, e.g. `updated_at` -> now()), where `when` holds if given."""
    written = ", ".join([*columns, *(c for c in update or [] if c not in columns)])
    on_conflict = (
        "DO UPDATE SET "
        + ", ".join(f"{c} = EXCLUDED.{c}" for c in update)
        + (f" WHERE {when}" if when else "")
        if update
        else "DO NOTHING"
    )
    return (
        f"INSERT INTO {table} ({written}) SELECT {written} FROM {_staging(table)}"
        f" ORDER BY {', '.join(columns[:2])} ON CONFLICT ({', '.join(columns[:2])}) {on_conflict}"
    )


async def _stage_and_merge(
    conn: asyncpg.Connection,
    tables: list[tuple[str, list[str], list[tuple[Any, ...]], list[str] | None, str | None]],
) -> None:
    """Stage each (table, columns, rows, update, when: `_merge`'s) that has rows, then send their
    merges together in one round trip."""
    statements = [
        _merge(table, columns, update, when)
        for table, columns, rows, update, when in tables
        if await _stage(conn, table, columns, rows)
    ]
    if statements:
        await conn.execute(";\n".join(statements))


def _count(status: str) -> int:
    """Rows written, from a command status such as 'INSERT 0 12'."""
    return int(status.split()[-1])


_DETAIL_COLUMNS = {
    "mr": [
        "repetition_time",
        "echo_time",
        "inversion_time",
        "flip_angle",
        "echo_train_length",
        "echo_numbers",
        "scanning_sequence",
        "sequence_variant",
        "scan_options",
        "mr_acquisition_type",
        "sequence_name",
        "b_value",
        "magnetic_field_strength",
        "pixel_bandwidth",
    ],
    "ct": [
        "kvp",
        "convolution_kernel",
        "slice_thickness",
        "exposure",
        "xray_tube_current",
        "contrast_bolus_agent",
    ],
    "pet": [
        "radiopharmaceutical",
        "units",
        "corrected_image",
        "decay_correction",
        "frame_reference_time",
        "actual_frame_duration",
    ],
}


def _column(value: Any) -> Any:
    """Multi-valued DICOM attributes (lists) go into text columns backslash-joined, as DICOM does."""
    if isinstance(value, list):
        return "\\".join(str(v) for v in value) if value else None
    return value


def _detail_columns(kind: str) -> list[str]:
    return ["cohort_id", "sop_instance_uid", *_DETAIL_COLUMNS[kind]]


def detail_values(kind: str, detail: Any) -> tuple[Any, ...]:
    """The row of `catalog.<kind>_detail` (kind: mr, ct or pet) of one instance, after its
    `cohort_id` and `sop_instance_uid`."""
    return tuple(_column(getattr(detail, c, None)) for c in _DETAIL_COLUMNS[kind])
