"""ASL export: sidecar fields and `aslcontext.tsv` from what the DICOM records, M0 links, what stays
missing, and the validator's verdict on the result (ADR 0015)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from services.exporter.bids import (
    ExportedStack,
    incomplete_images,
    plan_names,
    write_dataset_files,
)
from services.exporter.bids.asl import (
    AslEvidence,
    asl_sidecar,
    check_volume_types,
    repeated_keys,
)
from services.exporter.bids.sidecar import missing_required
from services.exporter.bids.stack import ExportStack
from services.exporter.convert.asl import read_asl_evidence
from services.exporter.convert.dcm2niix import dcm2niix_version
from services.exporter.convert.export import export_stack
from services.exporter.validate import run_bids_validator
from shared.catalog import StackSummary
from tests.unit.exporter.asl_series import (
    M0_PROTOCOL,
    write_asl_series,
    write_enhanced_asl_series,
)
from tests.unit.exporter.stacks import real_stack

PAIRS = ["CONTROL", "LABEL"] * 3

# --- the pure core -----------------------------------------------------------------------------


def test_repeated_keys_keeps_every_value_in_order() -> None:
    text = '{"PostLabelingDelay": 1.8, "A": {"B": 1, "B": 2}, "PostLabelingDelay": 1.65}'
    assert repeated_keys(text) == {"PostLabelingDelay": [1.8, 1.65]}
    assert repeated_keys('{"A": 1}') == {}


def test_pulse_train_duration_is_the_labelling_duration_not_the_delay() -> None:
    """dcm2niix writes (0018,9258) as a second PostLabelingDelay: that value is dropped and
    becomes LabelingDuration; the vendor protocol's delay stays."""
    converted = {
        "PostLabelingDelay": 1.65,
        "ArterialSpinLabelingType": "PCASL",
        "RepetitionTime": 4,
    }
    evidence = AslEvidence(pulse_train_duration_ms=1650, labeling_contrast="PSEUDOCONTINUOUS")
    made = asl_sidecar(converted, {"PostLabelingDelay": [2.0, 1.65]}, evidence, volumes=2)
    assert made.sidecar["PostLabelingDelay"] == 2.0
    assert made.sidecar["LabelingDuration"] == 1.65
    assert made.sidecar["RepetitionTimePreparation"] == 4
    # GE: dcm2niix writes the (0018,9258) value first, then the delay from InversionTime
    ge = asl_sidecar(converted, {"PostLabelingDelay": [1.65, 2.025]}, evidence, volumes=2)
    assert ge.sidecar["PostLabelingDelay"] == 2.025
    # only the pulse train duration: no delay is known
    alone = asl_sidecar({"PostLabelingDelay": 1.65}, {}, evidence, volumes=2)
    assert "PostLabelingDelay" not in alone.sidecar
    assert any("0018,9258" in n for n in alone.notes)


def test_volume_types_decide_m0_type_and_pairs() -> None:
    evidence = AslEvidence(
        volume_types=["m0scan", "control", "label", "control", "label"],
        volume_types_source="ASL Context (0018,9257)",
    )
    made = asl_sidecar({"M0Type": "Absent", "TotalAcquiredPairs": 9}, {}, evidence, volumes=5)
    assert made.aslcontext == ["m0scan", "control", "label", "control", "label"]
    assert made.sidecar["M0Type"] == "Included"
    assert made.sidecar["TotalAcquiredPairs"] == 2
    # pairs only: M0Type is decided with the dataset (Separate or Absent), not guessed here
    pairs = AslEvidence(volume_types=["control", "label"], volume_types_source="x")
    assert "M0Type" not in asl_sidecar({"M0Type": "Included"}, {}, pairs, volumes=2).sidecar


@pytest.mark.parametrize(
    ("types", "volumes", "problem"),
    [
        (["control", "label"], 2, None),
        (["deltam", "m0scan"], 2, None),
        (["control"], 2, "1 volume types for 2 volumes"),
        # an M0 volume reported as LABEL (a context shifted by one): counts no longer match
        (["label", "control", "label"], 3, "1 control and 2 label volumes"),
        (["control", "?"], 2, "unknown volume types ?"),
    ],
)
def test_check_volume_types(types: list[str], volumes: int, problem: str | None) -> None:
    assert check_volume_types(types, volumes) == problem


