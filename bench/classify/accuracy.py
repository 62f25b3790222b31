"""Classification accuracy on a labelled folder of real DICOM (one label per series).

    .venv/bin/python bench/classify/accuracy.py FOLDER LABELS [--exclude-overlap] [--by-source]
        [--leave-one-source-out] [--list]

LABELS is a tab-separated file with at least the columns `folder` (a sub-folder of FOLDER holding one
series), `label`, `vendor` and `why`. Every file under a folder goes through the project's own
extraction core (`parse_instance` + `build_stacks`, the pure code the extractor service runs, no
services) and the sorter's pure path (checkup, fingerprint, classify, complete): nothing is read twice
and nothing comes from a reference converter.

Scoring (documented in docs/adr-0016-bidsguess.md, "Measuring"):
- Each classified stack is mapped to the label vocabulary (`predicted_label`): BIDS datatype/suffix,
  with excluded objects named by their kind (documents, waveforms, raw data, spectroscopy ->
  `non-image`; segmentations, radiographs, secondary captures -> `other`).
- A **series** counts once. It is right when every one of its image stacks maps to the label; its
  confidence is the lowest of its stacks'; it is reviewed when any stack asks for review. A folder
  whose files the extractor rejects as non-image objects is predicted `non-image` (or `other` for
  image kinds outside MR/CT/PET).
- `other` rows are right only when predicted `other` (a derived or out-of-scope object that must not
  be exported as a raw acquisition); `DWI-b0` also accepts `fmap-EPI` (a b0-only reverse-PE run is
  both).
- `uncertain` rows are left out of the headline figures and scored separately against the best guess
  their `why` gives ("best guess X").
- "Wrong without review" is a wrong series with no stack flagged for review: the share that matters.
- `--exclude-overlap` leaves out series that are also in the project's in-repo labelled set
  (tests/data/labels/shared_data.yaml, matched by SeriesInstanceUID).
- `--leave-one-source-out`: rules carry no memory of where they came from, so the provenance is kept
  beside this script (`rule_provenance.yaml`: rule id -> the sources that were in view when it was
  written). For each source, those rules are removed from the pack and the source is scored again.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.extractor.catalog.parse import parse_instance
from services.extractor.catalog.records import InstanceRecord, Rejection
from services.extractor.catalog.stacks import build_stacks
from services.sorter.rules import (
    Classification,
    Fingerprint,
    RulePack,
    checkup,
    classify_batch,
    complete,
    fingerprint_batch,
    load_rules,
)
from services.sorter.rules.pack import compile_pack, merged_pack
from services.sorter.rules.vocabulary import vocabulary

HERE = Path(__file__).resolve().parent
PROVENANCE = HERE / "rule_provenance.yaml"
SKIP_FILES = {"LICENSE", "README.md", "README", ".DS_Store"}
NON_IMAGE_KINDS = frozenset(
    {
        "structured_report",
        "radiotherapy",
        "waveform",
        "raw_data",
        "mr_spectroscopy",
        "vendor_private",
        "encapsulated_document",
        "presentation_state",
        "key_object",
    }
)
CONFIDENCE_BINS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)
ALSO_RIGHT = {"DWI-b0": {"fmap-EPI"}}
LABELS = [
    "T1w",
    "T2w",
    "PDw",
    "FLAIR",
    "T2starw",
    "SWI",
    "angio",
    "DWI",
    "DWI-b0",
    "DWI-derived",
    "BOLD",
    "sbref",
    "fmap-phasediff",
    "fmap-phase",
    "fmap-magnitude",
    "fmap-EPI",
    "ASL",
    "ASL-M0",
    "ASL-derived",
    "localizer",
    "CT",
    "CT-localizer",
    "PET",
    "non-image",
    "other",
]
_BEST_GUESS = re.compile(r"best guess (.*)")
_WORD = re.compile(r"[A-Za-z0-9*-]+")
_SUFFIX_LABEL = {
    ("anat", "T1w"): "T1w",
    ("anat", "IRT1"): "T1w",
    ("anat", "MP2RAGE"): "T1w",
    ("anat", "UNIT1"): "T1w",
    ("anat", "T2w"): "T2w",
    ("anat", "PDw"): "PDw",
    ("anat", "FLAIR"): "FLAIR",
    ("anat", "T2starw"): "T2starw",
    ("anat", "MEGRE"): "T2starw",
    ("anat", "MESE"): "other",  # no MESE label: the vocabulary names it "other" (see labels why)
    ("anat", "swi"): "SWI",
    ("derivatives", "swi"): "SWI",
    ("anat", "angio"): "angio",
    ("dwi", "dwi"): "DWI",
    ("derivatives", "dwimap"): "DWI-derived",
    ("derivatives", "perfmap"): "ASL-derived",
    ("func", "bold"): "BOLD",
    ("func", "sbref"): "sbref",
    ("fmap", "phasediff"): "fmap-phasediff",
    ("fmap", "phase1"): "fmap-phase",
    ("fmap", "phase2"): "fmap-phase",
    ("fmap", "magnitude"): "fmap-magnitude",
    ("fmap", "magnitude1"): "fmap-magnitude",
    ("fmap", "magnitude2"): "fmap-magnitude",
    ("fmap", "epi"): "fmap-EPI",
    ("fmap", "fieldmap"): "fmap-fieldmap",
    ("perf", "asl"): "ASL",
    ("perf", "m0scan"): "ASL-M0",
    ("perf", "dsc"): "DSC",
    ("ct", "ct"): "CT",
    ("pet", "pet"): "PET",
}


def predicted_label(c: Classification, fp: Fingerprint | None, kind: str) -> str:
    """One stack's decision in the label vocabulary (see the module docstring)."""
    if c.intent == "excluded":
        return "non-image" if kind in NON_IMAGE_KINDS else "other"
    if c.intent == "localizer" or c.localizer:
        return "CT-localizer" if kind.endswith("ct") else "localizer"
    if not c.bids_suffix:
        return "unknown"
    b_zero_only = fp is not None and bool(fp.b_values) and max(fp.b_values) < 50
    if (c.bids_datatype, c.bids_suffix) == ("dwi", "dwi") and b_zero_only:
        return "DWI-b0"
    label = _SUFFIX_LABEL.get((c.bids_datatype, c.bids_suffix))
    if label is not None:
        return label
    return "other" if c.bids_datatype == "derivatives" else f"{c.bids_datatype}/{c.bids_suffix}"


