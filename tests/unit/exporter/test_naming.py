"""BIDS naming: entity order, labels, layouts, run numbers, derivatives, sessions, split outputs."""

from __future__ import annotations

import random
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from services.exporter.bids import (
    ExportStack,
    StudyVisit,
    assign_sessions,
    bids_name,
    bids_path,
    load_entity_table,
    name_outputs,
    naming_problems,
    parse_bids_name,
    plan_names,
    sanitize_label,
    select_stacks,
)
from services.exporter.convert import image_tokens
from shared.catalog import StackSummary
from tests.unit.exporter.stacks import StackFactory


def stack(
    suffix: str,
    datatype: str = "anat",
    *,
    series: int = 1,
    time: str | None = "100000",
    date: str | None = "20240102",
    subject: str = "01",
    session: str | None = "1",
    key: str = "MR",
    constants: dict[str, Any] | None = None,
    **fields: Any,
) -> ExportStack:
    summary = StackSummary(
        constants=constants or {},
        subject_id=subject,
        study_instance_uid="1.2.3",
        series_instance_uid=f"1.2.3.{series}",
        stack_key=key,
        series_number=series,
        study_date=date,
        acquisition_time=time,
    )
    return ExportStack(
        subject=subject,
        session=session,
        datatype=datatype,
        suffix=suffix,
        summary=summary,
        **fields,
    )


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entities", "suffix", "ext", "expected"),
    [
        ({"sub": "01", "ses": "1"}, "T1w", ".nii.gz", "sub-01_ses-1_T1w.nii.gz"),
        # given in scrambled order, written in the specification's order
        (
            {
                "part": "phase",
                "echo": 2,
                "run": 1,
                "dir": "AP",
                "rec": "norm",
                "ce": "gad",
                "acq": "fast",
                "task": "rest",
                "ses": "1",
                "sub": "01",
            },
            "bold",
            ".nii.gz",
            "sub-01_ses-1_task-rest_acq-fast_ce-gad_rec-norm_dir-AP_run-1_echo-2_part-phase_bold.nii.gz",
        ),
        (
            {"subject": "01", "inversion": 2, "part": "mag"},
            "MP2RAGE",
            "",
            "sub-01_inv-2_part-mag_MP2RAGE",
        ),
        (
            {"sub": "P 0-01_x", "acq": "pd+t2 tse", "run": "02"},
            "T2w",
            ".json",
            "sub-P001x_acq-pdt2tse_run-2_T2w.json",
        ),
        ({"sub": "Ré", "ses": None, "acq": ""}, "T2w", ".nii", "sub-Re_T2w.nii"),
        ({"sub": "01", "desc": "MD"}, "ADC", ".nii.gz", "sub-01_desc-MD_ADC.nii.gz"),
    ],
)
def test_bids_name(entities: dict[str, Any], suffix: str, ext: str, expected: str) -> None:
    assert bids_name(entities, suffix, ext) == expected
    _, parsed_suffix, parsed_ext = parse_bids_name(expected)
    assert parsed_suffix == suffix and parsed_ext == ext