def test_unknown_volume_types_leave_the_converter_guess_and_say_why() -> None:
    made = asl_sidecar({"M0Type": "Included"}, {}, AslEvidence(), volumes=7)
    assert made.aslcontext is None and made.sidecar["M0Type"] == "Included"
    assert any("volume types unknown (not recorded in the DICOM)" in n for n in made.notes)


def test_pasl_bolus_cut_off_from_the_standard_attributes() -> None:
    evidence = AslEvidence(
        labeling_contrast="PULSED",
        bolus_cut_off=True,
        bolus_cut_off_technique="Q2TIPS",
        bolus_cut_off_delay_ms=700,
        crusher=True,
        crusher_flow_limit=4.0,
    )
    sidecar = asl_sidecar({}, {}, evidence, volumes=2).sidecar
    assert sidecar["ArterialSpinLabelingType"] == "PASL"
    assert (sidecar["BolusCutOffFlag"], sidecar["BolusCutOffTechnique"]) == (True, "Q2TIPS")
    assert sidecar["BolusCutOffDelayTime"] == 0.7
    assert (sidecar["VascularCrushing"], sidecar["VascularCrushingVENC"]) == (True, 4.0)
    assert "LabelingDuration" not in sidecar


def test_required_keys_that_depend_on_other_keys() -> None:
    base = {
        "ArterialSpinLabelingType": "PCASL",
        "PostLabelingDelay": 1.8,
        "BackgroundSuppression": False,
        "M0Type": "Separate",
        "TotalAcquiredPairs": 3,
        "MagneticFieldStrength": 3,
        "MRAcquisitionType": "2D",
        "EchoTime": 0.01,
        "RepetitionTimePreparation": 4,
    }
    assert missing_required(base, "asl") == ["LabelingDuration", "SliceTiming"]
    pasl = {**base, "ArterialSpinLabelingType": "PASL", "MRAcquisitionType": "3D"}
    assert missing_required(pasl, "asl") == ["BolusCutOffFlag"]
    cut = {**pasl, "BolusCutOffFlag": True}
    assert missing_required(cut, "asl") == ["BolusCutOffDelayTime", "BolusCutOffTechnique"]
    assert missing_required({"MRAcquisitionType": "3D"}, "m0scan") == [
        "RepetitionTimePreparation",
        "EchoTime",
    ]


# --- evidence read from DICOM headers -----------------------------------------------------------


def _header(path: Path, **values: Any) -> Path:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def test_philips_label_type_per_instance(tmp_path: Path) -> None:
    """The Philips label type (2005,xx29) in block "Philips MR Imaging DD 005", read per file and
    grouped like any classic series (here two slices per TemporalPositionIdentifier)."""
    files = []
    for number, label in enumerate(["CONTROL", "CONTROL", "LABEL", "LABEL"]):
        path = _header(
            tmp_path / f"{number}.dcm",
            InstanceNumber=number + 1,
            TemporalPositionIdentifier=1 + number // 2,
        )
        ds = pydicom.dcmread(path)
        ds.private_block(0x2005, "Philips MR Imaging DD 005", create=True).add_new(
            0x29, "CS", label
        )
        ds.save_as(path)
        files.append(path)
    evidence = read_asl_evidence(files, volumes=2)
    assert evidence.volume_types == ["control", "label"]
    assert evidence.volume_types_source == "Philips label type (2005,xx29)"
    # two slices of one volume disagree: no types
    ds = pydicom.dcmread(files[1])
    ds.private_block(0x2005, "Philips MR Imaging DD 005")[0x29].value = "LABEL"
    ds.save_as(files[1])
    mixed = read_asl_evidence(files, volumes=2)
    assert mixed.volume_types is None and "volume 1" in (mixed.volume_types_problem or "")