@dataclass
class Row:
    folder: str
    label: str
    vendor: str
    why: str

    @property
    def source(self) -> str:
        return self.folder.split("/", 1)[0]

    @property
    def scored_label(self) -> str:
        if self.label != "uncertain":
            return self.label
        found = _BEST_GUESS.search(self.why)  # the first label word after "best guess"
        words = _WORD.findall(found.group(1)) if found else []
        return next((w for w in words if w in LABELS), "uncertain")


@dataclass
class SeriesResult:
    row: Row
    stacks: list[tuple[str, Classification | None, str]] = field(default_factory=list)
    series_uids: set[str] = field(default_factory=set)

    @property
    def predictions(self) -> list[str]:
        return [label for _, _, label in self.stacks]

    @property
    def predicted(self) -> str:
        wanted = self.row.scored_label
        wrong = [p for p in self.predictions if not _matches(wanted, p)]
        return Counter(wrong or self.predictions).most_common(1)[0][0] if self.stacks else "none"

    @property
    def right(self) -> bool:
        return bool(self.stacks) and all(
            _matches(self.row.scored_label, p) for p in self.predictions
        )

    @property
    def reviewed(self) -> bool:
        return any(c is not None and c.review_required for _, c, _ in self.stacks)

    @property
    def confidence(self) -> float:
        values = [c.confidence for _, c, _ in self.stacks if c is not None]
        return min(values) if values else 1.0

    @property
    def reasons(self) -> list[str]:
        return [r for _, c, _ in self.stacks if c is not None for r in c.review_reasons]


def _matches(wanted: str, predicted: str) -> bool:
    return predicted == wanted or predicted in ALSO_RIGHT.get(wanted, set())


def vendor_group(manufacturer: str) -> str:
    if not manufacturer.strip():
        return "unknown"
    vendor = vocabulary().vendor(manufacturer)
    if vendor == "canon" and "toshiba" in manufacturer.lower():
        return "toshiba"
    return vendor if vendor != "unknown" else "other"


def read_labels(path: Path) -> list[Row]:
    with path.open(encoding="utf-8", newline="") as handle:
        return [
            Row(r["folder"], r["label"], r.get("vendor", ""), r.get("why", ""))
            for r in csv.DictReader(handle, delimiter="\t")
        ]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in SKIP_FILES)


@dataclass
class Parsed:
    """One folder after extraction: its stacks and its rejected files (read once, kept for reruns)."""

    row: Row
    records: list[InstanceRecord]
    rejections: list[Rejection]


def parse_folder(root: Path, row: Row) -> Parsed:
    records: list[InstanceRecord] = []
    rejections: list[Rejection] = []
    for path in _files(root / row.folder):
        parsed = parse_instance(path, str(path))
        if isinstance(parsed, InstanceRecord):
            records.append(parsed)
        else:
            rejections.append(parsed)
    return Parsed(row, records, rejections)


