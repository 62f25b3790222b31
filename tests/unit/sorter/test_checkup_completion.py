"""Checkup (integrity, dates, scope, incremental runs) and completion (gap filling) on real headers."""

from __future__ import annotations

from pathlib import Path

from services.sorter.rules import (
    checkup,
    classify,
    classify_batch,
    complete,
    fingerprint,
    fingerprint_batch,
    load_rules,
    stored_classified_keys,
)
from tests.unit.sorter.headers import make_stack
from tests.unit.sorter.stack_builder import build_stacks

RULES = load_rules("standard")


def test_checkup_excludes_with_reasons(dicom_root: Path) -> None:
    stacks = build_stacks((dicom_root / "dcm_qa_philips_dwi/In/cl/DICOM").iterdir())
    stacks.append(make_stack(Modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.2", n_instances=0))
    stacks.append(
        make_stack(Modality="PT", SOPClassUID="1.2.840.10008.5.1.4.1.1.128", StudyDate="20240101")
    )
    result = checkup(stacks, selected_modalities=["MR", "CT"])
    reasons = sorted(e.reason for e in result.excluded)
    assert "series without instances" in reasons
    assert "modality PT not selected" in reasons
    assert "not an image acquisition: presentation_state" in reasons
    assert sum(r.startswith("not an image acquisition: vendor_private") for r in reasons) == 2
    assert [s.stack_key for s in result.accepted] == ["MR|TE=69.355|ECHO=1"]


def test_missing_study_date_recovered_from_series_dates_never_uids() -> None:
    from_series = make_stack(
        SeriesDate="20180526", AcquisitionDate="20180527", series_instance_uid="1.2.3.4"
    )
    from_content = make_stack(ContentDate="20190101", series_instance_uid="1.2.3.5")
    # a UID that embeds a timestamp (Philips style, [shared] dcm_qa_fmap) must not be used
    uid_only = make_stack(series_instance_uid="1.3.46.670589.11.17240.5.0.8932.2018052615250908935")
    result = checkup([from_series, from_content, uid_only])
    recovered = {r.series_instance_uid: (r.study_date, r.source) for r in result.recovered_dates}
    assert recovered["1.2.3.4"] == ("20180526", "SeriesDate")
    assert recovered["1.2.3.5"] == ("20190101", "ContentDate")
    assert result.missing_dates == [uid_only.series_instance_uid]
    assert {s.study_date for s in result.accepted} == {"20180526", "20190101", None}


def test_skip_classified_and_force_reprocess() -> None:
    a = make_stack(StudyDate="20200101", series_instance_uid="9.1", stack_key="MR|TE=2")
    b = make_stack(StudyDate="20200101", series_instance_uid="9.2", stack_key="MR|TE=2")
    done = frozenset({("9.1", "MR|TE=2", RULES.version)})
    incremental = checkup([a, b], classified_keys=done, rule_version=RULES.version)
    assert [s.series_instance_uid for s in incremental.accepted] == ["9.2"]
    assert [s.series_instance_uid for s in incremental.skipped] == ["9.1"]
    forced = checkup([a, b], classified_keys=done, rule_version=RULES.version, force_reprocess=True)
    assert len(forced.accepted) == 2
    new_rules = checkup([a, b], classified_keys=done, rule_version="2099.1")
    assert len(new_rules.accepted) == 2  # a new rule version re-classifies everything
    no_skip = checkup(
        [a, b], classified_keys=done, rule_version=RULES.version, skip_classified=False
    )
    assert len(no_skip.accepted) == 2


def test_a_stack_left_out_by_selected_modalities_is_classified_when_selected_later() -> None:
    """Run 1 selects CT only: the MR stack is stored as excluded. Run 2 selects MR under the default
    skipClassified: the stored exclusion must not count as a classification."""
    mr = make_stack(StudyDate="20200101", series_instance_uid="9.3", stack_key="MR|TE=2")
    first = checkup([mr], selected_modalities=["CT"], rule_version=RULES.version)
    assert [e.reason for e in first.excluded] == ["modality MR not selected"]
    stored = [(e.series_instance_uid, e.stack_key, RULES.version, e.reason) for e in first.excluded]
    second = checkup(
        [mr],
        selected_modalities=["MR"],
        classified_keys=stored_classified_keys(stored),
        rule_version=RULES.version,
    )
    assert [s.series_instance_uid for s in second.accepted] == ["9.3"] and not second.skipped
    # real decisions, excluded objects included, still count as classified
    kept = stored_classified_keys(
        [
            ("9.4", "MR|TE=2", RULES.version, None),
            ("9.5", "OT", RULES.version, "not an image acquisition: structured_report"),
            ("9.3", "MR|TE=2", RULES.version, "modality MR not selected"),
        ]
    )
    assert kept == {("9.4", "MR|TE=2", RULES.version), ("9.5", "OT", RULES.version)}


def test_classification_key_includes_series_and_rule_version() -> None:
    result = classify(
        fingerprint(make_stack(series_instance_uid="7.7", stack_key="MR|TE=3")), RULES
    )
    assert result.key == ("7.7", "MR|TE=3", RULES.version)


def test_completion_corroborates_philips_b0_magnitude_from_its_series(dicom_root: Path) -> None:
    fps = fingerprint_batch(build_stacks((dicom_root / "dcm_qa_fmap/In/Philips/fmap").iterdir()))
    raw = classify_batch(fps, RULES)
    magnitude_before = next(c for c in raw if "MAGNITUDE" in c.stack_key)
    assert magnitude_before.review_required  # on its own: text 'B0' only
    done = complete(raw, fps, RULES)
    magnitude = next(c for c in done if "MAGNITUDE" in c.stack_key)
    assert magnitude.bids_suffix == "magnitude" and not magnitude.review_required
    assert magnitude.confidence > magnitude_before.confidence
    assert magnitude_before.review_required  # inputs are not modified


def test_completion_fills_unknown_technique_from_same_protocol_and_flags_review() -> None:
    common = {
        "Manufacturer": "SIEMENS",
        "SequenceName": "*tse2d1_15",
        "ScanningSequence": "SE",
        "SequenceVariant": ["SK", "SP"],
        "RepetitionTime": 3500,
        "EchoTime": 95,
        "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
        "SeriesDescription": "t2_tse_tra",
    }
    confident = [make_stack(**common, series_instance_uid=f"5.{i}") for i in range(3)]
    # the same protocol in another series, with the coded fields stripped by some export
    gap = make_stack(
        Manufacturer="SIEMENS",
        SequenceName="*tse2d1_15",
        SeriesDescription="t2_tse_tra",
        EchoTime=95,
        series_instance_uid="5.9",
    )
    fps = fingerprint_batch([*confident, gap])
    done = complete(classify_batch(fps, RULES), fps, RULES)
    filled = done[-1]
    assert filled.technique == "TSE" and "technique" not in done[0].inferred
    assert filled.review_required and any("filled" in r for r in filled.review_reasons)


def test_completion_never_uses_inferred_labels_as_references() -> None:
    # A is confident on coded fields; B and C share its protocol but carry no technique evidence.
    # Both are filled from A alone: B's inferred value never counts as a second reference for C.
    seq = {"Manufacturer": "SIEMENS", "SequenceName": "*xyz2d1", "SeriesDescription": "t2_tse_tra"}
    a = make_stack(
        **seq,
        ScanningSequence="SE",
        SequenceVariant=["SK", "SP"],
        RepetitionTime=3500,
        EchoTime=95,
        ImageType=["ORIGINAL", "PRIMARY", "M", "ND"],
        series_instance_uid="6.1",
    )
    b = make_stack(**seq, series_instance_uid="6.2")
    c = make_stack(**seq, series_instance_uid="6.3")
    fps = fingerprint_batch([a, b, c])
    raw = classify_batch(fps, RULES)
    assert raw[0].technique == "TSE" and not raw[0].review_required
    assert raw[1].technique == raw[2].technique == "unknown"
    done = complete(raw, fps, RULES)
    for filled in done[1:]:
        assert filled.technique == "TSE"
        assert filled.inferred["technique"] == "same protocol in this cohort (1 confident stack)"
        assert filled.review_required
