"""The classifier: weighted votes of every matching rule, per axis, then the BIDS name.

Nothing is first-match-wins. Each matching rule adds `weight x source weight` to the values it votes
for; a one-valued axis takes the best-scoring value, a set axis keeps every value whose score reaches
the pack's `set_threshold`. Confidence of an axis is `top / (top + runner_up + prior)`: a lone text
vote (1.0) gives 0.5, coded + vendor agreement (5.0) gives 0.83, a coded value contradicted by text
(3 vs 1) gives 0.6. The overall confidence is the lowest confidence among the axes the BIDS entry
depended on (`decided_by`). Review is asked only when that is low, when strong sources disagree, or
when policy says so (spinal cord).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from services.sorter.rules.bids import bids_entities, match_bids
from services.sorter.rules.bidsguess import bids_guess, comparable
from services.sorter.rules.fingerprint import Fingerprint
from services.sorter.rules.pack import ONE_AXES, SET_AXES, CompiledRule, Evidence, RulePack

IMAGE_KINDS = frozenset(
    {
        "mr",
        "enhanced_mr",
        "legacy_enhanced_mr",
        "ct",
        "enhanced_ct",
        "legacy_enhanced_ct",
        "pet",
        "enhanced_pet",
        "legacy_enhanced_pet",
    }
)
_DEFAULT_INTENT = {"DWI": "dwi", "PWI": "perf"}


@dataclass(slots=True)
class Classification:
    """The sorter's decision for one stack, keyed by (stack_key, rule_version)."""

    stack_key: str
    rule_version: str
    series_instance_uid: str = ""
    base: str = "unknown"
    technique: str = "unknown"
    modifiers: frozenset[str] = frozenset()
    constructs: frozenset[str] = frozenset()
    provenance: str = "unknown"
    acceleration: frozenset[str] = frozenset()
    post_contrast: bool | None = None
    localizer: bool = False
    spinal_cord: bool | None = None
    intent: str = "misc"
    bids_datatype: str = ""
    bids_suffix: str = ""
    entities: dict[str, str] = field(default_factory=dict)
    kernel: str | None = None  # CT reconstruction kernel class
    pet_recon: str | None = None  # AC / NAC
    confidence: float = 0.0
    axis_confidence: dict[str, float] = field(default_factory=dict)
    review_required: bool = False
    review_reasons: list[str] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)
    inferred: dict[str, str] = field(default_factory=dict)  # axis -> how completion filled it
    excluded_reason: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        """Storage key. `stack_key` names per-volume constants only, so the series is part of it."""
        return (self.series_instance_uid, self.stack_key, self.rule_version)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (sets as sorted lists), the shape of `sorting.series_classification`."""
        out = asdict(self)
        for name in ("modifiers", "constructs", "acceleration"):
            out[name] = sorted(out[name])
        out["evidence"] = [e._asdict() for e in self.evidence]
        return out


def _candidates(features: frozenset[str], rules: RulePack) -> Iterable[CompiledRule]:
    """Rules whose anchor token the stack has (set of identity-hashed rules: no duplicates)."""
    index = rules.index
    seen: set[CompiledRule] = set(rules.unanchored)
    for token in features & rules.anchors:
        seen.update(index[token])
    return seen


def _vote(fp: Fingerprint, rules: RulePack) -> tuple[dict[str, dict[str, float]], list[Evidence]]:
    scores: dict[str, dict[str, float]] = {}
    evidence: list[Evidence] = []
    features = fp.features
    for rule in _candidates(features, rules):
        if not rule.matches(features, fp):
            continue
        weight = rule.weight
        for axis, value in rule.votes:
            per_value = scores.setdefault(axis, {})
            per_value[value] = per_value.get(value, 0.0) + weight
        evidence.extend(rule.evidence)
    if fp.ct_kernel:
        for word in fp.ct_kernel.lower().split():
            kernel_class = rules.kernels.get(word)
            if kernel_class:
                per_value = scores.setdefault("kernel", {})
                per_value[kernel_class] = per_value.get(kernel_class, 0.0) + rules.sources["coded"]
                evidence.append(Evidence("ct_kernel_table", "coded", "kernel", kernel_class, 3.0))
                break
    return scores, evidence


def _decide_one(
    values: dict[str, float] | None, prior: float, lineage: dict[str, tuple[str, ...]] | None = None
) -> tuple[str | None, float, float, str | None]:
    """(winner, confidence, runner-up/winner ratio, runner-up) of a one-valued axis.

    With a family `lineage`, a value's score includes its ancestors' votes, and only values outside
    the winner's line (neither ancestor nor descendant) count as competitors; ties go to the more
    specific value.
    """
    if not values:
        return None, 0.0, 0.0, None
    if len(values) == 1:
        ((only, score),) = values.items()
        return (only, score / (score + prior), 0.0, None) if score > 0 else (None, 0.0, 0.0, None)
    if lineage:
        scores: dict[str, float] = {}
        depth: dict[str, int] = {}
        for value, score in values.items():
            ancestors = lineage.get(value, ())
            for ancestor in ancestors:
                score += values.get(ancestor, 0.0)
            scores[value] = score
            depth[value] = len(ancestors)
    else:
        scores, depth = values, {}
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], -depth.get(kv[0], 0), kv[0]))
    top_value, top = ranked[0]
    if top <= 0:
        return None, 0.0, 0.0, None
    line = set(lineage.get(top_value, ())) if lineage else set()
    rivals = [
        (v, s)
        for v, s in ranked[1:]
        if v not in line and not (lineage and top_value in lineage.get(v, ()))
    ]
    runner, second = rivals[0] if rivals else (None, 0.0)
    second = max(second, 0.0)
    return top_value, top / (top + second + prior), second / top, runner


def _flag(value: str | None) -> bool | None:
    return None if value is None else value == "true"


def excluded(fp: Fingerprint, rules: RulePack, reason: str) -> Classification:
    """A stack that is not classified as an acquisition (reports, presentation states, ...)."""
    return Classification(
        stack_key=fp.stack_key,
        rule_version=rules.version,
        series_instance_uid=fp.series_instance_uid,
        intent="excluded",
        confidence=1.0,
        axis_confidence={"intent": 1.0},
        evidence=[Evidence("object_kind", "coded", "intent", "excluded", 3.0)],
        excluded_reason=reason,
    )


def classify(fp: Fingerprint, rules: RulePack) -> Classification:
    """Classify one stack: six axes, flags, intent, BIDS datatype/suffix/entities, confidence."""
    if fp.kind not in IMAGE_KINDS:
        return excluded(fp, rules, f"not an image acquisition: {fp.kind}")
    policy = rules.policy
    scores, evidence = _vote(fp, rules)
    result = Classification(
        stack_key=fp.stack_key,
        rule_version=rules.version,
        series_instance_uid=fp.series_instance_uid,
        evidence=evidence,
    )
    conf: dict[str, float] = {}
    conflicts: list[str] = []
    for axis in ONE_AXES:
        value, confidence, ratio, runner = _decide_one(
            scores.get(axis), policy.prior, rules.lineage.get(axis)
        )
        if value is None:
            continue
        conf[axis] = confidence
        if ratio >= policy.conflict_ratio:
            conflicts.append(f"{axis}: {value} vs {runner}")
        if axis in ("post_contrast", "localizer", "spinal_cord"):
            flag = _flag(value)
            if axis == "localizer":
                result.localizer = bool(flag)
            else:
                setattr(result, axis, flag)
        else:
            setattr(result, axis, value)
    threshold = policy.set_threshold
    for axis in SET_AXES:
        kept = {v: s for v, s in (scores.get(axis) or {}).items() if s >= threshold}
        setattr(result, axis, frozenset(kept))
        if kept:
            conf[axis] = max(s / (s + policy.prior) for s in kept.values())
    if "intent" not in conf:
        result.intent = _DEFAULT_INTENT.get(
            result.base, "anat" if result.base != "unknown" else "misc"
        )
        conf["intent"] = conf.get("base", 0.0)
    result.axis_confidence = conf
    _name(fp, result, rules, conflicts)
    return result


def _name(fp: Fingerprint, result: Classification, rules: RulePack, conflicts: list[str]) -> None:
    """Pick the BIDS entry, entities, overall confidence and review reasons (in place)."""
    entry = match_bids(fp, result, rules.bids)
    result.bids_datatype = entry.datatype
    result.bids_suffix = entry.suffix
    if entry.intent and result.intent not in ("excluded", "localizer"):
        result.intent = entry.intent
    result.bids_suffix, result.entities = bids_entities(fp, result, entry)
    if (
        entry.datatype == "derivatives"
        and rules.policy.synthetic_as == "anat"
        and result.provenance == "SyMRI"
    ):
        # research profile: SyMRI synthetic contrasts named as anat with rec-synthetic
        result.bids_datatype, result.bids_suffix = "anat", _synthetic_suffix(result)
        result.entities["rec"] = "synthetic"
    decided = [result.axis_confidence.get(axis, 0.0) for axis in entry.decided_by]
    result.confidence = round(min(decided) if decided else 0.0, 3)
    reasons = result.review_reasons
    if result.intent not in ("excluded", "localizer"):
        if not result.bids_suffix:
            reasons.append(entry.review or "no BIDS mapping for the decided axes")
        if result.confidence < rules.policy.review_below:
            weakest = min(entry.decided_by, key=lambda axis: result.axis_confidence.get(axis, 0.0))
            reasons.append(
                f"low confidence {result.confidence:.2f} for {entry.id}: {_support(result, weakest)}"
            )
        relevant = [c for c in conflicts if c.split(":")[0] in entry.decided_by]
        reasons.extend(f"sources disagree on {c}" for c in relevant)
    if result.intent != "excluded":
        _second_opinion(fp, result, reasons)
    if result.spinal_cord and rules.policy.review_spinal_cord:
        reasons.append("spinal cord series: site policy asks for review")
    result.review_required = bool(reasons) and result.intent != "excluded"


def _support(result: Classification, axis: str) -> str:
    """What an axis rests on, for a review reason: 'intent=func: physics 2.2, text 1.0; rival dwi:
    text 1.0' (only built for stacks that go to review)."""
    chosen = getattr(result, axis, None)
    value = chosen if isinstance(chosen, str) else None
    by_value: dict[str, dict[str, float]] = {}
    for vote in result.evidence:
        if vote.axis == axis and vote.weight > 0:
            sources = by_value.setdefault(vote.value, {})
            sources[vote.source] = sources.get(vote.source, 0.0) + vote.weight
    if not by_value:
        return f"no evidence on {axis}"

    def listed(sources: dict[str, float]) -> str:
        return ", ".join(
            f"{src} {w:.1f}" for src, w in sorted(sources.items(), key=lambda kv: -kv[1])
        )

    mine = by_value.pop(value, {}) if value else {}
    text = f"{axis}={value}: {listed(mine)}" if mine else f"{axis} undecided"
    if by_value:
        rival, sources = max(by_value.items(), key=lambda kv: sum(kv[1].values()))
        text += f"; rival {rival}: {listed(sources)}"
    return text


