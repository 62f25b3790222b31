"""Benchmark: `parse_instance` against a bare `pydicom.dcmread(stop_before_pixels=True)` loop.

Both loops read the same files (every regular file under --root outside `Ref/` folders, non-DICOM
included, as a real source folder would be), in the same process, alternating, after one warm-up pass
that puts the files in the page cache. Prints files/s of each and the ratio core/bare, by wall clock
and by this process's CPU time (the steadier figure on a shared machine).

    .venv/bin/python -m bench.extract.bench_core [--root DIR] [--repeat N] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom

PROJECT_ROOT = Path(__file__).resolve().parents[2]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from services.extractor.catalog import Rejection, build_stacks, parse_instance  # noqa: E402

DEFAULT_ROOT = PROJECT_ROOT.parent / "shared" / "data" / "dicom"


def source_files(root: Path, limit: int | None) -> list[Path]:
    """Every regular file under `root`, skipping dcm2niix reference outputs (`Ref/`), sorted."""
    files = [
        Path(folder) / name
        for folder, dirs, names in os.walk(root)
        if "Ref" not in Path(folder).relative_to(root).parts
        for name in names
    ]
    files.sort()
    return files[:limit] if limit else files


def bare_loop(files: list[Path]) -> int:
    """The baseline: read each header with pydicom, nothing else. Returns how many parsed."""
    parsed = 0
    for path in files:
        try:
            pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # the baseline only counts: any failure is "not parsed"
            continue
        parsed += 1
    return parsed


def core_loop(files: list[Path]) -> int:
    """Our core: sniff, parse, records, frames and the header as DICOM JSON. Returns images catalogued."""
    catalogued = 0
    for path in files:
        if not isinstance(parse_instance(path, str(path)), Rejection):
            catalogued += 1
    return catalogued


def timed(loop: Callable[[list[Path]], int], files: list[Path]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, loop result) of one pass."""
    wall, cpu = time.perf_counter(), time.process_time()
    count = loop(files)
    return time.perf_counter() - wall, time.process_time() - cpu, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder of DICOM files")
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed passes of each loop (alternating)"
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N files")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # pydicom warns on out-of-spec values; the loops must not print

    files = source_files(args.root, args.limit)
    if not files:
        print(f"no files under {args.root}", file=sys.stderr)
        return 2
    total_bytes = sum(p.stat().st_size for p in files)
    for path in files:  # warm the page cache so neither loop pays for the first disk read
        path.read_bytes()

    bare: list[tuple[float, float]] = []
    core: list[tuple[float, float]] = []
    parsed = catalogued = 0
    for _ in range(args.repeat):
        wall, cpu, parsed = timed(bare_loop, files)
        bare.append((wall, cpu))
        wall, cpu, catalogued = timed(core_loop, files)
        core.append((wall, cpu))

    records = [
        r for r in (parse_instance(p, str(p)) for p in files) if not isinstance(r, Rejection)
    ]
    start = time.perf_counter()
    stacks = build_stacks(records)
    stack_seconds = time.perf_counter() - start

    n = len(files)
    bare_wall, bare_cpu = min(w for w, _ in bare), min(c for _, c in bare)
    core_wall, core_cpu = min(w for w, _ in core), min(c for _, c in core)
    print(
        f"files: {n} ({total_bytes / 1e6:.1f} MB) under {args.root}; best of {args.repeat} passes each"
    )
    print("                            wall files/s   CPU files/s")
    print(
        f"bare pydicom header loop : {n / bare_wall:12.1f}  {n / bare_cpu:12.1f}   ({parsed} parsed)"
    )
    print(
        f"cohortflow core          : {n / core_wall:12.1f}  {n / core_cpu:12.1f}   ({catalogued} images catalogued)"
    )
    print(
        f"ratio core/bare time     : {core_wall / bare_wall:12.2f}x {core_cpu / bare_cpu:12.2f}x"
        f"  (median wall {statistics.median(w for w, _ in core) / statistics.median(w for w, _ in bare):.2f}x)"
    )
    print(
        f"build_stacks             : {len(records) / stack_seconds:12.1f} instances/s -> {len(stacks)} stacks"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