def classify_folder(parsed: Parsed, rules: RulePack) -> SeriesResult:
    """Extraction core -> checkup -> fingerprint -> classify -> complete, for one labelled folder."""
    result = SeriesResult(parsed.row)
    stacks = build_stacks(parsed.records)
    result.series_uids = {s.series_instance_uid for s in stacks} | {
        r.series_instance_uid for r in parsed.rejections if r.series_instance_uid
    }
    checked = checkup(stacks, rule_version=rules.version)
    vocab = vocabulary()
    for exclusion in checked.excluded:
        stack = next(
            s
            for s in stacks
            if (s.series_instance_uid, s.stack_key)
            == (exclusion.series_instance_uid, exclusion.stack_key)
        )
        kind = vocab.sop_kinds.get(stack.sop_class_uid, "unknown")
        c = Classification(
            stack_key=exclusion.stack_key,
            rule_version=rules.version,
            intent="excluded",
            confidence=1.0,
            excluded_reason=exclusion.reason,
        )
        result.stacks.append((exclusion.stack_key, c, predicted_label(c, None, kind)))
    fps = fingerprint_batch(checked.accepted)
    for fp, c in zip(fps, complete(classify_batch(fps, rules), fps, rules), strict=True):
        result.stacks.append((fp.stack_key, c, predicted_label(c, fp, fp.kind)))
    if not result.stacks and parsed.rejections:
        # nothing catalogued: the extractor rejected every file (reports, RT, waveforms, raw data)
        kinds = {vocab.sop_kinds.get(r.sop_class_uid or "", "unknown") for r in parsed.rejections}
        label = "non-image" if kinds <= NON_IMAGE_KINDS | {"unknown"} else "other"
        result.stacks.append(("(rejected)", None, label))
    return result


def _pct(n: int, total: int) -> str:
    return f"{n}/{total} ({n / total:.0%})" if total else "0/0"


def _table(title: str, groups: dict[str, list[SeriesResult]]) -> list[str]:
    lines = [f"\n{title}", f"  {'':24s} {'right':>12s} {'wrong,unrev.':>14s} {'reviewed':>9s}"]
    for key in sorted(groups, key=lambda k: (-len(groups[k]), k)):
        items = groups[key]
        right = sum(s.right for s in items)
        silent = sum(not s.right and not s.reviewed for s in items)
        reviewed = sum(s.reviewed for s in items)
        lines.append(f"  {key:24s} {_pct(right, len(items)):>12s} {silent:>14d} {reviewed:>9d}")
    return lines


