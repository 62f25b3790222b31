"""End-to-end anonymization benchmark: the anonymizer service against a bare pydicom read-modify-write loop.

Starts a private local stack (Postgres, broker, S3, gateway, anonymizer), creates a cohort over a
folder of real DICOM, runs the anonymization stage through the HTTP API and times it from request
to completion: plan (header reads), per file pseudonym resolution, de-identification in the worker
pool, verification, upload to the de-identified zone, and the encrypted audit export.

The baseline, timed in this process over the same files (those with a DICOM preamble), is the
one-core loop of `bench_core.baseline`: `pydicom.dcmread` from disk (page cache warm), a dozen
identifying attributes blanked at the top level, the four main UIDs replaced with `generate_uid`,
private tags removed, `save_as` to memory. It neither verifies nor uploads: the service does both
on top, so a ratio >= 1 means the service, doing more, finishes before a bare script would.

It prints files/s of both, their ratio, and the CPU seconds each process spent (the S3 server,
Postgres and the broker share the same cores here), the anonymizer split into its service process
(planning, pseudonyms, batches, the study's rows) and its worker pool (reading, de-identifying,
verifying, uploading). The service is warmed up first on five of the files (a running service has
its worker pool started); the timed runs are `--runs` new cohorts over all of them (median).

    .venv/bin/python -m bench.anonymize.bench_system [--data DIR] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.anonymize.bench_core import baseline, files_of
from bench.extract.bench_system import run_system
from cohortflow.stack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "dicom" / "dcm_qa_deident" / "In"
CONFIG = {
    "patient_id": {"strategy": "hash"},
    "study_dates": {"enabled": True},
    "audit_export": {"format": "csv", "password": "bench-audit-password"},
}


def own_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process, without its children."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:13]) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cohortflow-bench-anon-"))
    work.chmod(0o755)
    source = work / "source"  # a folder under the stack's data root, linking to the data
    source.mkdir()
    (source / "data").symlink_to(args.data.resolve(), target_is_directory=True)
    files = files_of(args.data, 10**9)  # the same files the service reads through the link
    warm = work / "warm"
    warm.mkdir()
    for i, path in enumerate(files[:5]):
        (warm / f"{i}.dcm").symlink_to(path)
    # the data the links point at is a root too: links out of the roots are refused
    stack = LocalStack(work / "state", data_roots=[work, args.data.resolve()])
    try:
        info = stack.up(services=["gateway", "anonymizer"])
        with httpx.Client(base_url=info.gateway_url, timeout=60.0) as api:
            baseline(files[:5])  # warm the page cache and imports
            run_system(
                api, stack, "warm-up", warm,
                stage="anonymization", service="anonymizer", config=CONFIG,
            )  # fmt: skip
            pid = stack.status().services["anonymizer"].pid
            assert pid
            bares, bare_cpus, runs, own = [], [], [], []
            for i in range(args.runs):
                started = time.process_time()
                bares.append(baseline(files))
                bare_cpus.append(time.process_time() - started)
                before = own_cpu_seconds(pid)
                result = run_system(
                    api, stack, f"bench-anon-{i + 1}", source,
                    stage="anonymization", service="anonymizer", config=CONFIG,
                )  # fmt: skip
                own.append(own_cpu_seconds(pid) - before)
                runs.append(result)
        bare = statistics.median(bares)
        bare_cpu = statistics.median(bare_cpus)
        seconds = statistics.median(r[0] for r in runs)
        summary = runs[-1][2]
        cpu = statistics.median(r[3].get("anonymizer", 0.0) for r in runs)
        service_cpu = statistics.median(own)
        others = {
            name: statistics.median(r[3].get(name, 0.0) for r in runs)
            for name in runs[-1][3]
            if name != "anonymizer"
        }
        n = len(files)
        print(f"{n} DICOM files from {args.data}; median of {args.runs} runs  (summary: {summary})")
        print(f"bare pydicom read-modify-write (1 core): {n / bare:8.1f} files/s")
        print(
            f"anonymizer service (end to end):         {n / seconds:8.1f} files/s"
            f"  ({bare / seconds:.2f}x the bare loop; {seconds:.1f} s)"
        )
        print(
            f"CPU s by process (median): anonymizer service process {service_cpu:.1f},"
            f" its worker pool {cpu - service_cpu:.1f}, "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(others.items(), key=lambda kv: -kv[1]))
            + f"; the bare loop {bare_cpu:.1f} ({bare:.1f} s wall)"
        )
        # on a shared machine the wall clocks move with the load; CPU seconds hardly do. What the
        # same work would take on two quiet cores, if it kept both busy:
        everything = cpu + sum(others.values())
        print(
            f"by CPU: the anonymizer {cpu / n * 1000:.1f} ms per file, the bare loop"
            f" {bare_cpu / n * 1000:.1f} ms: on two quiet cores at most {2 * bare_cpu / cpu:.2f}x"
            f" the bare loop for the anonymizer alone, {2 * bare_cpu / everything:.2f}x with the"
            " servers on the same cores"
        )
    finally:
        stack.down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
