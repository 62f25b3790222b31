"""The BidsGuess-style opinion against the `BidsGuess` dcm2niix wrote into the reference sidecars of
the team's QA sets (`<set>/Ref/*.json`). A sidecar names its series by SeriesNumber and
SeriesDescription; every stack of that series (built by the extractor's core from `<set>/In`) is a
candidate, and the opinion agrees when one of them gets the sidecar's datatype/suffix. These sets are
the data the rules were tuned on, so full agreement here is a floor, not an estimate."""

from __future__ import annotations

import json
import re
from pathlib import Path

from services.extractor.catalog.records import InstanceRecord, Rejection
from services.extractor.catalog.stacks import build_stacks
from services.sorter.rules import fingerprint_batch
from services.sorter.rules.bidsguess import bids_guess, comparable
from tests.unit.real_dicom import records_in

_SUFFIX = re.compile(r"_([A-Za-z0-9]+)$")


def test_bidsguess_opinion_matches_the_reference_sidecars(
    dicom_root: Path, parsed: dict[str, InstanceRecord | Rejection]
) -> None:
    agree, total, differ = 0, 0, []
    for dataset in sorted(p.parent for p in dicom_root.glob("*/Ref")):
        sidecars = []
        for path in sorted((dataset / "Ref").glob("*.json")):
            sidecar = json.loads(path.read_text(encoding="utf-8"))
            if "BidsGuess" in sidecar:
                sidecars.append((path.name, sidecar))
        if not sidecars:
            continue
        records = records_in(parsed, f"{dataset.name}/In", recursive=True)
        stacks = build_stacks(r for r in records if isinstance(r, InstanceRecord))
        fingerprints = fingerprint_batch(stacks)
        for name, sidecar in sidecars:
            datatype, entities = sidecar["BidsGuess"]
            suffix = _SUFFIX.search(entities)
            assert suffix is not None, (name, entities)
            wanted = comparable(datatype, suffix.group(1))
            candidates = {
                comparable(*guess)
                for stack, fp in zip(stacks, fingerprints, strict=True)
                if stack.series_number == sidecar.get("SeriesNumber")
                and stack.series_description == sidecar.get("SeriesDescription", "")
                and (guess := bids_guess(fp)) is not None
            }
            if not candidates:
                continue  # the set keeps the reference but not the DICOM of this series
            total += 1
            if wanted in candidates:
                agree += 1
            else:
                differ.append(
                    f"{dataset.name}/{name}: dcm2niix {wanted}, ours {sorted(candidates)}"
                )
    print(f"\n{agree}/{total} agree\n" + "\n".join(differ))
    assert total == 28  # of 33 sidecars; dcm_qa_enh keeps 5 references without their DICOM
    assert agree == total, "\n".join(differ)
