"""Stacks from real headers: per-volume constants split, per-slice values never do, order never matters."""

from __future__ import annotations

import dataclasses
import pickle
import random
from collections import defaultdict

import pytest

from services.extractor.catalog import (
    InstanceRecord,
    StackBuilder,
    build_stacks,
    format_number,
    frame_stack_keys,
    orientation_label,
)
from shared.catalog import StackSummary


@pytest.fixture(scope="session")
def stacks(instances: list[InstanceRecord]) -> list[StackSummary]:
    return build_stacks(instances)


def _by_folder(
    instances: list[InstanceRecord], stacks: list[StackSummary], folder: str
) -> list[StackSummary]:
    series = {i.series.series_instance_uid for i in instances if i.source_key.startswith(folder)}
    return [s for s in stacks if s.series_instance_uid in series]


def _keys(
    instances: list[InstanceRecord], stacks: list[StackSummary], folder: str
) -> dict[str, tuple[int, int]]:
    return {s.stack_key: (s.n_slices, s.n_volumes) for s in _by_folder(instances, stacks, folder)}


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        # Siemens dual-echo TSE in one series: PD (short TE) and T2 (long TE); dcm2niix writes _e1/_e2, 35 slices
        (
            "dcm_qa_pdt2/In/Siemens/VE11/",
            {
                "MR|TE=11|FA=160|ECHO=1|PART=M|ORIENT=SAG": (35, 1),
                "MR|TE=92|FA=160|ECHO=2|PART=M|ORIENT=SAG": (35, 1),
            },
        ),
        # Philips Enhanced B0 map: magnitude (TE 1.52) and field map frames of one file (Ref: e1, e2_fieldmaphz)
        (
            "dcm_qa_enh/In/Philips/",
            {
                "MR|TE=0|FA=12|PART=B0MAP|ORIENT=AX": (32, 1),
                "MR|TE=1.52|FA=12|PART=M|ORIENT=AX": (32, 1),
            },
        ),
        # Siemens gre_field_mapping: magnitude series with two echoes, phase-difference series
        (
            "dcm_qa_fmap/In/Siemens/5_gre_field_mag/",
            {
                "MR|TE=5.19|FA=60|ECHO=1|PART=M|ORIENT=AX": (36, 1),
                "MR|TE=7.65|FA=60|ECHO=2|PART=M|ORIENT=AX": (36, 1),
            },
        ),
        (
            "dcm_qa_fmap/In/Siemens/4_gre_field_ph/",
            {"MR|TE=7.65|FA=60|ECHO=2|PART=P|ORIENT=AX": (36, 1)},
        ),
        # GE 3D B0 map: field map (Hz) and magnitude volumes in one series
        (
            "dcm_qa_fmap/In/GE/3_3db0maps/",
            {
                "MR|TE=1.6|FA=10|ECHO=1|PART=B0MAP|ORIENT=AX": (80, 1),
                "MR|TE=1.6|FA=10|ECHO=1|PART=M|ORIENT=AX": (80, 1),
            },
        ),
        # GE BOLD, 150 files: Ref NIfTI is 64x64x15x10
        ("dcm_qa_nih/In/20180918GE/mr_0004/", {"MR|TE=30|FA=60|ECHO=1|PART=M|ORIENT=AX": (15, 10)}),
        # Siemens mosaic EPI: Ref NIfTI is 72x72x5x2
        ("dcm_qa_nih/In/20180918Si/mr_0003/", {"MR|TE=50|FA=75|ECHO=1|PART=M|ORIENT=AX": (5, 2)}),
        # Siemens XA10 Enhanced SMS BOLD, four files of six frames: Ref NIfTI is 64x64x6x4
        ("dcm_qa_enh/In/Siemens/XA10/", {"MR|TE=30|FA=52|PART=M|ORIENT=AX": (6, 4)}),
        # GE sagittal IR-SPGR: one stack with its inversion time
        ("dcm_qa_deident/In/", {"MR|TE=2.83|TI=400|FA=11|ECHO=1|PART=M|ORIENT=SAG": (196, 1)}),
        # GE CT head, gantry tilted 18.5 degrees: still axial, one stack
        ("dcm_qa_ct/In/GE/", {"CT|TYPE=AXIAL|ORIENT=AX": (28, 1)}),
    ],
)
def test_series_split_into_the_expected_stacks(
    instances: list[InstanceRecord],
    stacks: list[StackSummary],
    folder: str,
    expected: dict[str, tuple[int, int]],
) -> None:
    assert _keys(instances, stacks, folder) == expected


