"""Time to BIDS: a raw folder to a BIDS tree, Cohortflow against dcm2niix alone, in one run.

On the same folder and in the same process this runs, after one pass that reads every file into the
page cache:

1. `dcm2niix -z y -ba y -o OUT DIR` (what a researcher would otherwise run), the baseline;
2. `cohortflow run DIR --out OUT` on a private local stack that is already up (start-up is not
   counted, as on a machine where the stack runs);
3. the same with `--anonymize` (unless `--no-anonymize`).

For each Cohortflow run it prints the wall time and its ratio to the baseline (goal: <= 1.5x), each
stage's span (first start to last finish of its jobs) and share of the run, and the CPU seconds each
process of the stack spent (from /proc, process trees), so one sees where the time goes.

    .venv/bin/python -m bench.e2e DIR [--home STATE] [--no-anonymize] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.extract.bench_system import cpu_by_process, files_under
from cohortflow.stack import LocalStack
from services.exporter.convert.dcm2niix import dcm2niix_binary

ROOT = Path(__file__).resolve().parents[1]
# dcm2niix's exit codes for a folder converted whole or in part (8: some files were not
# convertible, as in any real folder with reports or localizers it cannot read)
DCM2NIIX_OK = (0, 8)
AUDIT_PASSWORD = "bench-e2e-audit-password"  # a throwaway stack's audit export


def warm_page_cache(files: list[Path]) -> int:
    """Read every file once so neither side pays the first read from disk. Returns bytes read."""
    total = 0
    for path in files:
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    total += len(chunk)
        except OSError:
            continue
    return total


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_dcm2niix(source: Path, out: Path) -> tuple[float, float, int]:
    """(wall s, CPU s, NIfTI files written) of dcm2niix alone over the whole folder."""
    out.mkdir(parents=True)
    cpu, start = children_cpu(), time.perf_counter()
    done = subprocess.run(
        [str(dcm2niix_binary()), "-z", "y", "-ba", "y", "-o", str(out), str(source)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if done.returncode not in DCM2NIIX_OK:
        raise SystemExit(f"dcm2niix alone exited {done.returncode}")
    wall = time.perf_counter() - start
    return wall, children_cpu() - cpu, sum(1 for p in out.rglob("*.nii.gz"))


def _when(value: str | None) -> datetime | None:
    if not value:
        return None
    when = datetime.fromisoformat(value)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def stage_spans(jobs: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds from the first start to the last finish of each stage's jobs."""
    spans: dict[str, tuple[datetime, datetime]] = {}
    for job in jobs:
        start, end = _when(job.get("started_at")), _when(job.get("finished_at"))
        if start is None or end is None:
            continue
        first, last = spans.get(job["stage"], (start, end))
        spans[job["stage"]] = (min(first, start), max(last, end))
    return {stage: (end - start).total_seconds() for stage, (start, end) in spans.items()}


def stage_ends(jobs: list[dict[str, Any]], began: datetime) -> dict[str, float]:
    """Seconds from the command's start to the last finish of each stage's jobs: in a streamed
    run (ADR 0023) a later stage's job starts, open, with the run, so its span alone says little."""
    ends: dict[str, float] = {}
    for job in jobs:
        if (end := _when(job.get("finished_at"))) is not None:
            ends[job["stage"]] = max(ends.get(job["stage"], 0.0), (end - began).total_seconds())
    return ends


def idle_time(jobs: list[dict[str, Any]], began: datetime, ended: datetime) -> dict[str, float]:
    """Where the run is in no stage: before the first starts (cohort, checks, request), between
    stages (hand-over), after the last ends (the CLI's polling, the download to --out)."""
    spans = sorted(
        (start, end)
        for job in jobs
        if (start := _when(job.get("started_at"))) and (end := _when(job.get("finished_at")))
    )
    if not spans:
        return {}
    gaps, reach = 0.0, spans[0][1]
    for start, end in spans[1:]:
        gaps += max(0.0, (start - reach).total_seconds())
        reach = max(reach, end)
    return {
        "before the first stage": (spans[0][0] - began).total_seconds(),
        "between stages": gaps,
        "after the last stage": (ended - reach).total_seconds(),
    }


