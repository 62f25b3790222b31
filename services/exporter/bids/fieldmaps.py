"""Linking field maps to the scans they correct: `IntendedFor`, `B0FieldIdentifier`, `B0FieldSource`.

A *field* is the set of fmap images that estimate one B0 field: a GRE pair (magnitude1/2 with
phasediff, or phase1/phase2), a B0 map in Hz with its magnitude, or spin-echo EPI images with
opposite phase encoding (`dir-AP` + `dir-PA`). Fields are grouped by subject, session and their
`acq-`/`run-`/`ce-`/`rec-` entities. Each functional, diffusion or perfusion scan of the same session
gets the field whose slices are parallel to its own (slice normals within ~37 degrees), whose
phase-encoding axis matches (EPI fields only), and that was acquired closest in time.
`IntendedFor` uses BIDS URIs (`bids::sub-01/ses-1/func/...`), as BIDS 1.11 recommends.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

from services.exporter.bids.entities import sanitize_label

_GRE_SUFFIXES = frozenset(
    {"magnitude1", "magnitude2", "magnitude", "phasediff", "phase1", "phase2", "fieldmap"}
)
_EPI_SUFFIXES = frozenset({"epi"})
_MAGNITUDES = frozenset({"magnitude1", "magnitude2", "magnitude"})
_TARGETS = {
    "func": frozenset({"bold", "sbref", "cbv"}),
    "dwi": frozenset({"dwi", "sbref"}),
    "perf": frozenset({"asl", "m0scan"}),
}
_GROUP_ENTITIES = ("acq", "run", "ce", "rec")
_MIN_NORMAL_DOT = 0.8


@dataclass(frozen=True)
class ScanRecord:
    """One exported raw image, as the linker sees it."""

    path: PurePosixPath  # NIfTI path relative to the dataset root
    subject: str
    session: str | None
    datatype: str
    suffix: str
    entities: dict[str, str] = field(default_factory=dict)
    acquired_at: datetime | None = None
    slice_normal: tuple[float, float, float] | None = None
    phase_axis: str | None = None  # "i", "j" or "k" from PhaseEncodingDirection


@dataclass
class _Field:
    identifier: str
    kind: str
    members: list[ScanRecord]

    @property
    def time(self) -> datetime | None:
        times = [m.acquired_at for m in self.members if m.acquired_at is not None]
        return min(times) if times else None


def bids_uri(path: PurePosixPath) -> str:
    return f"bids::{path.as_posix()}"


def _compatible(fmap: _Field, target: ScanRecord) -> bool:
    for member in fmap.members:
        if member.slice_normal and target.slice_normal:
            dot = abs(
                sum(a * b for a, b in zip(member.slice_normal, target.slice_normal, strict=True))
            )
            if dot < _MIN_NORMAL_DOT:
                return False
        if (
            fmap.kind == "epi"
            and member.phase_axis
            and target.phase_axis
            and member.phase_axis != target.phase_axis
        ):
            return False
    return True


def _distance(fmap: _Field, target: ScanRecord) -> float:
    if fmap.time is None or target.acquired_at is None:
        return float("inf")
    return abs((fmap.time - target.acquired_at).total_seconds())


def _fields(records: Sequence[ScanRecord]) -> list[_Field]:
    groups: dict[tuple[Any, ...], list[ScanRecord]] = defaultdict(list)
    for record in records:
        if record.datatype != "fmap":
            continue
        kind = (
            "gre"
            if record.suffix in _GRE_SUFFIXES
            else "epi"
            if record.suffix in _EPI_SUFFIXES
            else None
        )
        if kind is None:
            continue
        extra = tuple(record.entities.get(k, "") for k in _GROUP_ENTITIES)
        groups[(record.subject, record.session or "", kind, extra)].append(record)
    fields = []
    for (subject, session, kind, extra), members in sorted(groups.items()):
        parts = [f"sub{subject}", f"ses{session}" if session else "", kind]
        parts += [f"{k}{v}" for k, v in zip(_GROUP_ENTITIES, extra, strict=True) if v]
        identifier = "_".join(sanitize_label(p) for p in parts if p)
        fields.append(_Field(identifier, kind, sorted(members, key=lambda m: m.path)))
    return fields


def link_fieldmaps(records: Sequence[ScanRecord]) -> dict[PurePosixPath, dict[str, Any]]:
    """Sidecar additions by NIfTI path: fmap images get `B0FieldIdentifier` (and `IntendedFor` on
    all but magnitudes); the scans they correct get `B0FieldSource`. Fields that correct nothing
    are left unlinked."""
    fields = _fields(records)
    intended: dict[str, list[ScanRecord]] = defaultdict(list)
    additions: dict[PurePosixPath, dict[str, Any]] = {}
    for target in sorted(records, key=lambda r: r.path):
        if target.suffix not in _TARGETS.get(target.datatype, frozenset()):
            continue
        candidates = [
            f
            for f in fields
            if f.members[0].subject == target.subject
            and (f.members[0].session or "") == (target.session or "")
            and _compatible(f, target)
        ]
        if not candidates:
            continue
        best = min(candidates, key=lambda f: (_distance(f, target), f.identifier))
        intended[best.identifier].append(target)
        additions[target.path] = {"B0FieldSource": best.identifier}
    for fmap in fields:
        targets = intended.get(fmap.identifier)
        if not targets:
            continue
        uris = [bids_uri(t.path) for t in sorted(targets, key=lambda t: t.path)]
        for member in fmap.members:
            entry: dict[str, Any] = {"B0FieldIdentifier": fmap.identifier}
            if member.suffix not in _MAGNITUDES:
                entry["IntendedFor"] = uris
            additions[member.path] = entry
    return additions


def link_m0scans(records: Sequence[ScanRecord]) -> dict[PurePosixPath, dict[str, Any]]:
    """`IntendedFor` (REQUIRED in BIDS) of each `perf/*_m0scan`: the ASL series of its session it
    calibrates — those sharing its `acq-`/`run-` when any do, else the one acquired closest in time."""
    additions: dict[PurePosixPath, dict[str, Any]] = {}
    asl = [r for r in records if r.datatype == "perf" and r.suffix == "asl"]
    m0scans = [r for r in records if r.datatype == "perf" and r.suffix == "m0scan"]
    for m0 in sorted(m0scans, key=lambda r: r.path):
        same_session = [
            a for a in asl if a.subject == m0.subject and (a.session or "") == (m0.session or "")
        ]
        matching = [
            a
            for a in same_session
            if all(a.entities.get(k) == m0.entities.get(k) for k in ("acq", "run"))
        ]
        if not matching and same_session:
            matching = [min(same_session, key=lambda a: (_time_gap(a, m0), str(a.path)))]
        if matching:
            additions[m0.path] = {
                "IntendedFor": [bids_uri(a.path) for a in sorted(matching, key=lambda a: a.path)]
            }
    return additions


def _time_gap(a: ScanRecord, b: ScanRecord) -> float:
    if a.acquired_at is None or b.acquired_at is None:
        return float("inf")
    return abs((a.acquired_at - b.acquired_at).total_seconds())
