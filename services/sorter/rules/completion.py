"""Completion, the last sorting step: fill gaps from the same cohort's own confident stacks.

References are the cohort's stacks that were classified confidently on their own evidence (no review,
confidence at or above the threshold, nothing inferred). They are chosen once, before anything is
filled, so an inferred label can never become a reference for another stack. Filled values are
recorded in `inferred` and flagged for review; a sibling that only *corroborates* a stack's own
decision raises its confidence instead.

Two sources, nearest first:
1. the same series: a magnitude stack beside a confident B0 field map (GE, Philips B0 maps) is that
   field map's magnitude; unknown axes of one part/echo are taken from a sibling part/echo;
2. the same protocol elsewhere in the cohort (same description, protocol and sequence name).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace

from services.sorter.rules.bids import bids_entities, match_bids
from services.sorter.rules.classify import Classification
from services.sorter.rules.fingerprint import Fingerprint
from services.sorter.rules.pack import Evidence, RulePack, load_rules

FILLABLE = ("base", "technique", "provenance")


def _is_reference(c: Classification, threshold: float) -> bool:
    return (
        not c.review_required
        and not c.inferred
        and c.confidence >= threshold
        and c.intent not in ("excluded", "localizer")
    )


def _protocol_key(fp: Fingerprint) -> tuple[str, str, str, str]:
    return (fp.vendor, fp.description.lower(), fp.protocol.lower(), fp.sequence_name.lower())


def _rename(c: Classification, fp: Fingerprint, rules: RulePack) -> None:
    entry = match_bids(fp, c, rules.bids)
    c.bids_datatype = entry.datatype
    if entry.intent and c.intent not in ("excluded", "localizer"):
        c.intent = entry.intent
    c.bids_suffix, c.entities = bids_entities(fp, c, entry)


def complete(
    classifications: Sequence[Classification],
    fingerprints: Sequence[Fingerprint],
    rules: RulePack | None = None,
    threshold: float = 0.7,
) -> list[Classification]:
    """Return the classifications with gaps filled (new objects; the inputs are not modified)."""
    rules = rules or load_rules("standard")
    by_key = {(fp.series_instance_uid, fp.stack_key): fp for fp in fingerprints}
    out = [
        replace(
            c,
            evidence=list(c.evidence),
            review_reasons=list(c.review_reasons),
            inferred=dict(c.inferred),
            entities=dict(c.entities),
        )
        for c in classifications
    ]
    references = [c for c in classifications if _is_reference(c, threshold)]
    by_series: dict[str, list[Classification]] = defaultdict(list)
    by_protocol: dict[tuple[str, str, str, str], list[Classification]] = defaultdict(list)
    for ref in references:
        fp = by_key.get((ref.series_instance_uid, ref.stack_key))
        if fp is None:
            continue
        by_series[ref.series_instance_uid].append(ref)
        by_protocol[_protocol_key(fp)].append(ref)

    for c in out:
        fp = by_key.get((c.series_instance_uid, c.stack_key))
        if fp is None or c.intent in ("excluded", "localizer") or _is_reference(c, threshold):
            continue
        siblings = [
            r for r in by_series.get(c.series_instance_uid, []) if r.stack_key != c.stack_key
        ]
        _fieldmap_magnitude(c, fp, siblings, rules)
        protocol_pool = [
            r
            for r in by_protocol.get(_protocol_key(fp), [])
            if r.series_instance_uid != c.series_instance_uid
        ]
        for axis in FILLABLE:
            if getattr(c, axis) != "unknown":
                continue
            found = _majority(siblings, axis)
            where = "series sibling"
            if found is None:
                found = _majority(protocol_pool, axis)
                where = "same protocol in this cohort"
            if found is None:
                continue
            value, count = found
            setattr(c, axis, value)
            c.inferred[axis] = f"{where} ({count} confident stack{'s' if count > 1 else ''})"
            c.evidence.append(Evidence(f"completion:{where}", "completion", axis, value, 0.0))
            c.review_reasons.append(f"{axis} filled from {where}: {value}")
        if c.inferred:
            _rename(c, fp, rules)
            c.review_required = True
    return out


def _majority(pool: list[Classification], axis: str) -> tuple[str, int] | None:
    """Most common known value of `axis` among reference stacks, with its count."""
    votes = Counter(getattr(r, axis) for r in pool if getattr(r, axis) != "unknown")
    return votes.most_common(1)[0] if votes else None


def _fieldmap_magnitude(
    c: Classification, fp: Fingerprint, siblings: list[Classification], rules: RulePack
) -> None:
    """A magnitude stack next to a confident B0 map (same series) is that map's magnitude."""
    field_maps = [r for r in siblings if r.intent == "fmap" and "B0map" in r.constructs]
    if not field_maps or "B0map" in c.constructs or "Phase" in c.constructs:
        return
    best = max(r.confidence for r in field_maps)
    corroborates = c.intent == "fmap" and c.bids_suffix.startswith("magnitude")
    c.intent = "fmap"
    c.constructs = c.constructs | {"Magnitude"}
    c.evidence.append(Evidence("completion:b0map_sibling", "completion", "intent", "fmap", 0.0))
    if corroborates:
        c.confidence = round(max(c.confidence, min(best, 0.8)), 3)
        c.review_reasons = [r for r in c.review_reasons if not r.startswith("low confidence")]
        c.review_required = bool(c.review_reasons)
        return
    c.inferred["intent"] = "series sibling is a B0 field map"
    c.review_reasons.append("intent filled from a series sibling: fmap magnitude")
