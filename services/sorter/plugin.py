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
import logging
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

from services.sorter import SCHEMA
from services.sorter import repository as repo
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
from shared.settings import get_settings
from shared.stage import ItemContext, ItemResult, PlannedItem, RunInfo
from shared.stage_config import JobConfigs, SortingConfig
from shared.topics import Stage

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


class SorterPlugin:
    stage = Stage.sorting
    service = "sorter"
    schema = SCHEMA
    # two studies in hand at once: an item is mostly round trips to Postgres and the broker (its
    # classification takes a millisecond or two), so a second consumer overlaps them; studies
    # share no rows, so their order does not matter
    item_workers = 2

    def __init__(self) -> None:
        self._configs = JobConfigs(SortingConfig)
        self._relations: set[str] = set()  # the gateway's views seen to exist

    def warm_up(self) -> int:
        """What the first item would otherwise pay for, done when the service starts: compiling
        the default profile's rule pack (0.7-1.5 s; `load_rules` keeps it). No worker processes."""
        load_rules(SortingConfig().profile)
        return 0

    def cohort_prefixes(self, cohort_id: uuid.UUID) -> list[str]:
        """Nothing: classifications live in the sorting schema only."""
        return []

    async def plan(
        self, pool: asyncpg.Pool, request: StageRequested, job_id: uuid.UUID
    ) -> list[PlannedItem]:
        async with pool.acquire() as conn:
            studies = await repo.cohort_studies(
                conn, request.cohort.id, request.study_instance_uids
            )
        return [PlannedItem(key=uid, data={"study": uid}, partition_key=uid) for uid in studies]

    async def process(self, ctx: ItemContext, item: WorkItem) -> ItemResult:
        cohort_id = item.cohort.id
        study_uid = item.data["study"]
        config = self._configs.read(ctx.job_id, item.config, ctx.settings)
        rules = load_rules(config.profile)
        # one connection for the item, and one read of the study: its round trips are most of
        # an item's time (the classifier itself takes a millisecond or two)
        async with ctx.pool.acquire() as conn:
            rows = await repo.study_stacks(conn, cohort_id, study_uid, rules.version)
            # a person's corrections of this cohort, as they are now
            corrections = await load_mapping_rules(conn, cohort_id, seen=self._relations)
            stacks = [StackSummary.model_validate(r["summary"]) for r in rows]
            classified = stored_classified_keys(
                (s.series_instance_uid, s.stack_key, rules.version, r["excluded_reason"])
                for s, r in zip(stacks, rows, strict=True)
                if r["classified"]
            )
            checked = checkup(
                stacks,
                config.selectedModalities,
                classified,
                rules.version,
                config.skipClassified,
                config.forceReprocess,
            )
            fingerprints = await asyncio.to_thread(fingerprint_batch, checked.accepted)
            decisions = await asyncio.to_thread(
                lambda: complete(classify_batch(fingerprints, rules), fingerprints, rules)
            )
            decisions = with_corrections(decisions, stacks, corrections)
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
            async with conn.transaction():
                await repo.save_fingerprints(conn, cohort_id, fingerprint_version(), fingerprints)
                await repo.save_classifications(
                    conn,
                    cohort_id,
                    study_uid,
                    ctx.job_id,
                    decided=[
                        c for c in [*decisions, *excluded] if not is_unselected(c.excluded_reason)
                    ],
                    unselected=[c for c in excluded if is_unselected(c.excluded_reason)],
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
        # the study passed sorting whole (completion looks at this study's stacks only)
        return ItemResult(counts=counts, studies=[study_uid])

    async def finalize(self, pool: asyncpg.Pool, run: RunInfo) -> tuple[dict[str, Any], str | None]:
        async with pool.acquire() as conn:
            rows = await repo.intent_counts(conn, run.cohort.id)
        by_intent: dict[str, int] = {}
        review = 0
        for r in rows:
            by_intent[r["intent"]] = by_intent.get(r["intent"], 0) + r["n"]
            review += r["n"] if r["review_required"] else 0
        config = self._configs.read(run.job_id, run.config, get_settings())
        return {
            "by_intent": by_intent,
            "review_required_total": review,
            "rule_version": load_rules(config.profile).version,
        }, None