_MR_DATATYPES = frozenset({"anat", "func", "dwi", "fmap", "perf", "discard"})
_NO_BIDSGUESS_NAME = frozenset({"perf/dsc"})  # BidsGuess has no DSC name: it cannot disagree
DISAGREEMENT_FACTOR = 0.8  # confidence kept when the BidsGuess-style opinion disagrees


def _second_opinion(fp: Fingerprint, result: Classification, reasons: list[str]) -> None:
    """Fuse the dcm2niix-style BidsGuess opinion (`bidsguess.py`): agreement changes nothing, a
    disagreement lowers the confidence and asks for review, saying what each side said. CT and PET
    are left out (BidsGuess names every CT `ct`, scouts included), and so are derived images, where
    BidsGuess gives no opinion."""
    if fp.modality != "MR" or result.bids_datatype == "derivatives":
        return
    guess = bids_guess(fp)
    if guess is None or guess[0] not in _MR_DATATYPES:
        return
    if result.intent == "localizer":
        ours = "discard"
    elif not result.bids_suffix:
        ours = "unknown"
    else:
        ours = comparable(result.bids_datatype, result.bids_suffix)
    theirs = comparable(*guess)
    if theirs == ours or theirs.endswith("/unknown") or ours in _NO_BIDSGUESS_NAME:
        return
    result.confidence = round(result.confidence * DISAGREEMENT_FACTOR, 3)
    result.evidence.append(Evidence("bidsguess", "bidsguess", "bids", theirs, 0.0))
    reasons.append(f"BidsGuess-style check says {theirs}, the rules say {ours}")


def _synthetic_suffix(result: Classification) -> str:
    for base, suffix in (("T1w", "T1w"), ("T2w", "T2w"), ("PDw", "PDw")):
        if result.base == base:
            return "FLAIR" if "FLAIR" in result.modifiers and base == "T2w" else suffix
    return "T1w" if result.base == "unknown" else result.base


def classify_batch(fingerprints: Iterable[Fingerprint], rules: RulePack) -> list[Classification]:
    """Classify many stacks with one rule pack."""
    return [classify(fp, rules) for fp in fingerprints]
