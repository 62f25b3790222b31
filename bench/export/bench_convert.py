"""Benchmark: `convert_stack` (2 parallel workers) against bare dcm2niix on the same series folders.

Every leaf folder of the team's DICOM data (`../shared/data/dicom`) is one series. The baseline runs
the dcm2niix binary directly on each folder, one after the other, with the options `convert_stack`
uses; then every folder's file list goes through `convert_stack` with two workers. Both write
compressed NIfTI into scratch folders. Files are read once beforehand so that both runs see a warm
page cache. Rounds alternate which side runs first; prints each round and the best of all
rounds for both sides, with their ratio (goal: <= 1.2x the direct time).

    .venv/bin/python bench/export/bench_convert.py [--data DIR] [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT))

from services.exporter.convert import ConverterError, convert_stack  # noqa: E402
from services.exporter.convert.dcm2niix import dcm2niix_binary, dcm2niix_version  # noqa: E402

NOT_DICOM = {".txt", ".md", ".json", ".nii", ".gz", ".bval", ".bvec", ".py", ".sh"}


def series_folders(root: Path) -> list[tuple[Path, list[Path]]]:
    """Leaf folders under `*/In/` with their candidate DICOM files (names do not decide: all but
    obvious non-DICOM documents are passed, as the service would pass a stack's instances)."""
    found = []
    for folder in sorted(p for p in root.glob("*/In/**") if p.is_dir()):
        files = sorted(
            f
            for f in folder.iterdir()
            if f.is_file() and f.suffix.lower() not in NOT_DICOM and f.name != "LICENSE"
        )
        if files and not any(p.is_dir() for p in folder.iterdir()):
            found.append((folder, files))
    return found


def direct(folders: list[tuple[Path, list[Path]]], scratch: Path) -> float:
    started = time.perf_counter()
    for index, (folder, _) in enumerate(folders):
        out = scratch / f"direct-{index}"
        out.mkdir()
        subprocess.run(
            [
                str(dcm2niix_binary()),
                "-b",
                "y",
                "-ba",
                "y",
                "-d",
                "0",
                "-w",
                "1",
                "-z",
                "y",
                "-f",
                "stack",
                "-o",
                str(out),
                str(folder),
            ],
            capture_output=True,
            check=False,
        )
    return time.perf_counter() - started


def through_convert_stack(
    folders: list[tuple[Path, list[Path]]], scratch: Path, workers: int
) -> tuple[float, int, int]:
    def one(item: tuple[int, tuple[Path, list[Path]]]) -> bool:
        index, (_, files) = item
        try:
            convert_stack(
                files,
                scratch / f"ours-{index}",
                "stack",
                compress=True,
                timeout_s=600,
                allow_fallback=False,
            )
            return True
        except ConverterError:
            return False

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, enumerate(folders)))
    return time.perf_counter() - started, sum(results), len(results) - sum(results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=PROJECT.parent / "shared" / "data" / "dicom")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    folders = series_folders(args.data)
    n_files = sum(len(files) for _, files in folders)
    size = sum(f.stat().st_size for _, files in folders for f in files)
    for _, files in folders:  # warm the page cache for both runs
        for f in files:
            f.read_bytes()
    print(f"dcm2niix {dcm2niix_version()} at {dcm2niix_binary()}")
    print(f"{len(folders)} series folders, {n_files} files, {size / 1e6:.1f} MB")

    directs, ours = [], []
    for round_ in range(1, args.repeat + 1):
        with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
            scratch = Path(tmp)
            # alternate which side runs first, so drift in machine load does not favour one
            if round_ % 2:
                direct_s = direct(folders, scratch)
                ours_s, ok, failed = through_convert_stack(folders, scratch, args.workers)
            else:
                ours_s, ok, failed = through_convert_stack(folders, scratch, args.workers)
                direct_s = direct(folders, scratch)
        directs.append(direct_s)
        ours.append(ours_s)
        print(
            f"round {round_}: direct dcm2niix, sequential: {direct_s:.2f} s | "
            f"convert_stack, {args.workers} workers: {ours_s:.2f} s "
            f"({ok} converted, {failed} without image) | ratio {ours_s / direct_s:.2f}x"
        )
    print(
        f"best of {args.repeat}: direct {min(directs):.2f} s, convert_stack {min(ours):.2f} s, "
        f"ratio {min(ours) / min(directs):.2f}x (goal <= 1.2x)"
    )


if __name__ == "__main__":
    main()
