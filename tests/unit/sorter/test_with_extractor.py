"""The labelled shared data through the real extractor's stack building (not the test builder).

Stack keys differ between the two builders, so labels are compared per folder as multisets of
datatype/suffix. Non-image objects never reach the sorter here: the extractor rejects them.
"""

from __future__ import annotations

from collections import Counter

import yaml

from services.extractor.catalog.records import InstanceRecord, Rejection
from services.extractor.catalog.stacks import build_stacks
from services.sorter.rules import classify_batch, complete, fingerprint_batch, load_rules
from tests.unit.real_dicom import records_in
from tests.unit.sorter.labelled import LABELS


def test_shared_data_through_the_real_extractor(
    parsed: dict[str, InstanceRecord | Rejection],
) -> None:
    rules = load_rules("standard")
    labels = yaml.safe_load(LABELS.read_text(encoding="utf-8"))["shared"]
    wrong: list[str] = []
    for folder in sorted({label["folder"] for label in labels}):
        records = records_in(parsed, folder)
        stacks = build_stacks(r for r in records if isinstance(r, InstanceRecord))
        fps = fingerprint_batch(stacks)
        results = complete(classify_batch(fps, rules), fps, rules)
        expected = Counter(
            f"{label['datatype']}/{label['suffix']}"
            for label in labels
            if label["folder"] == folder and label["intent"] != "excluded"
        )
        got = Counter(
            f"{r.bids_datatype}/{r.bids_suffix}" for r in results if r.intent != "excluded"
        )
        if expected != got:
            wrong.append(f"{folder}: expected {dict(expected)}, got {dict(got)}")
    assert not wrong, "\n".join(wrong)
