"""A cohort's mapping rules: corrections a person made to the sorter's proposed BIDS names.

A rule says "in this cohort, the stacks of series described `series_description` with stack key
`stack_key` are `bids_datatype`/`bids_suffix` with `entities`" or "are excluded". Description and
stack key (the per-volume constants: TE, TI, echo, orientation, ...) are what repeats from study to
study of one protocol, so a correction made once applies to the studies the cohort receives later.

The gateway stores the rules, versioned and attributed (`gateway.mapping_rules`), and publishes the
current ones as `gateway.mapping_rules_v`; whoever names stacks (the exporter when it plans, the
gateway when it shows the catalog) applies them with `apply_rule` on the sorter's classification.
See docs/adr-0020-web-review.md.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg
from pydantic import BaseModel, Field

from shared.db import relation_exists

RULES_VIEW = "gateway.mapping_rules_v"
EXCLUDED_BY_PERSON = "excluded by a person"


class MappingRule(BaseModel):
    series_description: str
    stack_key: str
    bids_datatype: str | None = None
    bids_suffix: str | None = None
    entities: dict[str, Any] = Field(default_factory=dict)
    excluded: bool = False
    version: int = 0
    author: str = ""
    # the sorter's proposal the person corrected (shown beside the correction)
    proposed: dict[str, Any] = Field(default_factory=dict)

    @property
    def match(self) -> tuple[str, str]:
        return rule_key(self.series_description, self.stack_key)


def rule_key(series_description: str | None, stack_key: str) -> tuple[str, str]:
    """What a rule matches on: the description (trimmed, case-insensitive) and the stack key."""
    return ((series_description or "").strip().casefold(), stack_key)


RuleBook = dict[tuple[str, str], MappingRule]


def apply_rule(rules: RuleBook, series_description: str | None, stack_key: str,
               classification: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The classification with the matching rule applied (a copy; unchanged when none matches).

    A corrected stack is no longer for review; `set_by` says who named it ("person" or "sorter")
    and `rule_version` which rule did."""
    result = dict(classification)
    rule = rules.get(rule_key(series_description, stack_key))
    if rule is None:
        result.setdefault("set_by", "sorter")
        return result
    result.update(set_by="person", rule_version=rule.version, review_required=False)
    if rule.excluded:
        result.update(intent="excluded", excluded_reason=EXCLUDED_BY_PERSON)
        return result
    result.update(
        bids_datatype=rule.bids_datatype,
        bids_suffix=rule.bids_suffix,
        entities=dict(rule.entities),
        excluded_reason=None,
        localizer=False,
    )
    # the exporter keeps the intents its includeIntents name: a person's datatype is the intent
    if rule.bids_datatype:
        result["intent"] = rule.bids_datatype
    return result


async def load_rules(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, *, seen: set[str] | None = None
) -> RuleBook:
    """The cohort's current rules (none when the gateway's view does not exist; `seen`: the
    caller's relations known to exist, `relation_exists`)."""
    if not await relation_exists(conn, RULES_VIEW, seen):
        return {}
    rows = await conn.fetch(
        "SELECT series_description, stack_key, bids_datatype, bids_suffix, entities, excluded,"
        f" version, author, proposed FROM {RULES_VIEW} WHERE cohort_id = $1",
        cohort_id,
    )
    rules = [MappingRule.model_validate(dict(r)) for r in rows]
    return {r.match: r for r in rules}