@pytest.mark.parametrize(
    ("entities", "suffix", "message"),
    [
        ({"ses": "1"}, "T1w", "sub-"),
        ({"sub": "+++"}, "T1w", "sub-"),
        ({"sub": "01", "run": "a"}, "T1w", "index"),
        ({"sub": "01", "part": "magnitude"}, "T1w", "part-"),
        ({"sub": "01", "foo": "x"}, "T1w", "unknown BIDS entity"),
        ({"sub": "01", "acq": "a", "acquisition": "b"}, "T1w", "twice"),
        ({"sub": "01"}, "T1w_x", "suffix"),
    ],
)
def test_bids_name_refuses_bad_input(entities: dict[str, Any], suffix: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bids_name(entities, suffix)


def test_entity_order_is_the_specifications() -> None:
    keys = [e.key for e in load_entity_table().entities]
    documented = ["sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "part", "desc"]
    assert [k for k in keys if k in documented] == documented
    assert load_entity_table().bids_version == "1.11.1"


@pytest.mark.parametrize(
    ("raw", "label"), [("pd+t2_tse sag", "pdt2tsesag"), ("Ré-st", "Rest"), ("__", ""), (12, "12")]
)
def test_sanitize_label(raw: object, label: str) -> None:
    assert sanitize_label(raw) == label


def test_bids_and_flat_paths() -> None:
    entities = {"sub": "01", "ses": "2", "task": "rest"}
    assert bids_path(entities, "bold", ".nii.gz", datatype="func") == PurePosixPath(
        "sub-01/ses-2/func/sub-01_ses-2_task-rest_bold.nii.gz"
    )
    assert bids_path({"sub": "01"}, "T1w", datatype="anat") == PurePosixPath(
        "sub-01/anat/sub-01_T1w"
    )
    assert bids_path(entities, "bold", ".nii.gz", datatype="func", layout="flat") == PurePosixPath(
        "sub-01_ses-2_task-rest_bold.nii.gz"
    )


# --- plans ---------------------------------------------------------------------------------


def test_runs_numbered_by_acquisition_time_whatever_the_input_order() -> None:
    stacks = [
        stack("T1w", series=7, time="090000"),
        stack("T1w", series=3, time="110000"),
        stack("T1w", series=5, time="100000"),
        stack("T2w", series=9, time="080000"),
    ]
    expected = {
        "1.2.3.7|MR": "sub-01/ses-1/anat/sub-01_ses-1_run-1_T1w",
        "1.2.3.5|MR": "sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w",
        "1.2.3.3|MR": "sub-01/ses-1/anat/sub-01_ses-1_run-3_T1w",
        "1.2.3.9|MR": "sub-01/ses-1/anat/sub-01_ses-1_T2w",
    }
    for seed in range(5):
        shuffled = stacks[:]
        random.Random(seed).shuffle(shuffled)
        assert {k: str(v) for k, v in plan_names(shuffled).items()} == expected


def test_run_ties_break_on_series_number_and_missing_times_go_last() -> None:
    plan = plan_names(
        [stack("T1w", series=4, time=None), stack("T1w", series=2), stack("T1w", series=1)]
    )
    assert [plan[f"1.2.3.{s}|MR"].name for s in (1, 2, 4)] == [
        "sub-01_ses-1_run-1_T1w",
        "sub-01_ses-1_run-2_T1w",
        "sub-01_ses-1_run-3_T1w",
    ]


def test_field_map_pairs_share_run_numbers() -> None:
    stacks = [
        stack("magnitude1", "fmap", series=2, time="100000"),
        stack("phasediff", "fmap", series=3, time="100010"),
        stack("magnitude1", "fmap", series=8, time="120000"),
        stack("phasediff", "fmap", series=9, time="120010"),
    ]
    names = {k.split("|")[0]: v.name for k, v in plan_names(stacks).items()}
    assert names == {
        "1.2.3.2": "sub-01_ses-1_run-1_magnitude1",
        "1.2.3.3": "sub-01_ses-1_run-1_phasediff",
        "1.2.3.8": "sub-01_ses-1_run-2_magnitude1",
        "1.2.3.9": "sub-01_ses-1_run-2_phasediff",
    }


def test_echoes_and_parts_of_one_series_do_not_collide() -> None:
    stacks = [
        stack("MEGRE", series=4, key=f"MR|ECHO={e}|PART={p}", entities={"echo": e, "part": p})
        for e in (1, 2)
        for p in ("mag", "phase")
    ]
    names = sorted(v.name for v in plan_names(stacks).values())
    assert names == [
        "sub-01_ses-1_echo-1_part-mag_MEGRE",
        "sub-01_ses-1_echo-1_part-phase_MEGRE",
        "sub-01_ses-1_echo-2_part-mag_MEGRE",
        "sub-01_ses-1_echo-2_part-phase_MEGRE",
    ]


def test_pepolar_pairs_share_run_numbers() -> None:
    stacks = [
        stack("epi", "fmap", series=s, time=t, entities={"dir": d})
        for s, t, d in ((2, "1000", "AP"), (3, "1001", "PA"), (6, "1100", "AP"), (7, "1101", "PA"))
    ]
    names = sorted(v.name for v in plan_names(stacks).values())
    assert names == [
        "sub-01_ses-1_dir-AP_run-1_epi",
        "sub-01_ses-1_dir-AP_run-2_epi",
        "sub-01_ses-1_dir-PA_run-1_epi",
        "sub-01_ses-1_dir-PA_run-2_epi",
    ]


def test_stacks_that_cannot_be_named_are_reported_not_fatal() -> None:
    good = stack("T1w", series=1)
    bad_entity = stack("T1w", series=2, entities={"mb": "4"})
    bad_subject = stack("T1w", series=3, subject="++")
    bad_echo = stack("MEGRE", series=4, entities={"echo": "first"})
    problems = naming_problems([good, bad_entity, bad_subject, bad_echo])
    assert set(problems) == {bad_entity.key, bad_subject.key, bad_echo.key}
    assert "unknown BIDS entity 'mb'" in problems[bad_entity.key]
    assert "echo- needs a non-negative integer" in problems[bad_echo.key]
    with pytest.raises(ValueError):
        plan_names([good, bad_entity])
    assert list(plan_names([good])) == [good.key]


@pytest.mark.parametrize(
    ("suffix", "constants", "expected"),
    [
        (
            "MEGRE",
            [{"ECHO": 1, "TE": 4.1}, {"ECHO": 2, "TE": 8.2}, {"ECHO": 3, "TE": 12.3}],
            ["sub-01_ses-1_echo-1_MEGRE", "sub-01_ses-1_echo-2_MEGRE", "sub-01_ses-1_echo-3_MEGRE"],
        ),
        (
            "MP2RAGE",
            [{"TI": 2500, "PART": "M"}, {"TI": 700, "PART": "M"}],
            ["sub-01_ses-1_inv-2_MP2RAGE", "sub-01_ses-1_inv-1_MP2RAGE"],
        ),
        (
            "T2starw",
            [{"PART": "M", "TE": 20}, {"PART": "P", "TE": 20}],
            ["sub-01_ses-1_part-mag_T2starw", "sub-01_ses-1_part-phase_T2starw"],
        ),
        (
            "MEGRE",
            [
                {"PART": "M", "ECHO": 1},
                {"PART": "P", "ECHO": 1},
                {"PART": "M", "ECHO": 2},
                {"PART": "P", "ECHO": 2},
            ],
            [
                "sub-01_ses-1_echo-1_part-mag_MEGRE",
                "sub-01_ses-1_echo-1_part-phase_MEGRE",
                "sub-01_ses-1_echo-2_part-mag_MEGRE",
                "sub-01_ses-1_echo-2_part-phase_MEGRE",
            ],
        ),
    ],
)
def test_stacks_of_one_series_split_by_their_constants(
    suffix: str, constants: list[dict[str, Any]], expected: list[str]
) -> None:
    stacks = [stack(suffix, series=5, key=f"MR|{i}", constants=c) for i, c in enumerate(constants)]
    plan = plan_names(stacks)
    assert [plan[s.key].name for s in stacks] == expected


def test_same_constants_in_different_series_are_runs_not_splits() -> None:
    stacks = [
        stack("T1w", series=n, time=f"1{n}0000", constants={"ECHO": 1, "TE": 3}) for n in (1, 2)
    ]
    assert [plan_names(stacks)[s.key].name for s in stacks] == [
        "sub-01_ses-1_run-1_T1w",
        "sub-01_ses-1_run-2_T1w",
    ]


def test_subjects_and_sessions_are_numbered_apart() -> None:
    plan = plan_names(
        [
            stack("T1w", subject="01", series=1),
            stack("T1w", subject="02", series=2),
            stack("T1w", session="2", series=3),
        ]
    )
    assert sorted(str(p) for p in plan.values()) == [
        "sub-01/ses-1/anat/sub-01_ses-1_T1w",
        "sub-01/ses-2/anat/sub-01_ses-2_T1w",
        "sub-02/ses-1/anat/sub-02_ses-1_T1w",
    ]


@pytest.mark.parametrize(
    ("fields", "group", "expected"),
    [
        ({"constructs": ["ADC"]}, False, "derivatives/scanner/sub-01/ses-1/dwi/sub-01_ses-1_ADC"),
        ({"constructs": ["FA"]}, False, "derivatives/scanner/sub-01/ses-1/dwi/sub-01_ses-1_FA"),
        (
            {"constructs": ["MD"]},
            False,
            "derivatives/scanner/sub-01/ses-1/dwi/sub-01_ses-1_desc-MD_ADC",
        ),
        (
            {"constructs": ["CBF"], "suffix": "asl", "datatype": "perf"},
            False,
            "derivatives/scanner/sub-01/ses-1/perf/sub-01_ses-1_cbf",
        ),
        (
            {"constructs": ["QSM"], "suffix": "swi"},
            False,
            "derivatives/scanner/sub-01/ses-1/anat/sub-01_ses-1_Chimap",
        ),
        (
            {"provenance": "SWIRecon", "suffix": "swi"},
            False,
            "derivatives/scanner/sub-01/ses-1/anat/sub-01_ses-1_desc-processed_swi",
        ),
        (
            {"provenance": "SWIRecon", "suffix": "swi", "entities": {"part": "mag"}},
            False,
            "sub-01/ses-1/anat/sub-01_ses-1_part-mag_swi",
        ),
        (
            {"provenance": "SyMRI", "suffix": "T1map"},
            True,
            "derivatives/symri/sub-01/ses-1/anat/sub-01_ses-1_T1map",
        ),
        (
            {"provenance": "SyMRI", "suffix": "T1map"},
            False,
            "sub-01/ses-1/anat/sub-01_ses-1_rec-synthetic_T1map",
        ),
        (
            {"provenance": "EPIMix", "suffix": "FLAIR"},
            False,
            "sub-01/ses-1/anat/sub-01_ses-1_acq-epimix_FLAIR",
        ),
    ],
)
def test_derivatives_and_vendor_branches(
    fields: dict[str, Any], group: bool, expected: str
) -> None:
    fields = {"suffix": "dwi", "datatype": "anat", **fields}
    suffix, datatype = fields.pop("suffix"), fields.pop("datatype")
    (path,) = plan_names([stack(suffix, datatype, **fields)], group_symri=group).values()
    assert str(path) == expected


def test_functional_runs_always_get_a_task() -> None:
    named = stack("bold", "func", series=1, task_name="n-back 2")
    from_protocol = stack("bold", "func", series=2)
    from_protocol.summary.protocol_name = "Resting State (eyes open)"
    plan = plan_names([named, from_protocol])
    assert plan[named.key].name == "sub-01_ses-1_task-nback2_bold"
    assert plan[from_protocol.key].name == "sub-01_ses-1_task-RestingStateeyesopen_bold"


@pytest.mark.parametrize(
    ("fields", "group", "expected"),
    [
        # what the sorter's standard pack says for derived series: datatype "derivatives"
        (
            {"suffix": "dwimap", "constructs": ["ADC"], "intent": "dwi"},
            False,
            "derivatives/scanner/sub-01/ses-1/dwi/sub-01_ses-1_ADC",
        ),
        (
            {"suffix": "perfmap", "constructs": ["CBF"], "intent": "perf"},
            False,
            "derivatives/scanner/sub-01/ses-1/perf/sub-01_ses-1_cbf",
        ),
        (
            {"suffix": "qmap", "constructs": ["T1map"], "intent": "anat"},
            False,
            "derivatives/scanner/sub-01/ses-1/anat/sub-01_ses-1_T1map",
        ),
        (
            {"suffix": "MIP", "intent": "misc", "provenance": "ProjectionDerived"},
            False,
            "derivatives/scanner/sub-01/ses-1/anat/sub-01_ses-1_MIP",
        ),
        (
            {
                "suffix": "synthetic",
                "intent": "anat",
                "provenance": "SyMRI",
                "constructs": ["T1map"],
                "entities": {"rec": "synthetic"},
            },
            False,
            "derivatives/symri/sub-01/ses-1/anat/sub-01_ses-1_rec-synthetic_synthetic",
        ),
        # the research pack keeps SyMRI in anat; grouping still moves it
        (
            {
                "datatype": "anat",
                "suffix": "T2w",
                "provenance": "SyMRI",
                "entities": {"rec": "synthetic"},
            },
            True,
            "derivatives/symri/sub-01/ses-1/anat/sub-01_ses-1_rec-synthetic_T2w",
        ),
    ],
)
def test_sorter_derivatives_vocabulary(fields: dict[str, Any], group: bool, expected: str) -> None:
    fields = {"datatype": "derivatives", **fields}
    suffix, datatype = fields.pop("suffix"), fields.pop("datatype")
    (path,) = plan_names([stack(suffix, datatype, **fields)], group_symri=group).values()
    assert str(path) == expected


def test_flat_layout_numbers_runs_too() -> None:
    plan = plan_names(
        [stack("T1w", series=1, time="1000"), stack("T1w", series=2, time="0900")], layout="flat"
    )
    assert sorted(str(p) for p in plan.values()) == [
        "sub-01_ses-1_run-1_T1w",
        "sub-01_ses-1_run-2_T1w",
    ]


def test_real_bold_runs_ordered_by_their_acquisition_times(
    dicom_root: Path, make_stack: StackFactory
) -> None:
    ge = dicom_root / "dcm_qa_nih" / "In" / "20180918GE"
    stacks = [
        make_stack(ge / f"mr_000{n}", "func", "bold", entities={"task": "rest"})
        for n in (7, 5, 4, 6)
    ]
    plan = plan_names(stacks)
    by_time = sorted(stacks, key=lambda s: s.summary.acquisition_time or "")
    assert [plan[s.key].name for s in by_time] == [
        f"sub-01_ses-1_task-rest_run-{i}_bold" for i in range(1, 5)
    ]
    assert [s.summary.series_number for s in by_time] == [4, 5, 6, 7]


def test_select_stacks_by_intent_and_provenance() -> None:
    stacks = [
        stack("T1w", series=1, intent="anat", provenance="RawRecon"),
        stack("bold", "func", series=2, intent="func"),
        stack("T1map", series=3, intent="anat", provenance="SyMRI"),
        stack("localizer", series=4, intent="localizer"),
        stack("swi", series=5, intent="anat", provenance="SWIRecon"),
    ]
    kept = select_stacks(stacks, include_intents=["anat"], include_provenance=["SyMRI"])
    assert [s.summary.series_number for s in kept] == [1, 3]
    assert [s.summary.series_number for s in select_stacks(stacks)] == [1, 2, 3, 5]


def test_sessions_from_shifted_dates_and_timepoints() -> None:
    visits = [
        StudyVisit("01", "u2", "20200301", "101500"),
        StudyVisit("01", "u1", "20200101", "090000"),
        StudyVisit("01", "u3", "20200301", "080000"),
        StudyVisit("02", "u4", None),
        StudyVisit("03", "u5", "20210101", timepoint="base line"),
        StudyVisit("04", "u6", None, timepoint="m12"),
        StudyVisit("04", "u7", None),
        StudyVisit("04", "u8", None),
    ]
    assert assign_sessions(visits) == {
        "u1": "20200101",
        "u3": "20200301a",
        "u2": "20200301b",
        "u4": "nodate",
        "u5": "20210101",
        "u6": "m12",
        "u7": "nodatea",
        "u8": "nodateb",
    }
    assert assign_sessions(visits, style="timepoint") == {
        "u1": "1",
        "u3": "2",
        "u2": "3",
        "u4": "1",
        "u5": "baseline",
        "u6": "m12",
        "u7": "2",
        "u8": "3",
    }


# --- several images from one stack ---------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "postfixes", "expected"),
    [
        ("sub-01_T1w", [""], ["sub-01_T1w"]),
        ("sub-01_PDT2", ["_e1", "_e2"], ["sub-01_echo-1_PDT2", "sub-01_echo-2_PDT2"]),
        ("sub-01_magnitude1", ["_e1", "_e2"], ["sub-01_magnitude1", "sub-01_magnitude2"]),
        ("sub-01_fieldmap", ["_e1", "_e2_fieldmaphz"], ["sub-01_magnitude", "sub-01_fieldmap"]),
        (
            "sub-01_acq-swi_T2starw",
            ["", "_ph"],
            ["sub-01_acq-swi_part-mag_T2starw", "sub-01_acq-swi_part-phase_T2starw"],
        ),
        ("sub-01_T1w", ["", "_ROI1"], ["sub-01_T1w", None]),
        ("sub-01_dwi", ["", "_ADC"], ["sub-01_dwi", None]),
        ("sub-01_ct", ["", "_Tilt"], [None, "sub-01_ct"]),
        ("sub-01_T1w", ["_t178", "_t511"], ["sub-01_T1w", None]),
    ],
)
def test_name_outputs(base: str, postfixes: list[str], expected: list[str | None]) -> None:
    names = name_outputs(PurePosixPath("sub-01/anat") / base, [image_tokens(p) for p in postfixes])
    assert [n.base.name if n.base else None for n in names] == expected
    assert all(n.reason for n in names if n.base is None)


def test_image_tokens() -> None:
    assert image_tokens("_e2_ph") == {"echo": "2", "part": "phase"}
    assert image_tokens("_e1_imaginary") == {"echo": "1", "part": "imag"}
    assert image_tokens("_ROI3") == {"discard": "3"}
    assert image_tokens("_cH12") == {"coil": "H12"}
    assert image_tokens("_weird_e3") == {"echo": "3", "unknown": "weird"}


@pytest.mark.parametrize(
    ("postfixes", "constants", "keep"),
    [
        (["_e1", "_e2_fieldmaphz"], {"PART": "M"}, [True, False]),
        (["_e1", "_e2_fieldmaphz"], {"PART": "B0MAP"}, [False, True]),
        (["_e1", "_e2", "_e1_ph", "_e2_ph"], {"PART": "P", "ECHO": 2}, [False, False, False, True]),
        (["_e1", "_e2"], {}, [True, True]),
        (["_e1", "_e2"], {"PART": "P"}, [True, True]),  # nothing matches: keep everything
        ([""], {"PART": "P"}, [True]),
    ],
)
def test_images_of_stack(postfixes: list[str], constants: dict[str, Any], keep: list[bool]) -> None:
    from services.exporter.bids import images_of_stack

    assert images_of_stack([image_tokens(p) for p in postfixes], constants) == keep


def test_phase_images_say_their_units() -> None:
    """BIDS requires Units on part-phase images; dcm2niix's phase is in scanner units."""
    from services.exporter.bids.sidecar import build_sidecar, missing_required

    phase = build_sidecar({"EchoTime": 0.01}, datatype="anat", suffix="MEGRE",
                          entities={"echo": "1", "part": "phase"})  # fmt: skip
    assert phase["Units"] == "arbitrary" and missing_required(phase, "MEGRE") == []
    magnitude = build_sidecar({}, datatype="anat", suffix="T1w", entities={"part": "mag"})
    assert "Units" not in magnitude
