"""Rule packs: versioned data files (`packs/<profile>.yaml`), their schema, and the compiled form.

A rule is a conjunction over fingerprint feature tokens (`all`, `any`, `none`) plus optional numeric
ranges, and it *votes*: `{axis: value}` with a weight, scaled by the weight of its evidence source
(coded DICOM > vendor fields > physics > text). Rules never decide alone; the classifier sums the
votes per axis. Compilation indexes every rule under one of its required tokens, so classifying a
stack touches only the rules whose anchor token the stack has (plus the few with no token at all).

A pack may `extends:` another; its rules are appended, a rule with the same id replaces the parent's,
and `disable:` removes parent rules by id. `bids` entries map decided axes to datatype and suffix.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.sorter.rules.fingerprint import Fingerprint

_PACKS = "services.sorter.rules.packs"

Source = Literal["coded", "vendor", "physics", "text"]
SET_AXES = ("modifiers", "constructs", "acceleration")
ONE_AXES = (
    "base",
    "technique",
    "provenance",
    "intent",
    "post_contrast",
    "localizer",
    "spinal_cord",
    "kernel",
    "pet_recon",
)
AXES = ONE_AXES + SET_AXES
NUMERIC_FIELDS = (
    "tr",
    "te",
    "ti",
    "flip_angle",
    "etl",
    "echo_number",
    "field_strength",
    "n_diffusion_directions",
    "n_volumes",
    "n_slices",
    "n_instances",
    "fov_mm",
    "aspect",
    "slice_thickness",
    "kvp",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuleSpec(_Strict):
    """One rule as written in the pack file."""

    id: str
    source: Source
    all: list[str] = Field(default_factory=list)
    any: list[str] = Field(default_factory=list)
    none: list[str] = Field(default_factory=list)
    range: dict[str, tuple[float | None, float | None]] = Field(default_factory=dict)
    vote: dict[str, str | list[str]]
    weight: float = 1.0
    note: str = ""

    @field_validator("vote")
    @classmethod
    def _known_axes(cls, vote: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        for axis, value in vote.items():
            if axis not in AXES:
                raise ValueError(f"unknown axis {axis!r} (axes: {', '.join(AXES)})")
            if axis in SET_AXES and not isinstance(value, list):
                raise ValueError(f"axis {axis!r} is a set: vote a list")
            if axis in ONE_AXES and not isinstance(value, str):
                raise ValueError(f"axis {axis!r} takes one value: vote a string")
        return vote

    @field_validator("range")
    @classmethod
    def _known_fields(
        cls, ranges: dict[str, tuple[float | None, float | None]]
    ) -> dict[str, tuple[float | None, float | None]]:
        for name in ranges:
            if name not in NUMERIC_FIELDS:
                raise ValueError(f"range on unknown field {name!r}")
        return ranges

    @model_validator(mode="after")
    def _features_are_namespaced(self) -> RuleSpec:
        for token in (*self.all, *self.any, *self.none):
            if ":" not in token:
                raise ValueError(
                    f"rule {self.id}: feature {token!r} needs a namespace (txt:, it:, ...)"
                )
        return self


class BidsWhen(_Strict):
    intent: list[str] = Field(default_factory=list)
    base: list[str] = Field(default_factory=list)
    technique: list[str] = Field(default_factory=list)
    provenance: list[str] = Field(default_factory=list)
    modifiers_any: list[str] = Field(default_factory=list)
    modifiers_none: list[str] = Field(default_factory=list)
    constructs_any: list[str] = Field(default_factory=list)
    constructs_none: list[str] = Field(default_factory=list)
    derived: bool | None = None  # ImageType DERIVED / SECONDARY
    kind: list[str] = Field(default_factory=list)


class BidsEntry(_Strict):
    id: str
    when: BidsWhen
    datatype: str
    suffix: str
    intent: str | None = (
        None  # override the voted intent (e.g. derived maps stay with their family)
    )
    entities: dict[str, str] = Field(default_factory=dict)
    decided_by: list[str] = Field(default_factory=lambda: ["intent", "base"])
    review: str = ""  # the review reason when this entry names nothing (suffix "")


class Policy(_Strict):
    review_below: float = 0.6  # overall confidence under which a human should look
    review_spinal_cord: bool = True  # spine series always go to review (policy of the site)
    conflict_ratio: float = 0.5  # runner-up score / winner score above which sources conflict
    set_threshold: float = 1.0  # net score a set-axis value needs to be kept
    prior: float = 1.0  # pseudo-score of "something else": a lone weak vote stays uncertain
    synthetic_as: Literal["derivatives", "anat"] = "derivatives"  # SyMRI outputs


class PackFile(_Strict):
    version: str
    profile: str
    extends: str | None = None
    description: str = ""
    sources: dict[Source, float] = Field(default_factory=dict)
    policy: Policy | None = None
    disable: list[str] = Field(default_factory=list)
    rules: list[RuleSpec] = Field(default_factory=list)
    kernels: dict[str, list[str]] = Field(default_factory=dict)
    hierarchy: dict[str, dict[str, str]] = Field(default_factory=dict)  # axis -> child -> parent
    basis: dict[str, str] = Field(default_factory=dict)  # rule-id prefix -> why such rules hold
    bids: list[BidsEntry] = Field(default_factory=list)


class Evidence(NamedTuple):
    """One vote: `rule` (of `source`) voted `value` on `axis` with `weight` (already source-scaled).

    A named tuple: a stack collects a few dozen of these, and tuples are the cheapest records. A
    compiled rule builds its own once (`CompiledRule.evidence`), so voting only shares them.
    """

    rule: str
    source: str
    axis: str
    value: str
    weight: float


@dataclass(frozen=True, slots=True, eq=False)  # identity hash: cheap de-duplication
class CompiledRule:
    id: str
    source: str
    need: frozenset[str]
    any_of: frozenset[str]
    none_of: frozenset[str]
    ranges: tuple[tuple[str, float | None, float | None], ...]
    votes: tuple[tuple[str, str], ...]  # (axis, value), set axes flattened
    weight: float  # rule weight x source weight
    evidence: tuple[Evidence, ...] = ()  # one per vote, built at compile time

    def matches(self, features: frozenset[str], fp: Fingerprint) -> bool:
        if not self.need <= features:
            return False
        if self.any_of and self.any_of.isdisjoint(features):
            return False
        if self.none_of and not self.none_of.isdisjoint(features):
            return False
        for name, low, high in self.ranges:
            value = getattr(fp, name)
            if (
                value is None
                or (low is not None and value < low)
                or (high is not None and value > high)
            ):
                return False
        return True


@dataclass(frozen=True, slots=True)
class RulePack:
    """A validated, compiled rule pack. `version` keys stored results (stack_key, version)."""

    profile: str
    version: str
    sources: dict[str, float]
    policy: Policy
    rules: tuple[CompiledRule, ...]
    index: dict[str, tuple[CompiledRule, ...]]  # anchor token -> rules
    anchors: frozenset[str]  # the index's tokens, for one set intersection per stack
    unanchored: tuple[CompiledRule, ...]
    kernels: dict[str, str]  # kernel word -> class
    lineage: dict[str, dict[str, tuple[str, ...]]]  # axis -> value -> its ancestors, nearest first
    bids: tuple[BidsEntry, ...]


def _read(profile: str) -> dict[str, Any]:
    path = resources.files(_PACKS).joinpath(f"{profile}.yaml")
    if not path.is_file():
        raise ValueError(f"no rule pack for profile {profile!r}")
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        raise ValueError(f"rule pack {profile!r}: expected a mapping at the top level")
    return loaded


def merged_pack(profile: str) -> PackFile:
    """The uncompiled pack of `profile` with its parents merged in (benches edit it, then compile)."""
    return _merged(profile)


def _merged(profile: str, seen: tuple[str, ...] = ()) -> PackFile:
    if profile in seen:
        raise ValueError(f"rule packs extend each other in a loop: {' -> '.join((*seen, profile))}")
    pack = PackFile.model_validate(_read(profile))
    if pack.extends is None:
        if pack.policy is None:
            raise ValueError(f"rule pack {profile!r} has no policy and extends nothing")
        return pack
    parent = _merged(pack.extends, (*seen, profile))
    own = {rule.id for rule in pack.rules}
    rules = [r for r in parent.rules if r.id not in own and r.id not in set(pack.disable)]
    return PackFile(
        version=f"{parent.version}+{pack.profile}.{pack.version}",
        profile=pack.profile,
        description=pack.description or parent.description,
        sources={**parent.sources, **pack.sources},
        policy=pack.policy or parent.policy,
        rules=[*rules, *pack.rules],
        kernels={**parent.kernels, **pack.kernels},
        hierarchy={**parent.hierarchy, **pack.hierarchy},
        basis={**parent.basis, **pack.basis},
        bids=pack.bids or parent.bids,
    )


_ANCHOR_PREFERENCE = ("seq:", "seqname:", "it:", "ac:", "so:", "txt:", "psd:", "ss:", "sv:")


def _anchor(need: frozenset[str]) -> str:
    # index under the most specific token so that common tokens (kind:mr) do not fan out
    for prefix in _ANCHOR_PREFERENCE:
        for token in sorted(need):
            if token.startswith(prefix):
                return token
    return sorted(need)[0]


def compile_pack(pack: PackFile) -> RulePack:
    """Validate cross-references and build the lookup index."""
    if pack.policy is None:
        raise ValueError(f"rule pack {pack.profile!r} has no policy")
    ids = [r.id for r in pack.rules]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise ValueError(f"duplicate rule ids: {sorted(duplicates)}")
    compiled = []
    for spec in pack.rules:
        if not spec.note and not any(spec.id.startswith(prefix) for prefix in pack.basis):
            raise ValueError(f"rule {spec.id}: says nothing about why it holds (no note, no basis)")
        if spec.source not in pack.sources:
            raise ValueError(f"rule {spec.id}: source {spec.source!r} has no weight in `sources`")
        votes: list[tuple[str, str]] = []
        for axis, value in spec.vote.items():
            votes.extend((axis, v) for v in (value if isinstance(value, list) else [value]))
        compiled.append(
            CompiledRule(
                id=spec.id,
                source=spec.source,
                need=frozenset(spec.all),
                any_of=frozenset(spec.any),
                none_of=frozenset(spec.none),
                ranges=tuple((k, lo, hi) for k, (lo, hi) in spec.range.items()),
                votes=tuple(votes),
                weight=spec.weight * pack.sources[spec.source],
                evidence=tuple(
                    Evidence(
                        spec.id, spec.source, axis, value, spec.weight * pack.sources[spec.source]
                    )
                    for axis, value in votes
                ),
            )
        )
    index: dict[str, list[CompiledRule]] = {}
    unanchored: list[CompiledRule] = []
    for rule in compiled:
        if rule.need:
            index.setdefault(_anchor(rule.need), []).append(rule)
        elif rule.any_of:
            for token in rule.any_of:
                index.setdefault(token, []).append(rule)
        else:
            unanchored.append(rule)
    kernels = {word.lower(): cls for cls, words in pack.kernels.items() for word in words}
    lineage: dict[str, dict[str, tuple[str, ...]]] = {}
    for axis, parents in pack.hierarchy.items():
        if axis not in ONE_AXES:
            raise ValueError(f"hierarchy on {axis!r}: only one-valued axes have families")
        chains: dict[str, tuple[str, ...]] = {}
        for child in parents:
            chain: list[str] = []
            node = child
            while node in parents:
                node = parents[node]
                if node in chain or node == child:
                    raise ValueError(f"hierarchy of {axis!r} has a loop at {child!r}")
                chain.append(node)
            chains[child] = tuple(chain)
        lineage[axis] = chains
    return RulePack(
        profile=pack.profile,
        version=pack.version,
        sources={str(k): v for k, v in pack.sources.items()},
        policy=pack.policy,
        rules=tuple(compiled),
        index={k: tuple(v) for k, v in index.items()},
        anchors=frozenset(index),
        unanchored=tuple(unanchored),
        kernels=kernels,
        lineage=lineage,
        bids=tuple(pack.bids),
    )


@cache
def load_rules(profile: str = "standard") -> RulePack:
    """The compiled rule pack of a sorting `profile` (`standard` or `research`)."""
    return compile_pack(_merged(profile))