def test_philips_dti_is_one_stack_with_b_values_and_directions(
    instances: list[InstanceRecord], stacks: list[StackSummary]
) -> None:
    (dti,) = _by_folder(instances, stacks, "dcm_qa_philips_dwi/In/cl/")
    # Ref bval: 0 1000 1000 1000 0.001 ... : 17 volumes, b0s stored as tiny non-zero numbers
    assert dti.stack_key == "MR|TE=69.36|FA=90|ECHO=1|PART=M|ORIENT=AX"
    assert dti.b_values == [0.0, 1000.0]
    assert dti.n_volumes == 17 and dti.n_slices == 32 and dti.n_instances == 544
    assert dti.n_diffusion_directions == 12


def test_summary_aggregates(instances: list[InstanceRecord], stacks: list[StackSummary]) -> None:
    pd, t2 = sorted(_by_folder(instances, stacks, "dcm_qa_pdt2/"), key=lambda s: s.stack_key)
    assert pd.echo_times == t2.echo_times == [11.0, 92.0]  # distinct TE of the whole series
    assert pd.constants == {"TE": 11.0, "FA": 160.0, "ECHO": 1, "PART": "M", "ORIENT": "SAG"}
    assert (pd.n_instances, pd.n_frames, pd.rows, pd.columns) == (35, 35, 64, 64)
    assert pd.manufacturer == "SIEMENS" and pd.modality == "MR" and pd.series_number == 3
    assert pd.image_types == ["DIS2D", "M", "NORM", "ORIGINAL", "PRIMARY"]
    assert pd.b_values == [] and pd.n_diffusion_directions == 0
    assert pd.acquisition_time is not None and pd.study_date
    # the representative header is the lowest instance number of the stack
    first = min(
        (
            i
            for i in instances
            if i.series.series_instance_uid == pd.series_instance_uid
            and i.mr
            and i.mr.echo_numbers == 1
        ),
        key=lambda i: i.instance_number or 0,
    )
    assert pd.header["00080018"]["Value"] == [first.sop_instance_uid]


def test_enhanced_stack_counts_frames_not_files(
    instances: list[InstanceRecord], stacks: list[StackSummary]
) -> None:
    for stack in _by_folder(instances, stacks, "dcm_qa_enh/In/Philips/"):
        # the same SOP instance is present twice in the data (dcm_qa_enh and dcm_qa_fmap): counted once
        assert (stack.n_instances, stack.n_frames) == (1, 32)
        assert len(stack.header["52009230"]["Value"]) == 1


def test_keys_are_stable_under_shuffled_arrival(
    instances: list[InstanceRecord], stacks: list[StackSummary]
) -> None:
    reference = [s.model_dump() for s in stacks]
    for seed in (1, 2, 3):
        shuffled = list(instances)
        random.Random(seed).shuffle(shuffled)
        assert [s.model_dump() for s in build_stacks(shuffled)] == reference


def test_incremental_building_equals_batch(
    instances: list[InstanceRecord], stacks: list[StackSummary]
) -> None:
    builder = StackBuilder()
    half = len(instances) // 2
    builder.add_all(instances[half:])
    builder.add_all(instances[:half])
    builder.add_all(instances[:100])  # re-delivered files do not count twice
    assert [s.model_dump() for s in builder.summaries()] == [s.model_dump() for s in stacks]


def test_stacks_rebuild_from_database_rows(
    instances: list[InstanceRecord], stacks: list[StackSummary]
) -> None:
    rows = [i.to_row() for i in instances]
    for row in rows:  # a database keeps lists, not tuples, and returns the columns it stored
        row.pop("source_key")
    rebuilt = build_stacks(InstanceRecord.from_row(r) for r in rows)
    assert [s.model_dump() for s in rebuilt] == [s.model_dump() for s in stacks]


