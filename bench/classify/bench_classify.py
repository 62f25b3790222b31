"""Classification throughput and streaming memory of the sorting core.

1. stacks/s of `classify` on synthetic fingerprints (pre-built), against a bare baseline measured in
   the same run on the same records: one dict lookup per record (the cheapest conceivable "rule").
2. a streaming run (default 1,000,000 stacks, run first): synthetic `StackSummary` records are
   generated, fingerprinted and classified in batches and dropped; current and peak RSS are printed
   at 100k and at the end, to show memory stays flat.

Synthetic stacks are drawn from real header patterns (Siemens/GE/Philips/Canon MR, CT, PET) with
varied descriptions, timings and b-values, so caches see a realistic mix of repeats and novelty.

    .venv/bin/python bench/classify/bench_classify.py [--stacks 1000000] [--classify 50000]
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.sorter.rules import (
    Fingerprint,
    classify,
    classify_batch,
    fingerprint_batch,
    load_rules,
)
from shared.catalog import StackSummary

# (vendor, modality, SOP class, scanning sequence, variant, options, sequence name, ImageType, descriptions)
TEMPLATES: list[
    tuple[str, str, str, list[str], list[str], list[str], str, list[str], list[str]]
] = [
    (
        "SIEMENS",
        "MR",
        "1.2.840.10008.5.1.4.1.1.4",
        ["GR", "IR"],
        ["SK", "SP", "MP"],
        [],
        "*tfl3d1_16ns",
        ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"],
        ["t1_mprage_sag_p2_iso", "T1 MPRAGE +C", "MPRAGE"],
    ),
    (
        "SIEMENS",
        "MR",
        "1.2.840.10008.5.1.4.1.1.4",
        ["SE"],
        ["SK", "SP", "OSP"],
        [],
        "*tse2d2_5",
        ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"],
        ["pd+t2_tse_sag", "t2_tse_tra", "T2 TSE cor"],
    ),
    (
        "SIEMENS",
        "MR",
        "1.2.840.10008.5.1.4.1.1.4",
        ["EP"],
        ["SK", "SP"],
        ["PFP", "FS"],
        "*ep_b1000#1",
        ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND", "MOSAIC"],
        ["ep2d_diff_mddw_20", "DTI_64dir"],
    ),
    (
        "SIEMENS",
        "MR",
        "1.2.840.10008.5.1.4.1.1.4",
        ["EP"],
        ["SK"],
        ["FS"],
        "epfid2d1_72",
        ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"],
        ["rfMRI_REST_AP", "task_nback_run1", "EPI PE=AP"],
    ),
    (
        "SIEMENS",
        "MR",
        "1.2.840.10008.5.1.4.1.1.4",
        ["GR"],
        ["SP"],
        [],
        "*fm2d2r",
        ["ORIGINAL", "PRIMARY", "P", "ND"],
        ["gre_field_mapping", "fieldmap"],
    ),
    (
        "GE MEDICAL SYSTEMS",
        "MR",
        "1.2.840.10008.5.1.4.1.1.4",
        ["EP", "GR"],
        ["SS"],
        ["EPI_GEMS", "PFF"],
        "epi2",
        ["ORIGINAL", "PRIMARY", "EPI", "NONE"],
        ["Axial EPI-FMRI", "rsfMRI"],
    ),
    (
        "GE MEDICAL SYSTEMS",
        "MR",
        "1.2.840.10008.5.1.4.1.1.4",
        ["GR"],
        ["SS", "SP", "SK"],
        ["FAST_GEMS", "ACC_GEMS"],
        "efgre3d",
        ["ORIGINAL", "PRIMARY", "OTHER"],
        ["Accelerated SAG IR-SPGR", "BRAVO", "Sag T1 FSPGR"],
    ),
    (
        "GE MEDICAL SYSTEMS",
        "MR",
        "1.2.840.10008.5.1.4.1.1.4",
        ["SE", "IR"],
        ["SK"],
        ["FAST_GEMS", "IR_GEMS"],
        "fse-ir",
        ["ORIGINAL", "PRIMARY", "OTHER"],
        ["Ax T2 FLAIR", "Sag CUBE FLAIR"],
    ),
    (
        "Philips Medical Systems",
        "MR",
        "1.2.840.10008.5.1.4.1.1.4",
        ["SE"],
        ["SK"],
        ["PFP"],
        "",
        ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"],
        ["DTI_Biobank_2mm", "DWI b1000"],
    ),
    (
        "Philips Medical Systems",
        "MR",
        "1.2.840.10008.5.1.4.1.1.4",
        ["GR"],
        ["MP"],
        ["SP"],
        "T1TFE",
        ["ORIGINAL", "PRIMARY", "T1", "MIXED"],
        ["AnatBrain_T1W3D", "3D T1 TFE"],
    ),
    (
        "TOSHIBA_MEC",
        "MR",
        "1.2.840.10008.5.1.4.1.1.4",
        ["SE"],
        ["NONE"],
        [],
        "",
        ["ORIGINAL", "PRIMARY", "OTHER"],
        ["T2 FSE ax", "FLAIR ax"],
    ),
    (
        "GE MEDICAL SYSTEMS",
        "CT",
        "1.2.840.10008.5.1.4.1.1.2",
        [],
        [],
        ["HELICAL MODE"],
        "",
        ["ORIGINAL", "PRIMARY", "AXIAL"],
        ["Head 5mm", "Topogram", "CTA Arterial"],
    ),
    (
        "SIEMENS",
        "PT",
        "1.2.840.10008.5.1.4.1.1.128",
        [],
        [],
        [],
        "",
        ["ORIGINAL", "PRIMARY"],
        ["PET AC Brain", "PET NAC"],
    ),
    ("Philips", "PR", "1.2.840.10008.5.1.4.1.1.11.1", [], [], [], "", [], ["DEFAULT PS SERIES"]),
]


def _element(vr: str, values: list[Any]) -> dict[str, Any]:
    return {"vr": vr, "Value": values} if values else {"vr": vr}


def synthetic_stacks(n: int, seed: int = 7) -> Iterator[StackSummary]:
    """`n` synthetic stacks with DICOM JSON headers built directly (no pydicom in the hot loop)."""
    rng = random.Random(seed)
    for i in range(n):
        vendor, modality, sop, ss, sv, so, seq, it, descs = TEMPLATES[i % len(TEMPLATES)]
        desc = rng.choice(descs) + ("" if rng.random() < 0.8 else f" run{rng.randint(1, 9)}")
        tr = rng.choice([5.0, 8.0, 400.0, 2300.0, 3500.0, 5000.0])
        te = rng.choice([2.5, 4.9, 11.0, 30.0, 92.0])
        header = {
            "00080070": _element("LO", [vendor]),
            "00080060": _element("CS", [modality]),
            "00080016": _element("UI", [sop]),
            "0008103E": _element("LO", [desc]),
            "00081030": _element("LO", [desc]),
            "00080008": _element("CS", it),
            "00180020": _element("CS", ss),
            "00180021": _element("CS", sv),
            "00180022": _element("CS", so),
            "00180024": _element("SH", [seq] if seq else []),
            "00180080": _element("DS", [tr]),
            "00180081": _element("DS", [te]),
            "00180082": _element("DS", [rng.choice([0.0, 150.0, 900.0, 2500.0])]),
            "00181314": _element("DS", [rng.choice([8.0, 15.0, 90.0, 160.0])]),
            "00200037": _element("DS", [1, 0, 0, 0, 1, 0]),
            "00180015": _element("CS", [rng.choice(["BRAIN", "HEAD", "CSPINE"])]),
        }
        yield StackSummary(
            subject_id=f"s{i % 5000}",
            study_instance_uid=f"1.2.{i // 50}",
            series_instance_uid=f"1.2.{i // 50}.{i % 50}",
            stack_key=f"{modality}|TE={te}|N={i}",
            modality=modality,
            sop_class_uid=sop,
            manufacturer=vendor,
            series_description=desc,
            protocol_name=desc,
            n_instances=rng.randint(1, 300),
            n_volumes=rng.choice([1, 1, 1, 2, 65, 200]),
            n_slices=rng.choice([3, 30, 176]),
            echo_times=[te],
            b_values=[0.0, 1000.0] if "DIFFUSION" in it or "M_SE" in it else [],
            header=header,
        )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def current_rss_mb() -> float:
    """Resident set size now (Linux /proc), to show the streaming run does not grow."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def bench_classify(n: int) -> None:
    rules = load_rules("standard")
    fps: list[Fingerprint] = fingerprint_batch(synthetic_stacks(n))
    # baseline: the cheapest per-record decision, a dict lookup on one field, over the same records
    table = {d.lower(): i for i, d in enumerate(sorted({fp.description for fp in fps}))}
    # CPU time of this process, not wall time: the machine is shared, CPU seconds are per core
    base_wall, base_cpu = time.perf_counter(), time.process_time()
    hits = 0
    for _ in range(5):  # the baseline is too quick to time in one pass
        for fp in fps:
            hits += table.get(fp.description.lower(), 0)
    base_wall = (time.perf_counter() - base_wall) / 5
    base_cpu = (time.process_time() - base_cpu) / 5
    wall, cpu = time.perf_counter(), time.process_time()
    labels = Counter(
        f"{c.bids_datatype}/{c.bids_suffix}" for c in (classify(fp, rules) for fp in fps)
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rate, base_rate = n / cpu, n / base_cpu
    print(
        f"classify: {n} stacks, {cpu:.2f} CPU s ({wall:.2f} s wall) = {rate:,.0f} stacks per CPU-second"
    )
    print(
        f"baseline dict lookup: {base_rate:,.0f} records per CPU-second "
        f"({n / base_wall:,.0f}/s wall); classify costs {base_rate / rate:.0f}x the baseline"
    )
    print(f"goal >= 10,000 stacks/s per core: {'met' if rate >= 10_000 else 'NOT met'}")
    print("label mix:", ", ".join(f"{k or 'none'}={v}" for k, v in labels.most_common(8)))


def bench_stream(n: int, batch: int = 2_000) -> None:
    rules = load_rules("standard")
    gc.collect()
    gc.freeze()  # long-lived objects (rules, caches) out of the collector's way, as a worker would
    print(
        f"stream: start, RSS {current_rss_mb():.0f} MB, peak so far {peak_rss_mb():.0f} MB, batches of {batch}"
    )
    done = 0
    reported_100k = False
    start = time.perf_counter()
    cpu_start = time.process_time()
    stream = synthetic_stacks(n, seed=11)
    while done < n:
        chunk = [next(stream) for _ in range(min(batch, n - done))]
        results = classify_batch(fingerprint_batch(chunk), rules)
        done += len(results)
        if done >= 100_000 and not reported_100k:
            reported_100k = True
            print(
                f"stream: {done:,} stacks, {time.perf_counter() - start:.1f} s, "
                f"RSS {current_rss_mb():.0f} MB, peak RSS {peak_rss_mb():.0f} MB"
            )
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    print(
        f"stream: {done:,} stacks fingerprinted+classified in {elapsed:.1f} s wall, "
        f"{cpu:.1f} CPU s ({done / cpu:,.0f} stacks per CPU-second incl. record build), "
        f"RSS {current_rss_mb():.0f} MB, peak RSS {peak_rss_mb():.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--classify", type=int, default=50_000, help="stacks for the throughput test"
    )
    parser.add_argument(
        "--stacks", type=int, default=1_000_000, help="stacks for the streaming run"
    )
    args = parser.parse_args()
    # streaming first, so that its peak RSS is not the throughput test's 50k kept fingerprints
    if args.stacks:
        bench_stream(args.stacks)
    if args.classify:
        bench_classify(args.classify)


if __name__ == "__main__":
    main()