def test_enhanced_frames_grouped_by_temporal_position(tmp_path: Path) -> None:
    frames = []
    for index, context in [(1, "M_ZERO_SCAN"), (1, "M_ZERO_SCAN"), (2, "CONTROL"), (3, "LABEL")]:
        frame = Dataset()
        content = Dataset()
        content.TemporalPositionIndex = index
        frame.FrameContentSequence = [content]
        asl = Dataset()
        asl.ASLContext = context
        frame.MRArterialSpinLabelingSequence = [asl]
        frames.append(frame)
    modifier = Dataset()
    modifier.ArterialSpinLabelingContrast = "PULSED"
    shared = Dataset()
    shared.MRModifierSequence = [modifier]
    path = _header(
        tmp_path / "enhanced.dcm",
        NumberOfFrames=4,
        PerFrameFunctionalGroupsSequence=frames,
        SharedFunctionalGroupsSequence=[shared],
    )
    evidence = read_asl_evidence([path], volumes=3)
    assert evidence.volume_types == ["m0scan", "control", "label"]
    assert evidence.labeling_contrast == "PULSED"
    assert read_asl_evidence([path], volumes=4).volume_types is None


# --- end to end: DICOM -> dcm2niix -> BIDS -> validator -----------------------------------------


def _export(
    stacks: list[ExportStack], root: Path
) -> tuple[list[ExportedStack], dict[str, PurePosixPath]]:
    plan = plan_names(stacks)
    exports = [export_stack(s, plan[s.key], root) for s in stacks]
    write_dataset_files(root, exports, name="ASL test", dcm2niix_version=dcm2niix_version())
    return exports, plan


def _sidecar(root: Path, relative: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / relative).read_text())
    return data


@pytest.fixture(scope="module")
def pcasl_with_m0(
    dicom_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[ExportedStack]]:
    """A Siemens pCASL series recording its volume types (ASL Context per instance) and the
    labelling attributes, plus a separate M0 series of the same study."""
    source = tmp_path_factory.mktemp("asl-dicom")
    study = pydicom.uid.generate_uid()
    write_asl_series(
        dicom_root, source / "asl", volumes=PAIRS, standard_attributes=True, study_uid=study
    )
    write_asl_series(
        dicom_root,
        source / "m0",
        volumes=["M_ZERO_SCAN"],
        description="ep2d_pcasl_M0",
        protocol=M0_PROTOCOL,
        series_number=11,
        study_uid=study,
    )
    stacks = [
        real_stack(source / "asl", "perf", "asl", session=None),
        real_stack(source / "m0", "perf", "m0scan", session=None),
    ]
    root = tmp_path_factory.mktemp("asl-bids")
    exports, _ = _export(stacks, root)
    return root, exports


@pytest.mark.needs_dcm2niix
def test_pcasl_and_m0_are_exported_the_bids_way(
    pcasl_with_m0: tuple[Path, list[ExportedStack]],
) -> None:
    root, exports = pcasl_with_m0
    perf = root / "sub-01" / "perf"
    assert sorted(p.name for p in perf.iterdir()) == [
        "sub-01_asl.json",
        "sub-01_asl.nii.gz",
        "sub-01_aslcontext.tsv",
        "sub-01_m0scan.json",
        "sub-01_m0scan.nii.gz",
    ]
    assert (perf / "sub-01_aslcontext.tsv").read_text().split() == [
        "volume_type",
        *["control", "label"] * 3,
    ]
    asl = _sidecar(perf, "sub-01_asl.json")
    assert asl["ArterialSpinLabelingType"] == "PCASL"
    assert asl["PostLabelingDelay"] == 1.8  # Siemens protocol (sWipMemBlock.adFree[2], us)
    assert asl["LabelingDuration"] == 1.472  # ASL Pulse Train Duration (0018,9258), ms
    assert asl["M0Type"] == "Separate" and asl["TotalAcquiredPairs"] == 3
    assert asl["RepetitionTimePreparation"] == asl["RepetitionTime"]
    assert asl["VascularCrushing"] is False
    assert "BackgroundSuppression" not in asl  # no DICOM attribute records it: never invented
    m0 = _sidecar(perf, "sub-01_m0scan.json")
    assert m0["IntendedFor"] == ["bids::sub-01/perf/sub-01_asl.nii.gz"]
    assert m0["RepetitionTimePreparation"] == m0["RepetitionTime"]
    assert "M0Type" not in m0  # dcm2niix's, for a single volume of an ASL sequence
    warnings = [w for e in exports for w in e.warnings]
    assert "sub-01_asl: sidecar lacks required BackgroundSuppression" in warnings


