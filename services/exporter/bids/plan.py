"""Naming a whole export: targets per stack, derivatives, SyMRI grouping, `run-` numbers, sessions.

Names are decided for all stacks of a run at once (`plan_names`), because `run-` numbers depend on
the other stacks: when two stacks of a subject/session would get the same name they are numbered
`run-1`, `run-2`, ... by acquisition time (then series number, then stack key), so the same input
always gives the same names whatever order the stacks arrive in. Stacks that belong together
(magnitude and phase, echoes, inversions, a GRE field map's magnitudes and phase difference) are
numbered as one family so their run numbers line up.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import PurePosixPath
from typing import Any, Literal

from services.exporter.bids.entities import (
    EntityValue,
    bids_path,
    load_entity_table,
    ordered_entities,
    sanitize_label,
)
from services.exporter.bids.stack import ExportStack
from shared.vocabulary import ExportLayout as Layout

DERIVATIVES = PurePosixPath("derivatives")


@dataclass(frozen=True)
class NamingRules:
    """The naming tables of `naming.json`: valid raw suffixes, run families, derived constructs."""

    raw_suffixes: Mapping[str, frozenset[str]]
    run_families: Mapping[str, str]  # suffix -> family name
    split_entities: frozenset[str]
    derived_constructs: Mapping[str, Mapping[str, str]]
    provenance: Mapping[str, Mapping[str, Any]]
    series_splits: Sequence[Mapping[str, Any]] = ()

    def is_standard(self, datatype: str, suffix: str) -> bool:
        """True when BIDS defines `suffix` for raw data of `datatype`."""
        return suffix in self.raw_suffixes.get(datatype, frozenset())


@lru_cache(maxsize=1)
def load_naming_rules() -> NamingRules:
    raw = json.loads(resources.files(__package__).joinpath("naming.json").read_text("utf-8"))
    families = {s: name for name, suffixes in raw["run_families"].items() for s in suffixes}
    return NamingRules(
        raw_suffixes={k: frozenset(v) for k, v in raw["raw_suffixes"].items()},
        run_families=families,
        split_entities=frozenset(raw["split_entities"]),
        derived_constructs=raw["derived_constructs"],
        provenance=raw["provenance"],
        series_splits=raw["series_splits"],
    )


@dataclass(frozen=True)
class Target:
    """Where a stack goes: dataset `root` (`""` or `derivatives/<pipeline>`), datatype, suffix, entities."""

    root: PurePosixPath
    datatype: str
    suffix: str
    entities: tuple[tuple[str, str], ...]  # ordered (key, formatted value), without run

    @property
    def pipeline(self) -> str | None:
        """The derivative pipeline name, or `None` for raw data."""
        parts = self.root.parts
        return parts[1] if len(parts) >= 2 and parts[0] == DERIVATIVES.name else None

    def path(self, layout: Layout, run: int | None = None) -> PurePosixPath:
        return _target_path(self, layout, run)


@lru_cache(maxsize=8192)
def _target_path(target: Target, layout: Layout, run: int | None) -> PurePosixPath:
    """`Target.path`, kept: a plan asks for a target's path several times (problems, series
    splits, names), and the same targets again when the cohort is planned again."""
    entities: dict[str, EntityValue] = dict(target.entities)
    if run is not None:
        entities["run"] = run
    relative = bids_path(entities, target.suffix, datatype=target.datatype, layout=layout)
    return relative if layout == "flat" else target.root / relative


def stack_target(
    stack: ExportStack, *, group_symri: bool = False, rules: NamingRules | None = None
) -> Target:
    """The target of one stack, before run numbering.

    In order: SyMRI outputs go to `derivatives/symri/` when grouped (or when the classification
    calls them derivatives) and otherwise stay raw with `rec-synthetic`; derived constructs (ADC,
    FA, Trace, CBF, QSM, MinIP, ...) go to `derivatives/scanner/` under the names of
    `naming.json`; processed SWI (provenance SWIRecon without `part-`) too; any other stack the
    classification puts in `derivatives` goes to `derivatives/scanner/<intent>/` with its suffix.
    EPIMix gets `acq-epimix`.
    """
    rules = rules or load_naming_rules()
    entities: dict[str, EntityValue] = {
        load_entity_table().spec(k).key: v for k, v in stack.entities.items() if k != "run"
    }
    entities["sub"] = stack.subject
    if stack.session:
        entities["ses"] = stack.session
    else:
        entities.pop("ses", None)
    root = PurePosixPath("")
    datatype, suffix = stack.datatype, stack.suffix
    # where a derivative lives when the classification says "derivatives" without a datatype
    intent_datatype = (
        stack.intent if stack.intent and stack.intent in rules.raw_suffixes else "anat"
    )

    branch = rules.provenance.get(stack.provenance or "", {})
    derived = next(
        (rules.derived_constructs[c] for c in stack.constructs if c in rules.derived_constructs),
        None,
    )
    if branch.get("derived_unless_entity") and branch["derived_unless_entity"] not in entities:
        derived = derived or branch
    if branch.get("group_pipeline"):  # SyMRI: its maps and synthetic images stay together
        if group_symri or datatype == DERIVATIVES.name:
            root = DERIVATIVES / branch["group_pipeline"]
            datatype = intent_datatype if datatype == DERIVATIVES.name else datatype
        else:
            for key, value in branch.get("raw_entities", {}).items():
                entities.setdefault(key, value)
    elif derived is not None:
        root = DERIVATIVES / derived["pipeline"]
        datatype, suffix = derived["datatype"], derived["suffix"]
        if derived.get("desc"):
            entities["desc"] = derived["desc"]
    elif datatype == DERIVATIVES.name:
        root, datatype = DERIVATIVES / "scanner", intent_datatype
    else:
        for key, value in branch.get("raw_entities", {}).items():
            entities.setdefault(key, value)
    if datatype == "func" and not sanitize_label(entities.get("task", "")):
        # BIDS requires task- on functional data: the sorter's label, else the protocol's name
        entities["task"] = (
            sanitize_label(stack.task_name or "")
            or sanitize_label(stack.summary.protocol_name)
            or sanitize_label(stack.summary.series_description)
            or "unknown"
        )
    if not sanitize_label(stack.subject):
        raise ValueError(
            f"stack {stack.key}: subject label {stack.subject!r} has no letters or digits"
        )
    return Target(root, datatype, suffix, tuple(ordered_entities(entities)))


@dataclass
class _Planned:
    stack: ExportStack
    target: Target
    order: tuple[Any, ...] = field(default=())


def _order_key(stack: ExportStack) -> tuple[Any, ...]:
    """Acquisition day, then time of day (stacks without a time last in their day), then series."""
    when = stack.acquired_at
    has_time = bool((stack.acquisition_time or stack.summary.acquisition_time or "").strip())
    day = when.date() if when is not None else datetime.max.date()
    clock = when.time() if when is not None and has_time else datetime.max.time()
    number = stack.summary.series_number if stack.summary.series_number is not None else 1 << 30
    return (day, clock, number, stack.summary.series_instance_uid, stack.summary.stack_key)


def naming_problems(stacks: Iterable[ExportStack], *, group_symri: bool = False) -> dict[str, str]:
    """Why some stacks cannot be named (unknown entity, empty subject label, bad index), by key.

    The service fails those items and plans the others: one bad classification never stops a run.
    """
    problems: dict[str, str] = {}
    for stack in stacks:
        try:
            stack_target(stack, group_symri=group_symri).path("bids")
        except ValueError as error:
            problems[stack.key] = str(error)
    return problems


def _constant(stack: ExportStack, name: str) -> Any:
    value = stack.summary.constants.get(name)
    return None if value in (None, "") else value


def _as_number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _split_series(planned: list[_Planned], rules: NamingRules, layout: Layout) -> None:
    """Give stacks of one series that would share a name the entity their constants differ by.

    A dual-echo series classified as one MEGRE suffix gets `echo-1`/`echo-2` (the ECHO constant, or
    the rank of TE), magnitude and phase stacks get `part-mag`/`part-phase`, MP2RAGE inversions
    `inv-1`/`inv-2` (rank of TI). Entities the classification already gave are kept.
    """
    groups: dict[tuple[PurePosixPath, str], list[_Planned]] = defaultdict(list)
    for p in planned:
        groups[(p.target.path(layout), p.stack.summary.series_instance_uid)].append(p)
    for members in groups.values():
        if len(members) < 2:
            continue
        for split in rules.series_splits:
            entity, constant = split["entity"], split["constant"]
            if any(entity in dict(p.target.entities) for p in members):
                continue
            values = [_constant(p.stack, constant) for p in members]
            if None in values or len({str(v) for v in values}) < 2:
                continue
            labels: list[str | None]
            if "values" in split:
                labels = [split["values"].get(str(v).upper()) for v in values]
            elif all(str(v).isdigit() for v in values) and entity == "echo":
                labels = [str(int(v)) for v in values]
            else:
                keys = [
                    _as_number(_constant(p.stack, split.get("rank_by", constant))) for p in members
                ]
                if None in keys:
                    continue
                ranks = {k: i for i, k in enumerate(sorted(set(keys)), start=1)}  # type: ignore[type-var]
                labels = [str(ranks[k]) for k in keys]
            if None in labels:
                continue
            for p, label in zip(members, labels, strict=True):
                entities = dict(p.target.entities)
                entities[load_entity_table().spec(entity).key] = str(label)
                p.target = replace(p.target, entities=tuple(ordered_entities(entities)))


def plan_names(
    stacks: Sequence[ExportStack], *, layout: Layout = "bids", group_symri: bool = False
) -> dict[str, PurePosixPath]:
    """Base path (no extension) of every stack, by `ExportStack.key`, relative to the dataset root.

    Deterministic: the result does not depend on the order of `stacks`. Raises `ValueError` when a
    stack cannot be named; `naming_problems` finds those stacks beforehand.
    """
    rules = load_naming_rules()
    planned = [
        _Planned(s, stack_target(s, group_symri=group_symri, rules=rules), _order_key(s))
        for s in stacks
    ]
    keys = [p.stack.key for p in planned]
    if len(keys) != len(set(keys)):
        raise ValueError("two stacks share a key (SeriesInstanceUID|stack_key)")

    _split_series(planned, rules, layout)
    by_name: dict[PurePosixPath, list[_Planned]] = defaultdict(list)
    for p in planned:
        by_name[p.target.path(layout)].append(p)

    def family(p: _Planned) -> tuple[Any, ...]:
        t = p.target
        kept = tuple((k, v) for k, v in t.entities if k not in rules.split_entities)
        return (t.root, t.datatype, rules.run_families.get(t.suffix, t.suffix), kept)

    families: dict[tuple[Any, ...], list[PurePosixPath]] = defaultdict(list)
    for name, members in by_name.items():
        families[family(members[0])].append(name)

    result: dict[str, PurePosixPath] = {}
    for names in families.values():
        numbered = any(len(by_name[n]) > 1 for n in names)
        for name in names:
            members = sorted(by_name[name], key=lambda p: p.order)
            for index, p in enumerate(members, start=1):
                result[p.stack.key] = p.target.path(layout, index if numbered else None)
    return result


def select_stacks(
    stacks: Iterable[ExportStack],
    *,
    include_intents: Iterable[str] | None = None,
    include_provenance: Iterable[str] | None = None,
) -> list[ExportStack]:
    """The stacks an export keeps (`includeIntents`, `includeProvenance`).

    Stacks of the vendor branches (SyMRI, SWIRecon, EPIMix) are kept only when their provenance is
    listed; other provenances (RawRecon, DTIRecon, ...) follow the intent filter alone. Localizers
    and excluded stacks are never exported. `None` means "no filter".
    """
    intents = set(include_intents) if include_intents is not None else None
    provenances = set(include_provenance) if include_provenance is not None else None
    branches = set(load_naming_rules().provenance)
    kept = []
    for stack in stacks:
        if stack.intent in ("localizer", "excluded"):
            continue
        if intents is not None and (stack.intent or stack.datatype) not in intents:
            continue
        if (
            provenances is not None
            and stack.provenance in branches
            and stack.provenance not in provenances
        ):
            continue
        kept.append(stack)
    return kept


@dataclass(frozen=True)
class StudyVisit:
    """One study of a subject: its (shifted) date or a timepoint label given by anonymization."""

    subject: str
    study_instance_uid: str
    study_date: str | None = None  # DICOM DA, already shifted when dates were shifted
    study_time: str | None = None
    timepoint: str | None = None  # e.g. "baseline", "m12": used as is when present


def assign_sessions(
    visits: Iterable[StudyVisit], *, style: Literal["date", "timepoint"] = "date"
) -> dict[str, str]:
    """Session label per StudyInstanceUID.

    `date`: the study's (shifted) date `YYYYMMDD`; two studies on one day get `...a`, `...b` by
    time; a study without a date uses its timepoint label, else `nodate`. `timepoint`: the
    anonymizer's timepoint label when given, else `1`, `2`, ... in date order within the subject.
    Studies without a date are ordered after dated ones, by UID.
    """
    by_subject: dict[str, list[StudyVisit]] = defaultdict(list)
    for visit in visits:
        by_subject[visit.subject].append(visit)
    labels: dict[str, str] = {}
    for subject_visits in by_subject.values():
        ordered = sorted(
            {v.study_instance_uid: v for v in subject_visits}.values(),
            key=lambda v: (
                v.study_date is None,
                v.study_date or "",
                v.study_time or "",
                v.study_instance_uid,
            ),
        )
        if style == "timepoint":
            for index, visit in enumerate(ordered, start=1):
                labels[visit.study_instance_uid] = sanitize_label(visit.timepoint or "") or str(
                    index
                )
            continue
        same_day: dict[str, list[StudyVisit]] = defaultdict(list)
        for visit in ordered:
            day = sanitize_label(visit.study_date or "") or sanitize_label(visit.timepoint or "")
            same_day[day or "nodate"].append(visit)
        for day, day_visits in same_day.items():
            for index, visit in enumerate(day_visits):
                tail = chr(ord("a") + index) if len(day_visits) > 1 and index < 26 else ""
                tail = tail or (str(index + 1) if len(day_visits) > 1 else "")
                labels[visit.study_instance_uid] = day + tail
    return labels
