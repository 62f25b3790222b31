"""Where extraction reads from: an anonymized cohort's identified source never, whatever the
request names (docs/adr-0017-sources.md)."""

from __future__ import annotations

import uuid

from services.extractor.plugin import ExtractorPlugin, _by_study
from shared.events import CohortRef, StageRequested
from shared.topics import Stage

COHORT = uuid.uuid4()


def request(anonymized: bool, **fields: object) -> StageRequested:
    cohort = CohortRef(
        id=COHORT, name="c", source_path="/data/identified", anonymization_enabled=anonymized
    )
    return StageRequested(stage=Stage.extraction, cohort=cohort, **fields)  # type: ignore[arg-type]


def test_a_plain_cohort_reads_its_source_and_ingests_it() -> None:
    assert ExtractorPlugin._location(request(False)) == ("/data/identified", f"raw/{COHORT}")
    assert ExtractorPlugin._location(request(False, location="/data/identified/new")) == (
        "/data/identified/new",
        f"raw/{COHORT}",
    )


def test_an_anonymized_cohort_reads_only_its_deidentified_zone() -> None:
    zone = (f"zone:anon/{COHORT}", None)
    assert ExtractorPlugin._location(request(True, input_prefix=f"anon/{COHORT}")) == zone
    # a request without the anonymizer's output (sent by hand, or a bug upstream) and one naming
    # an identified location still read the de-identified zone, and ingest nothing
    assert ExtractorPlugin._location(request(True)) == zone
    assert ExtractorPlugin._location(request(True, location="/data/identified/new")) == zone


def test_a_streamed_run_plans_the_deidentified_zone_one_study_each() -> None:
    # `<subject>/<study>/<series>/<sop>` under the zone; the item key names the study's prefix,
    # which is what the anonymizer hands on (ADR 0023)
    files = [
        ("sub-2/1.9/1.9.1/a.dcm", 10, 0),
        ("sub-1/1.8/1.8.2/b.dcm", 10, 0),
        ("sub-1/1.8/1.8.1/c.dcm", 10, 0),
        ("sub-1/1.7/1.7.1/d.dcm", 10, 0),
    ]
    assert [(study, [f[0] for f in group]) for study, group in _by_study(files)] == [
        ("sub-1/1.7", ["sub-1/1.7/1.7.1/d.dcm"]),
        ("sub-1/1.8", ["sub-1/1.8/1.8.2/b.dcm", "sub-1/1.8/1.8.1/c.dcm"]),
        ("sub-2/1.9", ["sub-2/1.9/1.9.1/a.dcm"]),
    ]