@pytest.mark.needs_dcm2niix
@pytest.mark.needs_validator
def test_what_dicom_cannot_tell_is_reported_and_the_rest_validates(
    pcasl_with_m0: tuple[Path, list[ExportedStack]], tmp_path: Path
) -> None:
    """The dataset validates: the ASL lacking BackgroundSuppression is listed in .bidsignore and the
    README. With the value added by hand, it validates without being ignored: nothing else lacks."""
    root, exports = pcasl_with_m0
    assert incomplete_images(exports) == {
        PurePosixPath("sub-01/perf/sub-01_asl.nii.gz"): ["BackgroundSuppression"]
    }
    ignored = (root / ".bidsignore").read_text().split()
    assert (
        "sub-01/perf/sub-01_asl.nii.gz" in ignored
        and "sub-01/perf/sub-01_aslcontext.tsv" in ignored
    )
    assert "sub-01/perf/sub-01_m0scan.nii.gz" not in ignored
    assert "- sub-01/perf/sub-01_asl.nii.gz: BackgroundSuppression" in (root / "README").read_text()
    report = run_bids_validator(root)
    assert report.errors == 0, report.issues

    completed = tmp_path / "completed"
    shutil.copytree(root, completed)
    sidecar = completed / "sub-01" / "perf" / "sub-01_asl.json"
    sidecar.write_text(
        json.dumps({**json.loads(sidecar.read_text()), "BackgroundSuppression": False})
    )
    (completed / ".bidsignore").write_text("")
    report = run_bids_validator(completed)
    assert report.errors == 0, report.issues


@pytest.mark.needs_dcm2niix
@pytest.mark.needs_validator
def test_siemens_protocol_alone_gives_no_volume_types(dicom_root: Path, tmp_path: Path) -> None:
    """A Siemens mosaic pCASL with no per-volume attribute: dcm2niix's labelling fields are kept
    (its millisecond RepetitionTimePreparation corrected); the volume types, hence aslcontext.tsv,
    are unknown, and with them the pair count: both reported, the files listed in .bidsignore."""
    write_asl_series(dicom_root, tmp_path / "asl", volumes=["M_ZERO_SCAN", *PAIRS])
    stack = real_stack(tmp_path / "asl", "perf", "asl", session=None)
    root = tmp_path / "bids"
    (exported,), _ = _export([stack], root)
    asl = _sidecar(root, "sub-01/perf/sub-01_asl.json")
    assert (asl["ArterialSpinLabelingType"], asl["PostLabelingDelay"]) == ("PCASL", 1.8)
    assert asl["LabelingDuration"] == 1.472  # 80 RF blocks (sWipMemBlock.adFree[3])
    assert asl["RepetitionTimePreparation"] == asl["RepetitionTime"] < 10
    assert asl["M0Type"] == "Included"  # dcm2niix: an odd number of volumes
    assert not (root / "sub-01/perf/sub-01_aslcontext.tsv").exists()
    assert any("volume types unknown (not recorded in the DICOM)" in w for w in exported.warnings)
    readme = (root / "README").read_text()
    expected = (
        "- sub-01/perf/sub-01_asl.nii.gz: BackgroundSuppression, TotalAcquiredPairs, aslcontext.tsv"
    )
    assert expected in readme
    assert run_bids_validator(root).errors == 0


