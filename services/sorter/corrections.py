"""The cohort's mapping rules (shared/mapping_rules.py) applied when the sorter classifies: a
correction a person made once names the same kind of stack in every study the cohort receives
later, and such a stack is not flagged for review again (docs/adr-0020-web-review.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from services.sorter.rules.classify import Classification
from shared.catalog import StackSummary
from shared.mapping_rules import RuleBook, apply_rule

_FIELDS = (
    "intent", "bids_datatype", "bids_suffix", "entities", "review_required", "excluded_reason",
    "localizer",
)  # fmt: skip


def with_corrections(
    decisions: Sequence[Classification], stacks: Sequence[StackSummary], rules: RuleBook
) -> list[Classification]:
    """The decisions, those a rule matches replaced by the person's naming."""
    if not rules:
        return list(decisions)
    described = {(s.series_instance_uid, s.stack_key): s.series_description for s in stacks}
    out = []
    for c in decisions:
        current = {f: getattr(c, f) for f in _FIELDS}
        description = described.get((c.series_instance_uid, c.stack_key))
        applied = apply_rule(rules, description, c.stack_key, current)
        if applied["set_by"] != "person":
            out.append(c)
            continue
        changes = {f: applied[f] for f in _FIELDS}
        changes["entities"] = dict(changes["entities"] or {})
        out.append(dataclasses.replace(c, **changes))
    return out