def test_per_slice_values_never_split_a_stack(instances: list[InstanceRecord]) -> None:
    ct = [i for i in instances if i.series.modality == "CT"]
    assert ct and all(i.ct is not None for i in ct)
    modulated = []
    for n, record in enumerate(ct):
        detail = dataclasses.replace(record.ct, xray_tube_current=100.0 + 7 * n, exposure=50.0 + n)  # type: ignore[type-var]
        frame = dataclasses.replace(record.frames[0], trigger_time=float(n))
        modulated.append(
            dataclasses.replace(record, ct=detail, frames=[frame], slice_location=float(n))
        )
    (stack,) = build_stacks(modulated)
    assert stack.n_instances == len(ct)


def test_per_volume_constants_do_split(instances: list[InstanceRecord]) -> None:
    series = [i for i in instances if i.source_key.startswith("dcm_qa_deident/")]
    changed = [
        dataclasses.replace(i, frames=[dataclasses.replace(i.frames[0], flip_angle=8.0)])
        if n % 2
        else i
        for n, i in enumerate(series)
    ]
    keys: defaultdict[float, int] = defaultdict(int)
    for stack in build_stacks(changed):
        keys[stack.constants["FA"]] += stack.n_instances
    assert dict(keys) == {11.0: 98, 8.0: 98}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (2.46, "2.46"),
        (2.460, "2.46"),
        (900.0, "900"),
        (69.355, "69.36"),
        (0.0, "0"),
        (-0.001, "0"),
        (1.5, "1.5"),
        (4.999, "5"),
    ],
)
def test_format_number(value: float, text: str) -> None:
    assert format_number(value) == text


@pytest.mark.parametrize(
    ("orientation", "label"),
    [
        ([1, 0, 0, 0, 1, 0], "AX"),
        ([1, 0, 0, 0, 0, -1], "COR"),
        ([0, 1, 0, 0, 0, -1], "SAG"),
        ([1, 0, 0, 0, 0.9483237, -0.3173047], "AX"),  # GE CT, 18.5 degree gantry tilt
        ([1, 0, 0, 0, 0.7071068, -0.7071068], "OBL"),  # 45 degrees between axial and coronal
        ([], None),
    ],
)
def test_orientation_label(orientation: list[float], label: str | None) -> None:
    assert orientation_label([float(v) for v in orientation]) == label


def test_rebuild_from_rows_without_headers_then_fetch_representatives(
    instances: list[InstanceRecord], stacks: list[StackSummary]
) -> None:
    builder = StackBuilder()
    stored_headers = {i.sop_instance_uid: i.header for i in instances}
    for record in instances:
        row = record.to_row()
        row.pop("header")  # a database query that leaves the big JSON column out
        builder.add(InstanceRecord.from_row(row))
    wanted = builder.representatives()
    assert len(wanted) == len(stacks)
    headers = {uid: stored_headers[uid] for uid in wanted.values()}
    assert [s.model_dump() for s in builder.summaries(headers=headers)] == [
        s.model_dump() for s in stacks
    ]


def test_frame_stack_keys_place_every_frame(
    instances: list[InstanceRecord], stacks: list[StackSummary]
) -> None:
    (philips,) = {
        i.source_key: i
        for i in instances
        if i.source_key == "dcm_qa_enh/In/Philips/IM_0027_fMAP.dcm"
    }.values()
    keys = frame_stack_keys(philips)
    assert len(keys) == 64
    assert {k for _, k in keys} == {
        "MR|TE=0|FA=12|PART=B0MAP|ORIENT=AX",
        "MR|TE=1.52|FA=12|PART=M|ORIENT=AX",
    }
    known = {(s.series_instance_uid, s.stack_key) for s in stacks}
    for record in instances[::50]:
        for _, key in frame_stack_keys(record):
            assert (record.series.series_instance_uid, key) in known


def test_records_pickle_for_a_process_pool(instances: list[InstanceRecord]) -> None:
    for record in instances[::200]:
        assert pickle.loads(pickle.dumps(record)) == record
