"""Sorting as a stage plugin: the user's four steps, one study per work item.

- Checkup: the study's stacks (from the extractor's `catalog.stack_summary_v`) sorted into accepted,
  skipped (already classified at this rule version, unless `forceReprocess`) and excluded (with a
  reason); missing study dates recovered from the stack's own dates.
- Stack Fingerprint: one feature row per accepted stack, bulk-written.
- Classification: the rule pack of the chosen `profile`, evidence combined per axis.
- Completion: gaps filled from the same study's confident stacks only.
Results are keyed by (stack, rule version), so a re-run redoes only what changed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

from services.sorter.corrections import with_corrections
from services.sorter.rules import (
    Classification,
    checkup,
    classify_batch,
    complete,
    fingerprint_batch,
    fingerprint_version,
    is_unselected,
    load_rules,
    stored_classified_keys,
)
from shared.catalog import StackSummary
from shared.events import StageRequested, WorkItem
from shared.mapping_rules import load_rules as load_mapping_rules
from shared.stage import ItemContext, ItemResult, PlannedItem, RunInfo
from shared.topics import Stage

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"

_CLASSIFICATION_COLUMNS = [
    "cohort_id", "series_instance_uid", "stack_key", "rule_version", "study_instance_uid", "base",
    "technique", "modifiers", "constructs", "provenance", "acceleration", "post_contrast", "localizer",
    "spinal_cord", "intent", "bids_datatype", "bids_suffix", "entities", "confidence",
    "review_required", "review_reasons", "excluded_reason", "evidence", "detail", "job_id",
]  # fmt: skip


def sorting_options(config: dict[str, Any]) -> tuple[str, list[str], bool, bool]:
    """(profile, selectedModalities, skipClassified, forceReprocess) from a sorting config."""
    profile = str(config.get("profile", "standard"))
    modalities = config.get("selectedModalities") or ["MR", "CT", "PT"]
    if isinstance(modalities, str):
        modalities = [modalities]
    return (
        profile,
        [str(m).upper() for m in modalities],
        bool(config.get("skipClassified", True)),
        bool(config.get("forceReprocess", False)),
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


class SorterPlugin:
    stage = Stage.sorting
    service = "sorter"
    schema = "sorting"

    def cohort_prefixes(self, cohort_id: uuid.UUID) -> list[str]:
        """Nothing: classifications live in the sorting schema only."""
        return []

    async def plan(
        self, pool: asyncpg.Pool, request: StageRequested, job_id: uuid.UUID
    ) -> list[PlannedItem]:
        async with pool.acquire() as conn:
            studies = [
                r["study_instance_uid"]
                for r in await conn.fetch(
                    "SELECT DISTINCT study_instance_uid FROM catalog.stack_summary_v WHERE cohort_id = $1"
                    " AND (cardinality($2::text[]) = 0 OR study_instance_uid = ANY($2::text[])) ORDER BY 1",
                    request.cohort.id,
                    request.study_instance_uids,
                )
            ]
        return [PlannedItem(key=uid, data={"study": uid}, partition_key=uid) for uid in studies]

    async def process(self, ctx: ItemContext, item: WorkItem) -> ItemResult:
        cohort_id = item.cohort.id
        study_uid = item.data["study"]
        profile, modalities, skip, force = sorting_options(item.config)
        rules = load_rules(profile)
        async with ctx.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT summary, sop_instance_uids FROM catalog.stack_summary_v"
                " WHERE cohort_id = $1 AND study_instance_uid = $2 ORDER BY series_instance_uid, stack_key",
                cohort_id,
                study_uid,
            )
            done = await conn.fetch(
                "SELECT series_instance_uid, stack_key, rule_version, excluded_reason"
                " FROM sorting.series_classification"
                " WHERE cohort_id = $1 AND study_instance_uid = $2 AND rule_version = $3",
                cohort_id,
                study_uid,
                rules.version,
            )
        stacks = [StackSummary.model_validate(r["summary"]) for r in rows]
        classified = stored_classified_keys(
            (r["series_instance_uid"], r["stack_key"], r["rule_version"], r["excluded_reason"])
            for r in done
        )
        checked = checkup(stacks, modalities, classified, rules.version, skip, force)
        fingerprints = await asyncio.to_thread(fingerprint_batch, checked.accepted)
        decisions = await asyncio.to_thread(
            lambda: complete(classify_batch(fingerprints, rules), fingerprints, rules)
        )
        async with ctx.pool.acquire() as conn:  # a person's corrections of this cohort
            decisions = with_corrections(
                decisions, stacks, await load_mapping_rules(conn, cohort_id)
            )
        excluded = [
            Classification(
                stack_key=e.stack_key,
                rule_version=rules.version,
                series_instance_uid=e.series_instance_uid,
                intent="excluded",
                confidence=1.0,
                excluded_reason=e.reason,
            )
            for e in checked.excluded
        ]
        await ctx.check_cancelled()
        async with ctx.pool.acquire() as conn, conn.transaction():
            fp_version = fingerprint_version()
            await conn.executemany(
                "INSERT INTO sorting.stack_fingerprint (cohort_id, series_instance_uid, stack_key, fingerprint_version,"
                " features) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (cohort_id, series_instance_uid, stack_key)"
                " DO UPDATE SET features = EXCLUDED.features, fingerprint_version = EXCLUDED.fingerprint_version,"
                " updated_at = now()",
                [
                    (
                        cohort_id,
                        fp.series_instance_uid,
                        fp.stack_key,
                        fp_version,
                        json.loads(json.dumps(fp.as_dict())),
                    )
                    for fp in fingerprints
                ],
            )
            cols = ", ".join(_CLASSIFICATION_COLUMNS)
            params = ", ".join(f"${i}" for i in range(1, len(_CLASSIFICATION_COLUMNS) + 1))
            updates = ", ".join(
                f"{c} = EXCLUDED.{c}"
                for c in _CLASSIFICATION_COLUMNS
                if c not in ("cohort_id", "series_instance_uid", "stack_key", "rule_version")
            )
            decided = [c for c in [*decisions, *excluded] if not is_unselected(c.excluded_reason)]
            await conn.executemany(
                f"INSERT INTO sorting.series_classification ({cols}) VALUES ({params})"
                " ON CONFLICT (cohort_id, series_instance_uid, stack_key, rule_version)"
                f" DO UPDATE SET {updates}, updated_at = now()",
                [_row(cohort_id, study_uid, c, ctx.job_id) for c in decided],
            )
            # a stack this run did not select keeps whatever an earlier run decided for it
            await conn.executemany(
                f"INSERT INTO sorting.series_classification ({cols}) VALUES ({params})"
                " ON CONFLICT (cohort_id, series_instance_uid, stack_key, rule_version) DO NOTHING",
                [
                    _row(cohort_id, study_uid, c, ctx.job_id)
                    for c in excluded
                    if is_unselected(c.excluded_reason)
                ],
            )
        intents = Counter(c.intent for c in [*decisions, *excluded])
        counts = {f"intent_{k}": v for k, v in intents.items()}
        counts.update(
            stacks=len(stacks),
            classified=len(decisions),
            skipped=len(checked.skipped),
            excluded=len(excluded),
            review_required=sum(1 for c in decisions if c.review_required),
            recovered_dates=len(checked.recovered_dates),
        )
        return ItemResult(counts=counts)

    async def finalize(self, pool: asyncpg.Pool, run: RunInfo) -> tuple[dict[str, Any], str | None]:
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT intent, review_required, count(*) AS n FROM sorting.classification_v WHERE cohort_id = $1"
                " GROUP BY intent, review_required",
                run.cohort.id,
            )
        by_intent: dict[str, int] = {}
        review = 0
        for r in rows:
            by_intent[r["intent"]] = by_intent.get(r["intent"], 0) + r["n"]
            review += r["n"] if r["review_required"] else 0
        profile, *_ = sorting_options(run.config)
        return {
            "by_intent": by_intent,
            "review_required_total": review,
            "rule_version": load_rules(profile).version,
        }, None
