"""The extractor's instance writes against the real Postgres: new rows are copied straight into
`catalog.instance`, rows already there are left alone, and a key race with another item falls
back to the merge (no error, no row written twice). A subject seen with other values in another
study keeps the same row whichever item is written first."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest

from cohortflow.migrate import migrate_all
from services.extractor import repository as repo
from shared.db import json_text
from shared.settings import Settings

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _instance(cohort_id: uuid.UUID, uid: str, source_key: str) -> tuple[Any, ...]:
    return (
        cohort_id,
        uid,
        "1.2.3.series",
        "1.2.3.study",
        "1.2.840.10008.5.1.4.1.1.4",
        1,
        1,
        "1.2.840.10008.1.2.1",
        source_key,
        f"raw/{cohort_id}/{source_key}",
        "0" * 64,
        100,
        None,
        json_text({"sop_instance_uid": uid}),
        json_text({"00080018": {"vr": "UI", "Value": [uid]}}),
    )


async def _save(
    conn: asyncpg.Connection,
    rows: list[tuple[Any, ...]],
    subjects: list[tuple[Any, ...]] | None = None,
) -> tuple[int, dict[str, str]]:
    await repo.prepare_staging(conn)
    return await repo.save_catalog_rows(
        conn,
        subjects=subjects or [],
        studies=[],
        series=[],
        instances=rows,
        details={kind: [] for kind in repo.DETAIL_KINDS},
    )


async def test_new_rows_are_copied_and_existing_ones_kept(
    stack_settings: Settings, db_pool: asyncpg.Pool
) -> None:
    await migrate_all(stack_settings)
    cohort = uuid.uuid4()
    rows = [_instance(cohort, f"1.9.{i}", f"a/{i}.dcm") for i in range(3)]
    async with db_pool.acquire() as conn, conn.transaction():
        assert await _save(conn, rows) == (3, {f"1.9.{i}": f"a/{i}.dcm" for i in range(3)})
    # a redelivered chunk, plus the same object from another file: nothing written again
    again = [*rows, _instance(cohort, "1.9.0", "b/0.dcm"), _instance(cohort, "1.9.3", "a/3.dcm")]
    async with db_pool.acquire() as conn, conn.transaction():
        inserted, owners = await _save(conn, again)
    assert inserted == 1
    assert owners == {f"1.9.{i}": f"a/{i}.dcm" for i in range(4)}
    stored = await db_pool.fetch(
        "SELECT sop_instance_uid, source_key, header::text AS header FROM catalog.instance"
        " WHERE cohort_id = $1 ORDER BY 1",
        cohort,
    )
    assert [(r["sop_instance_uid"], r["source_key"]) for r in stored] == [
        (f"1.9.{i}", f"a/{i}.dcm") for i in range(4)
    ]
    assert stored[0]["header"] == str(rows[0][-1])


async def test_of_two_files_with_one_instance_the_first_key_is_catalogued(
    stack_settings: Settings, db_pool: asyncpg.Pool
) -> None:
    """Two copies of one instance in two items: whichever item commits first, the file whose key
    sorts first is catalogued and the other is recorded as its duplicate."""
    await migrate_all(stack_settings)
    results = []
    for order in (("b/0.dcm", "a/0.dcm"), ("a/0.dcm", "b/0.dcm")):
        cohort = uuid.uuid4()
        for key in order:
            async with db_pool.acquire() as conn, conn.transaction():
                _, owners = await _save(conn, [_instance(cohort, "1.7.0", key)])
                if owners["1.7.0"] == key:  # as `ExtractorPlugin._load` records its files
                    source = (cohort, key, 100, 1, "0" * 64, "catalogued", "1.7.0", None)
                    await repo.save_file_outcomes(conn, [], [source])
                else:
                    reason = repo.DUPLICATE_REASON.format("1.7.0")
                    rejected = (cohort, key, reason, 100, "0" * 64, None)
                    source = (cohort, key, 100, 1, "0" * 64, "rejected", "1.7.0", None)
                    await repo.save_file_outcomes(conn, [rejected], [source])
        rows = await db_pool.fetch(
            "SELECT i.source_key, i.object_key, r.source_key AS rejected,"
            " (SELECT array_agg(source_key || ':' || status ORDER BY source_key)"
            "  FROM catalog.source_file f WHERE f.cohort_id = $1) AS files"
            " FROM catalog.instance i LEFT JOIN catalog.rejected_file r USING (cohort_id)"
            " WHERE i.cohort_id = $1",
            cohort,
        )
        results.append([tuple(r) for r in rows])
    expected = ("a/0.dcm", "b/0.dcm", ["a/0.dcm:catalogued", "b/0.dcm:rejected"])
    for found in results:
        assert len(found) == 1
        key, object_key, rejected, files = found[0]
        assert (key, rejected, files) == expected
        assert object_key.endswith("/a/0.dcm")


async def test_a_key_race_with_another_item_takes_the_merge(
    stack_settings: Settings, db_pool: asyncpg.Pool
) -> None:
    await migrate_all(stack_settings)
    cohort = uuid.uuid4()
    first = db_pool.acquire()
    conn_a = await first.__aenter__()
    try:
        tx_a = conn_a.transaction()
        await tx_a.start()
        await _save(conn_a, [_instance(cohort, "1.8.1", "a/1.dcm")])

        async def other_item() -> tuple[int, dict[str, str]]:
            async with db_pool.acquire() as conn_b, conn_b.transaction():
                # B does not see A's uncommitted row: its copy waits on the key, then fails
                return await _save(
                    conn_b,
                    [_instance(cohort, "1.8.1", "b/1.dcm"), _instance(cohort, "1.8.2", "b/2.dcm")],
                )

        racing = asyncio.create_task(other_item())
        await asyncio.sleep(0.5)
        assert not racing.done()
        await tx_a.commit()
        inserted, owners = await asyncio.wait_for(racing, 30)
    finally:
        await first.__aexit__(None, None, None)
    assert inserted == 1
    assert owners == {"1.8.1": "a/1.dcm", "1.8.2": "b/2.dcm"}
    stored = await db_pool.fetch(
        "SELECT sop_instance_uid, source_key FROM catalog.instance WHERE cohort_id = $1 ORDER BY 1",
        cohort,
    )
    assert [tuple(r) for r in stored] == [("1.8.1", "a/1.dcm"), ("1.8.2", "b/2.dcm")]


async def test_a_subject_keeps_the_same_row_whichever_study_is_written_first(
    stack_settings: Settings, db_pool: asyncpg.Pool
) -> None:
    """Two visits of one subject, 7 years apart: the catalog keeps the first visit's values (the
    youngest age) in either order of the items, where it kept whichever came first."""
    await migrate_all(stack_settings)
    kept = []
    for order in ((0, 1), (1, 0)):
        cohort = uuid.uuid4()
        visits = [
            (cohort, "crlab", "F", "044Y", json_text({"patient_id": "crlab", "weight": 61.0})),
            (cohort, "crlab", "F", "051Y", json_text({"patient_id": "crlab", "weight": 64.5})),
        ]
        for i in order:
            async with db_pool.acquire() as conn, conn.transaction():
                await _save(conn, [], [visits[i]])
        row = await db_pool.fetchrow(
            "SELECT patient_sex, patient_age, attributes FROM catalog.subject"
            " WHERE cohort_id = $1 AND subject_id = 'crlab'",
            cohort,
        )
        assert row is not None
        kept.append((row["patient_sex"], row["patient_age"], json.loads(row["attributes"])))
    assert kept[0] == kept[1]
    assert kept[0][1] == "044Y" and kept[0][2]["weight"] == 61.0
    assert repo.subject_order(visits[0]) < repo.subject_order(visits[1])
