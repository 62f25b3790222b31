"""The sorter's SQL: the catalog view it reads and the `sorting` schema it owns.

Reads go through the view the extractor publishes (`catalog.stack_summary_v`), always filtered by
cohort. Writes are upserts keyed by (cohort, series, stack, rule version), so a redelivered item
rewrites the same rows and a re-run at a new rule version adds its own.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from services.sorter.rules import Classification, Fingerprint

_CLASSIFICATION_COLUMNS = [
    "cohort_id", "series_instance_uid", "stack_key", "rule_version", "study_instance_uid", "base",
    "technique", "modifiers", "constructs", "provenance", "acceleration", "post_contrast", "localizer",
    "spinal_cord", "intent", "bids_datatype", "bids_suffix", "entities", "confidence",
    "review_required", "review_reasons", "excluded_reason", "evidence", "detail", "job_id",
]  # fmt: skip
_KEY = ("cohort_id", "series_instance_uid", "stack_key", "rule_version")
_COLUMNS = ", ".join(_CLASSIFICATION_COLUMNS)
_PARAMS = ", ".join(f"${i}" for i in range(1, len(_CLASSIFICATION_COLUMNS) + 1))
_UPDATES = ", ".join(f"{c} = EXCLUDED.{c}" for c in _CLASSIFICATION_COLUMNS if c not in _KEY)


async def cohort_studies(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, only: Sequence[str]
) -> list[str]:
    """The catalogued studies of a cohort (those of `only`, when given)."""
    rows = await conn.fetch(
        "SELECT DISTINCT study_instance_uid FROM catalog.stack_summary_v WHERE cohort_id = $1"
        " AND (cardinality($2::text[]) = 0 OR study_instance_uid = ANY($2::text[])) ORDER BY 1",
        cohort_id,
        list(only),
    )
    return [r["study_instance_uid"] for r in rows]


async def study_stacks(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, study_uid: str, rule_version: str
) -> list[asyncpg.Record]:
    """A study's stacks (`summary`), in series and stack order, each with what is stored of its
    classification at `rule_version` (`classified`: a row exists; its `excluded_reason`)."""
    return list(
        await conn.fetch(
            "SELECT s.summary, c.stack_key IS NOT NULL AS classified, c.excluded_reason"
            " FROM catalog.stack_summary_v s LEFT JOIN sorting.series_classification c"
            " ON c.cohort_id = s.cohort_id AND c.series_instance_uid = s.series_instance_uid"
            " AND c.stack_key = s.stack_key AND c.rule_version = $3"
            " WHERE s.cohort_id = $1 AND s.study_instance_uid = $2"
            " ORDER BY s.series_instance_uid, s.stack_key",
            cohort_id,
            study_uid,
            rule_version,
        )
    )


async def save_fingerprints(
    conn: asyncpg.Connection,
    cohort_id: uuid.UUID,
    version: str,
    fingerprints: Iterable[Fingerprint],
) -> None:
    rows = [
        (
            cohort_id,
            fp.series_instance_uid,
            fp.stack_key,
            version,
            json.loads(json.dumps(fp.as_dict())),
        )
        for fp in fingerprints
    ]
    if not rows:
        return
    await conn.executemany(
        "INSERT INTO sorting.stack_fingerprint (cohort_id, series_instance_uid, stack_key, fingerprint_version,"
        " features) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (cohort_id, series_instance_uid, stack_key)"
        " DO UPDATE SET features = EXCLUDED.features, fingerprint_version = EXCLUDED.fingerprint_version,"
        " updated_at = now()",
        rows,
    )


async def save_classifications(
    conn: asyncpg.Connection,
    cohort_id: uuid.UUID,
    study_uid: str,
    job_id: uuid.UUID,
    decided: Iterable[Classification],
    unselected: Iterable[Classification],
) -> None:
    """Upsert what this run decided; a stack it did not select keeps whatever an earlier run
    decided for it (its row is written only when there is none)."""
    rows = [_row(cohort_id, study_uid, c, job_id) for c in decided]
    if rows:  # an empty batch still costs a round trip
        await conn.executemany(
            f"INSERT INTO sorting.series_classification ({_COLUMNS}) VALUES ({_PARAMS})"
            " ON CONFLICT (cohort_id, series_instance_uid, stack_key, rule_version)"
            f" DO UPDATE SET {_UPDATES}, updated_at = now()",
            rows,
        )
    kept = [_row(cohort_id, study_uid, c, job_id) for c in unselected]
    if kept:
        await conn.executemany(
            f"INSERT INTO sorting.series_classification ({_COLUMNS}) VALUES ({_PARAMS})"
            " ON CONFLICT (cohort_id, series_instance_uid, stack_key, rule_version) DO NOTHING",
            kept,
        )


async def intent_counts(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> list[asyncpg.Record]:
    """(intent, review_required, n) over the cohort's current classifications."""
    return list(
        await conn.fetch(
            "SELECT intent, review_required, count(*) AS n FROM sorting.classification_v WHERE cohort_id = $1"
            " GROUP BY intent, review_required",
            cohort_id,
        )
    )


def _row(
    cohort_id: uuid.UUID, study_uid: str, c: Classification, job_id: uuid.UUID
) -> tuple[Any, ...]:
    d = c.as_dict()
    detail = {
        k: d[k]
        for k in ("kernel", "pet_recon", "axis_confidence", "inferred")
        if d.get(k) not in (None, {}, [])
    }
    return (
        cohort_id, c.series_instance_uid, c.stack_key, c.rule_version, study_uid, c.base, c.technique,
        d["modifiers"], d["constructs"], c.provenance, d["acceleration"], c.post_contrast, c.localizer,
        c.spinal_cord, c.intent, c.bids_datatype or None, c.bids_suffix or None, dict(c.entities),
        float(c.confidence), bool(c.review_required), list(c.review_reasons), c.excluded_reason,
        [list(e) for e in c.evidence], detail, job_id,
    )  # fmt: skip