def report(results: Sequence[SeriesResult], title: str, *, listing: bool = False) -> str:
    scored = [s for s in results if s.row.label != "uncertain"]
    uncertain = [s for s in results if s.row.label == "uncertain"]
    total = len(scored)
    right = sum(s.right for s in scored)
    silent = [s for s in scored if not s.right and not s.reviewed]
    reviewed = [s for s in scored if s.reviewed]
    lines = [
        f"== {title}",
        f"series scored: {total} (uncertain rows left out: {len(uncertain)})",
        f"right: {_pct(right, total)}",
        f"wrong without review flag: {_pct(len(silent), total)}",
        f"reviewed: {len(reviewed)} (of them right: {sum(s.right for s in reviewed)})",
    ]
    by_label: dict[str, list[SeriesResult]] = defaultdict(list)
    by_vendor: dict[str, list[SeriesResult]] = defaultdict(list)
    for s in scored:
        by_label[s.row.label].append(s)
        by_vendor[vendor_group(s.row.vendor)].append(s)
    lines += _table("by label", by_label)
    lines += _table("by vendor", by_vendor)
    misses = Counter((s.row.label, s.predicted) for s in scored if not s.right)
    lines.append("\nconfusion of the misses (label -> predicted: series)")
    for (label, predicted), n in sorted(misses.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {label:16s} -> {predicted:18s} {n}")
    lines.append("\ncalibration (series confidence = lowest stack confidence)")
    lines.append(f"  {'bin':12s} {'series':>7s} {'right':>6s} {'accuracy':>9s} {'unreviewed':>11s}")
    for low, high in itertools.pairwise(CONFIDENCE_BINS):
        items = [s for s in scored if low <= s.confidence < high]
        if not items:
            continue
        ok = sum(s.right for s in items)
        name = f"[{low:.1f},{min(high, 1.0):.1f}{']' if high > 1 else ')'}"
        lines.append(
            f"  {name:12s} {len(items):7d} {ok:6d} {ok / len(items):9.0%} "
            f"{sum(not s.reviewed for s in items):11d}"
        )
    if uncertain:
        lines.append("\nuncertain rows, against their best guess")
        for s in uncertain:
            verdict = "right" if s.right else "wrong"
            lines.append(
                f"  {s.row.folder:52s} guess {s.row.scored_label:14s} got {s.predicted:14s}"
                f" {verdict}{' (reviewed)' if s.reviewed else ''}"
            )
    wrong = [s for s in results if not s.right] if not listing else list(results)
    if wrong:
        lines.append("\nseries" if listing else "\nwrong series")
        for s in wrong:
            flag = "REVIEW" if s.reviewed else ("ok" if s.right else "SILENT")
            lines.append(
                f"  {flag:6s} {s.row.folder:52s} {s.row.scored_label:14s} -> "
                f"{','.join(s.predictions):30s} conf {s.confidence:.2f}"
            )
            for reason in dict.fromkeys(s.reasons):
                lines.append(f"         - {reason}")
    return "\n".join(lines)


def in_repo_series_uids() -> set[str]:
    """SeriesInstanceUIDs of the in-repo labelled set's package files (pydicom, nibabel, heudiconv)."""
    from tests.unit.sorter.labelled import LABELS, package_file, package_installed

    labels = yaml.safe_load(LABELS.read_text(encoding="utf-8"))
    uids: set[str] = set()
    for label in labels["packages"]:
        if not package_installed(label["package"]):
            continue
        for name in label["files"]:
            parsed = parse_instance(package_file(label["package"], name), name)
            uid = parsed.series.series_instance_uid if isinstance(parsed, InstanceRecord) else None
            uid = uid or getattr(parsed, "series_instance_uid", None)
            if uid:
                uids.add(uid)
    return uids


def rules_without(sources: Iterable[str], profile: str = "standard") -> tuple[RulePack, list[str]]:
    """The pack minus the rules written with any of `sources` in view (rule_provenance.yaml)."""
    provenance = yaml.safe_load(PROVENANCE.read_text(encoding="utf-8")) or {}
    wanted = set(sources)
    dropped = sorted(rule for rule, seen in provenance.items() if wanted & set(seen or ()))
    pack = merged_pack(profile)
    kept = [r for r in pack.rules if r.id not in dropped]
    return compile_pack(pack.model_copy(update={"rules": kept})), dropped


def run(root: Path, labels: Path, rules: RulePack | None = None) -> list[SeriesResult]:
    """Every labelled folder through extraction and sorting (the entry point the tests use)."""
    rules = rules or load_rules("standard")
    return [classify_folder(parse_folder(root, row), rules) for row in read_labels(labels)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--profile", default="standard")
    parser.add_argument(
        "--exclude-overlap",
        action="store_true",
        help="also report without the series that are in the in-repo labelled set",
    )
    parser.add_argument("--by-source", action="store_true", help="accuracy per source folder")
    parser.add_argument("--leave-one-source-out", action="store_true")
    parser.add_argument("--list", action="store_true", help="list every series, not only misses")
    args = parser.parse_args(argv)

    rules = load_rules(args.profile)
    parsed = [parse_folder(args.folder, row) for row in read_labels(args.labels)]
    results = [classify_folder(p, rules) for p in parsed]
    print(f"rule pack {rules.version} ({args.profile})")
    print(report(results, f"all series in {args.labels}", listing=args.list))
    if args.exclude_overlap:
        overlap = in_repo_series_uids()
        shared = [r for r in results if r.series_uids & overlap]
        print(
            "\nseries also in the in-repo labelled set: " + ", ".join(r.row.folder for r in shared)
        )
        print(report([r for r in results if not r.series_uids & overlap], "without them"))
    if args.by_source or args.leave_one_source_out:
        by_source: dict[str, list[SeriesResult]] = defaultdict(list)
        for r in results:
            by_source[r.row.source].append(r)
        print("\n".join(_table("by source (in-sample)", by_source)))
    if args.leave_one_source_out:
        print(
            "\nleave-one-source-out: each source scored without the rules written with it in view"
        )
        print(
            f"  {'source':18s} {'in-sample':>10s} {'held out':>10s} {'silent':>7s}  rules removed"
        )
        totals = [0, 0, 0, 0]
        for source in sorted({p.row.source for p in parsed}):
            held_rules, dropped = rules_without([source], args.profile)
            mine = [p for p in parsed if p.row.source == source]
            before = [r for r in results if r.row.source == source and r.row.label != "uncertain"]
            after = [
                r
                for r in (classify_folder(p, held_rules) for p in mine)
                if r.row.label != "uncertain"
            ]
            n_before, n_after = sum(r.right for r in before), sum(r.right for r in after)
            silent = sum(not r.right and not r.reviewed for r in after)
            totals = [
                totals[0] + n_before,
                totals[1] + n_after,
                totals[2] + len(after),
                totals[3] + silent,
            ]
            print(
                f"  {source:18s} {n_before:>4d}/{len(before):<5d} {n_after:>4d}/{len(after):<5d}"
                f" {silent:7d}  {', '.join(dropped) or '-'}"
            )
        print(
            f"  {'total':18s} {totals[0]:>4d}/{totals[2]:<5d} {totals[1]:>4d}/{totals[2]:<5d}"
            f" {totals[3]:7d}"
        )


if __name__ == "__main__":
    main()