@pytest.mark.needs_dcm2niix
def test_orphan_m0scan_is_listed_as_incomplete(dicom_root: Path, tmp_path: Path) -> None:
    write_asl_series(dicom_root, tmp_path / "m0", volumes=["M_ZERO_SCAN"], protocol=M0_PROTOCOL)
    root = tmp_path / "bids"
    _export([real_stack(tmp_path / "m0", "perf", "m0scan", session=None)], root)
    assert "sub-01/perf/sub-01_m0scan.json" in (root / ".bidsignore").read_text().split()
    assert "sub-01_m0scan.nii.gz: IntendedFor" in (root / "README").read_text()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # the scanner's CBF map, whatever suffix the sorter gave it
        (
            {"datatype": "perf", "suffix": "asl", "constructs": ["CBF"]},
            "derivatives/scanner/sub-01/perf/sub-01_cbf",
        ),
        (
            {
                "datatype": "derivatives",
                "suffix": "perfmap",
                "intent": "perf",
                "constructs": ["CBF"],
            },
            "derivatives/scanner/sub-01/perf/sub-01_cbf",
        ),
        # a perfusion-weighted (subtracted) image: no BIDS derivative suffix, kept apart as it is
        (
            {
                "datatype": "derivatives",
                "suffix": "perfmap",
                "intent": "perf",
                "constructs": ["PWI"],
            },
            "derivatives/scanner/sub-01/perf/sub-01_perfmap",
        ),
    ],
)
def test_derived_perfusion_maps_go_to_derivatives(fields: dict[str, Any], expected: str) -> None:
    summary = StackSummary(
        subject_id="01", study_instance_uid="1.2", series_instance_uid="1.2.3", stack_key="MR"
    )
    stack = ExportStack(subject="01", summary=summary, **fields)
    assert [str(p) for p in plan_names([stack]).values()] == [expected]


@pytest.mark.needs_dcm2niix
@pytest.mark.needs_validator
def test_siemens_xa_enhanced_context_per_frame(dicom_root: Path, tmp_path: Path) -> None:
    """Siemens XA enhanced (one multi-frame file per volume): ASL Context per frame gives
    aslcontext.tsv; the only timing is ASL Pulse Train Duration, which dcm2niix reports as
    PostLabelingDelay: it becomes LabelingDuration and the delay is reported missing."""
    write_enhanced_asl_series(dicom_root, tmp_path / "asl", volumes=["CONTROL", "LABEL"] * 2)
    root = tmp_path / "bids"
    (exported,), _ = _export([real_stack(tmp_path / "asl", "perf", "asl", session=None)], root)
    context = root / "sub-01" / "perf" / "sub-01_aslcontext.tsv"
    assert context.read_text().split() == ["volume_type", "control", "label", "control", "label"]
    asl = _sidecar(root, "sub-01/perf/sub-01_asl.json")
    assert (asl["ArterialSpinLabelingType"], asl["LabelingDuration"]) == ("PCASL", 1.8)
    assert "PostLabelingDelay" not in asl and asl["TotalAcquiredPairs"] == 2
    assert asl["M0Type"] == "Absent"  # no M0 volume, no m0scan in the dataset
    assert incomplete_images([exported]) == {
        PurePosixPath("sub-01/perf/sub-01_asl.nii.gz"): [
            "PostLabelingDelay",
            "BackgroundSuppression",
        ]
    }
    assert run_bids_validator(root).errors == 0


@pytest.mark.needs_dcm2niix
def test_context_shifted_by_one_volume_is_refused(dicom_root: Path, tmp_path: Path) -> None:
    """An M0 volume recorded as LABEL (as reported on Siemens XA61): three volumes, one control
    and two labels. The context is not written; the reason is reported."""
    write_enhanced_asl_series(dicom_root, tmp_path / "asl", volumes=["LABEL", "CONTROL", "LABEL"])
    root = tmp_path / "bids"
    (exported,), _ = _export([real_stack(tmp_path / "asl", "perf", "asl", session=None)], root)
    assert not (root / "sub-01" / "perf" / "sub-01_aslcontext.tsv").exists()
    assert (
        "asl: volume types unknown (ASL Context (0018,9257): 1 control and 2 label volumes)"
        in exported.warnings
    )