def run_cohortflow(
    stack: LocalStack, source: Path, out: Path, name: str, *, anonymize: bool
) -> dict[str, Any]:
    """One `cohortflow run` as a user types it; returns wall s, CPU by process, stage spans."""
    command = [sys.executable, "-m", "cohortflow.cli", "run", str(source), "--name", name]
    command += ["--out", str(out), "--home", str(stack.home), "--json"]
    if anonymize:
        command.append("--anonymize")
    env = {**os.environ, "COHORTFLOW_AUDIT_PASSWORD": AUDIT_PASSWORD}
    env.pop("COHORTFLOW_GATEWAY_URL", None)  # this stack, not one the shell points at
    before, cli_cpu = cpu_by_process(stack), children_cpu()
    start, began = time.perf_counter(), datetime.now(UTC)
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    wall, ended = time.perf_counter() - start, datetime.now(UTC)
    spent = {k: v - before.get(k, 0.0) for k, v in cpu_by_process(stack).items()}
    spent["cohortflow run (CLI)"] = children_cpu() - cli_cpu
    try:
        doc = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise SystemExit(
            f"cohortflow run exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        ) from None
    statuses = {job["stage"]: job["status"] for job in doc["jobs"]}
    return {
        "wall": wall,
        "exit": done.returncode,
        "statuses": statuses,
        "spans": stage_spans(doc["jobs"]),
        "ends": stage_ends(doc["jobs"], began),
        "idle": idle_time(doc["jobs"], began, ended),
        "cpu": spent,
        "niftis": sum(1 for p in out.rglob("*.nii.gz")),
    }


def report(label: str, result: dict[str, Any], baseline: float) -> None:
    wall = result["wall"]
    print(
        f"\n{label}: {wall:.1f} s = {wall / baseline:.2f}x dcm2niix alone (goal <= 1.5x);"
        f" exit {result['exit']}, {result['niftis']} NIfTI files"
    )
    for stage, span in result["spans"].items():
        print(
            f"  {stage:<14} {span:7.1f} s  {span / wall:6.1%} of the run"
            f"  done at {result['ends'].get(stage, 0.0):6.1f} s  ({result['statuses'].get(stage)})"
        )
    if result["idle"]:
        print("  in no stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["idle"].items()))
    ranked = sorted(result["cpu"].items(), key=lambda kv: -kv[1])
    print("  CPU s by process: " + ", ".join(f"{k} {v:.1f}" for k, v in ranked if v >= 0.05))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="folder of DICOM files")
    parser.add_argument("--home", type=Path, help="state dir of the stack (default: a temp dir)")
    parser.add_argument("--no-anonymize", action="store_true", help="skip the --anonymize run")
    parser.add_argument("--keep", action="store_true", help="keep outputs and the stack's state")
    args = parser.parse_args(argv)

    source = args.source.expanduser().resolve()
    work = Path(tempfile.mkdtemp(prefix="cohortflow-e2e-"))
    stack = LocalStack(args.home or work / "state", data_roots=[source])
    files = files_under(source)
    print(f"{source}: {len(files)} files, {warm_page_cache(files) / 1e6:.0f} MB read into cache")
    try:
        stack.up(allow=[source])
        wall, cpu, niftis = run_dcm2niix(source, work / "dcm2niix")
        print(f"\ndcm2niix alone: {wall:.1f} s wall, {cpu:.1f} CPU s, {niftis} NIfTI files")
        tag = time.strftime("%H%M%S")
        runs = [("cohortflow run", False)]
        if not args.no_anonymize:
            runs.append(("cohortflow run --anonymize", True))
        for label, anonymize in runs:
            out = work / ("bids-anon" if anonymize else "bids")
            name = f"e2e-{'anon-' if anonymize else ''}{tag}"
            report(label, run_cohortflow(stack, source, out, name, anonymize=anonymize), wall)
    finally:
        if args.keep:
            print(f"\nkept: {work}")
        else:
            stack.down()
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
