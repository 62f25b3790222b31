"""A small real BIDS dataset built from the shared DICOM, with hand-given classifications, checked by
the BIDS validator: zero errors, field maps linked, dataset files complete."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest

from services.exporter.bids import (
    ExportedStack,
    SubjectPart,
    dataset_files,
    merged_dataset_files,
    plan_names,
    subject_files,
    write_dataset_files,
)
from services.exporter.convert.dcm2niix import dcm2niix_version
from services.exporter.convert.export import export_stack
from services.exporter.validate import run_bids_validator
from tests.unit.exporter.stacks import StackFactory, real_stack

pytestmark = [pytest.mark.needs_dcm2niix, pytest.mark.needs_validator]


@pytest.fixture(scope="module")
def dataset(
    dicom_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[ExportedStack]]:
    make = real_stack

    pdt2 = dicom_root / "dcm_qa_pdt2" / "In" / "Siemens" / "VE11"
    fmap = dicom_root / "dcm_qa_fmap" / "In"
    nih = dicom_root / "dcm_qa_nih" / "In"
    stacks = [
        # sub-01: PD + T2 (one dual-echo series, one stack per echo), a Siemens GRE field map, two BOLD runs
        make(pdt2, "anat", "PDw", echo=1),
        make(pdt2, "anat", "T2w", echo=2),
        make(fmap / "Siemens" / "2_gre_field_magph", "fmap", "magnitude1", echo=1),
        make(fmap / "Siemens" / "2_gre_field_magph", "fmap", "magnitude2", echo=2),
        make(fmap / "Siemens" / "3_gre_field_magph", "fmap", "phasediff"),
        make(nih / "20180918GE" / "mr_0004", "func", "bold", entities={"task": "rest"}),
        make(nih / "20180918GE" / "mr_0005", "func", "bold", entities={"task": "rest"}),
        # sub-02: a Philips B0 map in Hz (dcm2niix splits it into magnitude + fieldmap) and an EPI run
        make(fmap / "Philips" / "fmap", "fmap", "fieldmap", subject="02"),
        make(
            nih / "20180918Si" / "mr_0003",
            "func",
            "bold",
            subject="02",
            entities={"task": "motor"},
            task_name="finger tapping",
        ),
        # sub-03: spin-echo EPI with opposite phase encoding, and a derived map kept apart
        make(nih / "20180918Si" / "mr_0003", "fmap", "epi", subject="03", entities={"dir": "AP"}),
        make(nih / "20180918Si" / "mr_0004", "fmap", "epi", subject="03", entities={"dir": "PA"}),
        make(
            nih / "20180918GE" / "mr_0006", "func", "bold", subject="03", entities={"task": "rest"}
        ),
        # phase encoded left-right: an AP/PA field cannot correct it
        make(nih / "20180918Si" / "mr_0005", "func", "bold", subject="03", entities={"task": "lr"}),
    ]
    root = tmp_path_factory.mktemp("bids")
    plan = plan_names(stacks)
    exports = [export_stack(s, plan[s.key], root, output_modes=("nii.gz", "dcm")) for s in stacks]
    write_dataset_files(root, exports, name="Cohortflow test", dcm2niix_version=dcm2niix_version())
    return root, exports


def read_json(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(path.read_text())
    return data


def test_validator_finds_no_errors(dataset: tuple[Path, list[ExportedStack]]) -> None:
    root, _ = dataset
    report = run_bids_validator(root)
    assert report.errors == 0, [
        (i.code, i.location, i.message[:120]) for i in report.issues if i.severity == "error"
    ]
    assert sorted(report.summary["subjects"]) == ["01", "02", "03"]
    assert set(report.summary["dataTypes"]) == {"anat", "fmap", "func"}


def test_every_stack_was_exported(dataset: tuple[Path, list[ExportedStack]]) -> None:
    root, exports = dataset
    images = sorted(str(i) for e in exports for i in e.images)
    assert images == [
        "sub-01/ses-1/anat/sub-01_ses-1_PDw.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_T2w.nii.gz",
        "sub-01/ses-1/fmap/sub-01_ses-1_magnitude1.nii.gz",
        "sub-01/ses-1/fmap/sub-01_ses-1_magnitude2.nii.gz",
        "sub-01/ses-1/fmap/sub-01_ses-1_phasediff.nii.gz",
        "sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_bold.nii.gz",
        "sub-01/ses-1/func/sub-01_ses-1_task-rest_run-2_bold.nii.gz",
        "sub-02/ses-1/fmap/sub-02_ses-1_fieldmap.nii.gz",
        "sub-02/ses-1/fmap/sub-02_ses-1_magnitude.nii.gz",
        "sub-02/ses-1/func/sub-02_ses-1_task-motor_bold.nii.gz",
        "sub-03/ses-1/fmap/sub-03_ses-1_dir-AP_epi.nii.gz",
        "sub-03/ses-1/fmap/sub-03_ses-1_dir-PA_epi.nii.gz",
        "sub-03/ses-1/func/sub-03_ses-1_task-lr_bold.nii.gz",
        "sub-03/ses-1/func/sub-03_ses-1_task-rest_bold.nii.gz",
    ]
    assert all(e.tool == "dcm2niix" and not e.skipped for e in exports)
    dicom = sorted(root.glob("sourcedata/dicom/sub-01/ses-1/anat/sub-01_ses-1_PDw/*.dcm"))
    assert len(dicom) == len(exports[0].stack.files) and dicom[0].name == "00001.dcm"
    manifest = exports[0].sources
    assert sorted(manifest) == [str(p.relative_to(root)) for p in dicom]
    assert sorted(manifest.values()) == sorted(str(f) for f in exports[0].stack.files)


def test_field_maps_point_at_the_scans_they_correct(
    dataset: tuple[Path, list[ExportedStack]],
) -> None:
    root, _ = dataset
    fmap = root / "sub-01" / "ses-1" / "fmap"
    phasediff = read_json(fmap / "sub-01_ses-1_phasediff.json")
    assert phasediff["IntendedFor"] == [
        "bids::sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_bold.nii.gz",
        "bids::sub-01/ses-1/func/sub-01_ses-1_task-rest_run-2_bold.nii.gz",
    ]
    assert phasediff["EchoTime1"] == pytest.approx(0.00519) and phasediff[
        "EchoTime2"
    ] == pytest.approx(0.00765)
    identifier = phasediff["B0FieldIdentifier"]
    assert read_json(fmap / "sub-01_ses-1_magnitude1.json")["B0FieldIdentifier"] == identifier
    assert "IntendedFor" not in read_json(fmap / "sub-01_ses-1_magnitude1.json")
    bold = read_json(root / "sub-01" / "ses-1" / "func" / "sub-01_ses-1_task-rest_run-1_bold.json")
    assert bold["B0FieldSource"] == identifier and bold["TaskName"] == "rest"

    fieldmap = read_json(root / "sub-02" / "ses-1" / "fmap" / "sub-02_ses-1_fieldmap.json")
    assert fieldmap["Units"] == "Hz"
    assert fieldmap["IntendedFor"] == [
        "bids::sub-02/ses-1/func/sub-02_ses-1_task-motor_bold.nii.gz"
    ]
    motor = read_json(root / "sub-02" / "ses-1" / "func" / "sub-02_ses-1_task-motor_bold.json")
    assert motor["TaskName"] == "finger tapping"

    # AP/PA spin-echo EPI: same phase-encoding axis as the target, one field for both
    ap = read_json(root / "sub-03" / "ses-1" / "fmap" / "sub-03_ses-1_dir-AP_epi.json")
    pa = read_json(root / "sub-03" / "ses-1" / "fmap" / "sub-03_ses-1_dir-PA_epi.json")
    assert ap["B0FieldIdentifier"] == pa["B0FieldIdentifier"]
    assert ap["PhaseEncodingDirection"] == "j-" and pa["PhaseEncodingDirection"] == "j"
    assert (
        ap["IntendedFor"]
        == pa["IntendedFor"]
        == ["bids::sub-03/ses-1/func/sub-03_ses-1_task-rest_bold.nii.gz"]
    )
    lr = read_json(root / "sub-03" / "ses-1" / "func" / "sub-03_ses-1_task-lr_bold.json")
    assert lr["PhaseEncodingDirection"] in ("i", "i-") and "B0FieldSource" not in lr


def test_dataset_files(dataset: tuple[Path, list[ExportedStack]]) -> None:
    root, _ = dataset
    description = read_json(root / "dataset_description.json")
    assert description["BIDSVersion"] == "1.11.1" and description["DatasetType"] == "raw"
    generated = {g["Name"]: g["Version"] for g in description["GeneratedBy"]}  # type: ignore[attr-defined]
    assert generated["dcm2niix"] == dcm2niix_version() and "Cohortflow" in generated
    participants = (root / "participants.tsv").read_text().splitlines()
    assert participants[0] == "participant_id\tage\tsex\tlabel_source" and [
        r.split("\t")[0] for r in participants[1:]
    ] == ["sub-01", "sub-02", "sub-03"]
    scans = (root / "sub-01" / "ses-1" / "sub-01_ses-1_scans.tsv").read_text().splitlines()
    assert scans[0] == "filename\tacq_time"
    assert "func/sub-01_ses-1_task-rest_run-1_bold.nii.gz\t2018-09-18T11:48:15" in scans
    assert len(scans) == 8
    sessions = (root / "sub-01" / "sub-01_sessions.tsv").read_text().splitlines()
    assert sessions[1].startswith("ses-1\t")
    assert (root / "README").read_text().startswith("# Cohortflow test")


def test_skip_policy_leaves_existing_output(
    dataset: tuple[Path, list[ExportedStack]], make_stack: StackFactory
) -> None:
    root, exports = dataset
    first = exports[0]
    target = root / f"{first.base}.nii.gz"
    before = target.stat().st_mtime_ns
    again = export_stack(first.stack, first.base, root, overwrite="skip")
    assert again.files == [] and again.skipped == ["already exported (overwrite policy: skip)"]
    assert target.stat().st_mtime_ns == before


def test_flat_layout_derivatives_and_both_nifti_modes(dicom_root: Path, tmp_path: Path) -> None:
    pdt2 = dicom_root / "dcm_qa_pdt2" / "In" / "Siemens" / "VE11"
    stacks = [
        real_stack(pdt2, "anat", "T2w", echo=2, session=None),
        # hand-classified as the scanner's ADC map: exported apart, as a derivative
        real_stack(pdt2, "dwi", "dwi", echo=1, session=None, constructs=["ADC"]),
        # CT has no BIDS datatype yet: its own folder, listed in .bidsignore; gantry tilt resliced
        real_stack(
            dicom_root / "dcm_qa_ct" / "In" / "GE",
            "ct",
            "ct",
            session=None,
            entities={"acq": "axial"},
        ),
    ]
    for layout in ("bids", "flat"):
        root = tmp_path / layout
        plan = plan_names(stacks, layout=layout)
        exports = [
            export_stack(s, plan[s.key], root, output_modes=("nii", "nii.gz"), layout=layout)
            for s in stacks
        ]
        write_dataset_files(
            root, exports, name="t", dcm2niix_version=dcm2niix_version(), layout=layout
        )
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        if layout == "flat":
            assert files == [
                "README",
                "dataset_description.json",
                "sub-01_ADC.json",
                "sub-01_ADC.nii",
                "sub-01_ADC.nii.gz",
                "sub-01_T2w.json",
                "sub-01_T2w.nii",
                "sub-01_T2w.nii.gz",
                "sub-01_acq-axial_ct.json",
                "sub-01_acq-axial_ct.nii",
                "sub-01_acq-axial_ct.nii.gz",
            ]
            continue
        assert "derivatives/scanner/sub-01/dwi/sub-01_ADC.nii.gz" in files
        assert "sub-01/sub-01_scans.tsv" in files
        assert "sub-01/ct/sub-01_acq-axial_ct.nii.gz" in files
        assert (root / ".bidsignore").read_text() == "**/ct\n"
        ct = next(e for e in exports if e.stack.datatype == "ct")
        assert ct.skipped == ["image (main): superseded by its resliced twin (_Eq/_Tilt)"]
        derivative = read_json(root / "derivatives" / "scanner" / "dataset_description.json")
        assert derivative["DatasetType"] == "derivative"
        report = run_bids_validator(root, recursive=True)
        assert report.errors == 0, report.error_codes
        assert "GZIP_HEADER_FILENAME" not in report.warning_codes


def test_validator_reports_errors(
    dataset: tuple[Path, list[ExportedStack]], tmp_path: Path
) -> None:
    import shutil

    root, _ = dataset
    broken = tmp_path / "broken"
    shutil.copytree(root, broken, ignore=shutil.ignore_patterns("sourcedata"))
    (broken / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_PDw.nii.gz").rename(
        broken / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_bogus_PDw.nii.gz"
    )
    (broken / "dataset_description.json").write_text("{}")
    report = run_bids_validator(broken)
    assert report.errors >= 2 and not report.valid
    assert {i.code for i in report.issues if i.severity == "error"} == set(report.error_codes)
    assert any("bogus" in i.location for i in report.issues)


def test_dataset_files_from_stored_records(dataset: tuple[Path, list[ExportedStack]]) -> None:
    """Item results stored as JSON are enough to compute the dataset files (on another replica)."""
    root, exports = dataset
    stored = [ExportedStack.model_validate_json(e.model_dump_json()) for e in exports]
    texts = dataset_files(stored, name="Cohortflow test", dcm2niix_version=dcm2niix_version())
    assert PurePosixPath("sub-01/ses-1/fmap/sub-01_ses-1_phasediff.json") in texts
    for relative, text in texts.items():
        assert (root / str(relative)).read_text() == text, relative


def test_one_subject_again_with_the_others_carried_gives_the_same_files(
    dataset: tuple[Path, list[ExportedStack]],
) -> None:
    """A scoped export recomputes one subject's files and merges the parts the previous export kept
    for the others: the same bytes as computing the whole dataset (ADR 0024)."""
    _, exports = dataset
    whole = dataset_files(exports, name="Cohortflow test", dcm2niix_version=None)
    kept, _ = subject_files(exports)
    stored = {s: SubjectPart.model_validate_json(p.model_dump_json()) for s, p in kept.items()}
    again, own = subject_files([e for e in exports if e.stack.subject == "02"])
    assert set(again) == {"02"}
    merged = merged_dataset_files(
        [*again.values(), *(p for s, p in stored.items() if s != "02")], name="Cohortflow test"
    )
    assert {**merged, **own} == {
        path: text
        for path, text in whole.items()
        if not path.parts[0].startswith("sub-") or path.parts[0] == "sub-02"
    }
    assert "sub-01\t" in merged[PurePosixPath("participants.tsv")]


def test_dual_echo_series_kept_together_is_split_by_echo(dicom_root: Path, tmp_path: Path) -> None:
    """PD+T2 classified as one PDT2 suffix: the echoes are told apart from the DICOM EchoNumbers."""
    pdt2 = dicom_root / "dcm_qa_pdt2" / "In" / "Siemens" / "VE11"
    stacks = [real_stack(pdt2, "anat", "PDT2", echo=e) for e in (1, 2)]
    plan = plan_names(stacks)
    assert [plan[s.key].name for s in stacks] == [
        "sub-01_ses-1_echo-1_PDT2",
        "sub-01_ses-1_echo-2_PDT2",
    ]
    exports = [export_stack(s, plan[s.key], tmp_path) for s in stacks]
    write_dataset_files(tmp_path, exports, name="t", dcm2niix_version=dcm2niix_version())
    echo_times = [e.sidecars[str(plan[e.stack.key]) + ".json"]["EchoTime"] for e in exports]
    assert echo_times[0] < echo_times[1]
    assert run_bids_validator(tmp_path).errors == 0


def test_a_3d_image_is_not_written_as_bold(dicom_root: Path, tmp_path: Path) -> None:
    """A misclassified single-volume series fails its own item instead of breaking validation."""
    from services.exporter.convert.export import ExportError

    t2 = real_stack(dicom_root / "dcm_qa_pdt2" / "In" / "Siemens" / "VE11", "func", "bold", echo=2)
    plan = plan_names([t2])
    with pytest.raises(ExportError, match="must be 4D"):
        export_stack(t2, plan[t2.key], tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_stacks_sharing_one_enhanced_file_get_their_own_image(
    dicom_root: Path, tmp_path: Path
) -> None:
    """Philips enhanced B0 map: one file, two stacks (magnitude frames, B0 map frames)."""
    source = dicom_root / "dcm_qa_enh" / "In" / "Philips"
    magnitude = real_stack(source, "fmap", "magnitude")
    fieldmap = real_stack(source, "fmap", "fieldmap")
    magnitude.summary.constants, magnitude.summary.stack_key = {"PART": "M"}, "MR|PART=M"
    fieldmap.summary.constants, fieldmap.summary.stack_key = {"PART": "B0MAP"}, "MR|PART=B0MAP"
    plan = plan_names([magnitude, fieldmap])
    exports = [export_stack(s, plan[s.key], tmp_path) for s in (magnitude, fieldmap)]
    assert [[str(i) for i in e.images] for e in exports] == [
        ["sub-01/ses-1/fmap/sub-01_ses-1_magnitude.nii.gz"],
        ["sub-01/ses-1/fmap/sub-01_ses-1_fieldmap.nii.gz"],
    ]
    assert exports[0].skipped == ["image_e2_fieldmaphz: belongs to another stack of the same files"]
    units = exports[1].sidecars["sub-01/ses-1/fmap/sub-01_ses-1_fieldmap.json"]["Units"]
    assert units == "Hz"
