"""A worker's outcomes on their way back to the service (ADR 0037): the same values, each
subject, study and series row sent once per batch, the JSON texts as plain strings."""

from __future__ import annotations

import gc
import pickle
from typing import Any

from services.extractor.catalog import InstanceRecord
from services.extractor.worker import FileOutcome, _one_copy, catalog_rows
from shared.workers import calm_collector


def _outcomes(instances: list[InstanceRecord]) -> list[FileOutcome]:
    kept: tuple[dict[str, tuple[Any, ...]], ...] = ({}, {}, {})
    out = []
    for i, rec in enumerate(instances):
        rows = catalog_rows(rec)
        rows = rows._replace(
            subject=_one_copy(kept[0], rows.subject),
            study=_one_copy(kept[1], rows.study),
            series=_one_copy(kept[2], rows.series),
        )
        out.append(FileOutcome(f"f/{i}", 10, i, "0" * 64, None, rows, "{}", "{}"))
    return out


def test_rows_are_unchanged_and_each_shared_row_travels_once(
    instances: list[InstanceRecord],
) -> None:
    by_series: dict[str, list[InstanceRecord]] = {}
    for rec in instances:
        by_series.setdefault(rec.series.series_instance_uid or "", []).append(rec)
    series = max(by_series.values(), key=len)
    assert len(series) > 1
    outcomes = _outcomes(series)
    assert [o.rows for o in outcomes] == [catalog_rows(rec) for rec in series]
    back = pickle.loads(pickle.dumps(outcomes, protocol=5))
    assert back == outcomes
    assert all(o.rows is not None for o in back)
    assert len({id(o.rows.series) for o in back if o.rows}) == 1
    assert len({id(o.rows.study) for o in back if o.rows}) == 1


def test_a_row_that_differs_is_kept_as_it_is() -> None:
    kept: dict[str, tuple[Any, ...]] = {}
    first = ("s1", "F", "044Y", {"patient_weight": 61.0})
    other = ("s1", "F", "051Y", {"patient_weight": 64.5})
    assert _one_copy(kept, first) is first
    assert _one_copy(kept, other) is other
    assert _one_copy(kept, ("s1", "F", "044Y", {"patient_weight": 61.0})) is first


def test_an_outcome_pickles_with_every_field() -> None:
    outcome = FileOutcome("a/b.dcm", 12, 34, None, None, rejection="not DICOM", extra={"x": 1})
    back = pickle.loads(pickle.dumps(outcome, protocol=5))
    assert back == outcome and back.extra == {"x": 1}


def test_the_collector_is_calmed_and_what_exists_frozen() -> None:
    before = gc.get_threshold()
    try:
        calm_collector()
        assert gc.get_threshold()[0] == 10_000
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
