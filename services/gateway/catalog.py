"""The catalog, its classification and export manifests, read from the views other services publish.

The extractor publishes `catalog.series_v` and `catalog.stack_v`, the sorter
`sorting.classification_v`, the exporter `export.manifest_v`. A view that does not exist yet (its
service never ran or is older) is simply absent: the gateway returns what exists, with classification
fields null until sorting has run.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from shared.db import relation_exists
from shared.mapping_rules import RuleBook, apply_rule, load_rules, rule_key

# the views, as their owners publish them (module constants: integration tests point them elsewhere)
SERIES_VIEW = "catalog.series_v"
STACK_VIEW = "catalog.stack_v"
CLASSIFICATION_VIEW = "sorting.classification_v"
MANIFEST_VIEW = "export.manifest_v"

CLASSIFICATION_FIELDS = (
    "base",
    "technique",
    "modifiers",
    "constructs",
    "provenance",
    "acceleration",
    "post_contrast",
    "localizer",
    "spinal_cord",
    "intent",
    "bids_datatype",
    "bids_suffix",
    "entities",
    "confidence",
    "review_required",
    "review_reasons",
    "excluded_reason",
)


async def cohort_series(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, *, limit: int, offset: int
) -> list[dict[str, Any]]:
    """The cohort's series in study/series order, each with its stacks and their classification."""
    if not await relation_exists(conn, SERIES_VIEW):
        return []
    series_rows = await conn.fetch(
        "SELECT subject_id, study_instance_uid, series_instance_uid, series_number,"
        f" series_description, modality, n_instances FROM {SERIES_VIEW} WHERE cohort_id = $1"
        " ORDER BY subject_id, study_instance_uid, series_number NULLS LAST, series_instance_uid"
        " LIMIT $2 OFFSET $3",
        cohort_id,
        limit,
        offset,
    )
    uids = [r["series_instance_uid"] for r in series_rows]
    stacks: dict[str, list[dict[str, Any]]] = {uid: [] for uid in uids}
    if uids and await relation_exists(conn, STACK_VIEW):
        for row in await conn.fetch(
            f"SELECT series_instance_uid, stack_key, n_instances, n_frames FROM {STACK_VIEW}"
            " WHERE cohort_id = $1 AND series_instance_uid = ANY($2::text[]) ORDER BY stack_key",
            cohort_id,
            uids,
        ):
            stacks[row["series_instance_uid"]].append(
                {
                    "stack_key": row["stack_key"],
                    "n_instances": row["n_instances"],
                    "n_frames": row["n_frames"],
                    **dict.fromkeys(CLASSIFICATION_FIELDS),
                }
            )
    present = await _columns(conn, CLASSIFICATION_VIEW)
    if uids and {"series_instance_uid", "stack_key"} <= present:
        fields = [f for f in CLASSIFICATION_FIELDS if f in present]
        columns = ", ".join(["series_instance_uid", "stack_key", *fields])
        for row in await conn.fetch(
            f"SELECT {columns} FROM {CLASSIFICATION_VIEW}"
            " WHERE cohort_id = $1 AND series_instance_uid = ANY($2::text[])",
            cohort_id,
            uids,
        ):
            for stack in stacks[row["series_instance_uid"]]:
                if stack["stack_key"] == row["stack_key"]:
                    stack.update({f: row[f] for f in fields})
    rules = await load_rules(conn, cohort_id)
    for r in series_rows:
        uid = r["series_instance_uid"]
        stacks[uid] = [_corrected(rules, r["series_description"], st) for st in stacks[uid]]
    return [
        {
            "series_instance_uid": r["series_instance_uid"],
            "description": r["series_description"],
            "modality": r["modality"],
            "series_number": r["series_number"],
            "subject_id": r["subject_id"],
            "study_instance_uid": r["study_instance_uid"],
            "n_instances": r["n_instances"],
            "stacks": stacks[r["series_instance_uid"]],
        }
        for r in series_rows
    ]


def _corrected(rules: RuleBook, description: str | None, stack: dict[str, Any]) -> dict[str, Any]:
    """The stack with the cohort's mapping rule applied, the sorter's proposal kept beside it."""
    if stack.get("base") is None and stack.get("bids_datatype") is None:
        return stack  # not sorted yet: nothing to correct
    proposed = {f: stack.get(f) for f in ("bids_datatype", "bids_suffix", "entities", "intent")}
    rule = rules.get(rule_key(description, stack["stack_key"]))
    # the sorter applies the rules too (studies it classified after the correction): its stored
    # proposal is then the correction, and the proposal the person saw is kept with the rule
    if rule is not None and rule.proposed:
        proposed = rule.proposed
    return {**apply_rule(rules, description, stack["stack_key"], stack), "proposed": proposed}


async def _columns(conn: asyncpg.Connection, view: str) -> set[str]:
    """The columns a view has (none when it does not exist), so an older view cannot break us."""
    schema, _, name = view.partition(".")
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = $1 AND table_name = $2",
        schema,
        name,
    )
    return {r["column_name"] for r in rows}


MANIFEST_COLUMNS = (
    "path, object_key, kind, size, sha256, series_instance_uid, stack_key, source_sop_instance_uids"
)


async def export_manifest(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, job_id: uuid.UUID
) -> list[asyncpg.Record]:
    """The files an export job wrote, in path order (none when the exporter's view is absent)."""
    if not await relation_exists(conn, MANIFEST_VIEW):
        return []
    return await conn.fetch(
        f"SELECT {MANIFEST_COLUMNS} FROM {MANIFEST_VIEW} WHERE cohort_id = $1 AND job_id = $2"
        " ORDER BY path",
        cohort_id,
        job_id,
    )


async def export_file(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, job_id: uuid.UUID, path: str
) -> asyncpg.Record | None:
    """One manifest row by its path in the export: only listed files can be downloaded."""
    if not await relation_exists(conn, MANIFEST_VIEW):
        return None
    return await conn.fetchrow(
        f"SELECT {MANIFEST_COLUMNS} FROM {MANIFEST_VIEW}"
        " WHERE cohort_id = $1 AND job_id = $2 AND path = $3",
        cohort_id,
        job_id,
        path,
    )
