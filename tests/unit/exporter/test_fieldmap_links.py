"""Field-map and M0 links: which scans a field map corrects, and which ASL series an M0 calibrates."""

from __future__ import annotations

from datetime import datetime
from pathlib import PurePosixPath

from services.exporter.bids.fieldmaps import ScanRecord, link_fieldmaps, link_m0scans
from services.exporter.bids.sidecar import slice_normal

AXIAL = slice_normal([1, 0, 0, 0, 1, 0])
SAGITTAL = slice_normal([0, 1, 0, 0, 0, -1])


def record(
    name: str,
    *,
    session: str = "1",
    minute: int = 0,
    normal: tuple[float, float, float] | None = AXIAL,
    axis: str | None = "j",
) -> ScanRecord:
    datatype, filename = name.split("/")
    entities = dict(part.split("-", 1) for part in filename.split("_")[:-1])
    entities = {"sub": "01", "ses": session, **entities}
    suffix = filename.split("_")[-1]
    stem = "_".join(f"{k}-{v}" for k, v in entities.items())
    return ScanRecord(
        path=PurePosixPath(f"sub-01/ses-{session}/{datatype}/{stem}_{suffix}.nii.gz"),
        subject="01",
        session=session,
        datatype=datatype,
        suffix=suffix,
        entities=entities,
        acquired_at=datetime(2024, 1, 2, 10, minute),
        slice_normal=normal,
        phase_axis=axis,
    )


def test_slice_normal() -> None:
    assert AXIAL == (0.0, 0.0, 1.0)
    assert slice_normal([1, 0]) is None


def test_nearest_parallel_field_wins_per_scan() -> None:
    records = [
        record("fmap/run-1_magnitude1", minute=0),
        record("fmap/run-1_phasediff", minute=0),
        record("fmap/run-2_magnitude1", minute=30),
        record("fmap/run-2_phasediff", minute=30),
        record("func/task-a_bold", minute=5),
        record("func/task-b_bold", minute=28),
        record("dwi/dwi", minute=40),
        record("anat/T1w", minute=1),
    ]
    links = link_fieldmaps(records)
    first = links[records[1].path]
    second = links[records[3].path]
    assert first["IntendedFor"] == ["bids::sub-01/ses-1/func/sub-01_ses-1_task-a_bold.nii.gz"]
    assert second["IntendedFor"] == [
        "bids::sub-01/ses-1/dwi/sub-01_ses-1_dwi.nii.gz",
        "bids::sub-01/ses-1/func/sub-01_ses-1_task-b_bold.nii.gz",
    ]
    assert "IntendedFor" not in links[records[0].path]
    assert links[records[4].path] == {"B0FieldSource": first["B0FieldIdentifier"]}
    assert first["B0FieldIdentifier"] != second["B0FieldIdentifier"]
    assert records[7].path not in links  # anatomy is not a field-map target


def test_no_link_across_sessions_or_slice_planes() -> None:
    records = [
        record("fmap/phasediff", session="1"),
        record("func/task-a_bold", session="2"),
        record("func/task-b_bold", session="1", normal=SAGITTAL),
    ]
    assert link_fieldmaps(records) == {}


def test_pepolar_pair_needs_the_same_phase_encoding_axis() -> None:
    records = [
        record("fmap/dir-AP_epi", axis="j"),
        record("fmap/dir-PA_epi", axis="j"),
        record("func/task-lr_bold", axis="i"),
        record("func/task-ap_bold", axis="j"),
    ]
    links = link_fieldmaps(records)
    assert links[records[0].path]["IntendedFor"] == [
        "bids::sub-01/ses-1/func/sub-01_ses-1_task-ap_bold.nii.gz"
    ]
    assert (
        links[records[0].path]["B0FieldIdentifier"] == links[records[1].path]["B0FieldIdentifier"]
    )
    assert records[2].path not in links


def test_m0scan_points_at_its_asl_series() -> None:
    records = [
        record("perf/acq-pcasl_asl", minute=10),
        record("perf/acq-pcasl_m0scan", minute=12),
        record("perf/acq-pasl_asl", minute=20),
        record("perf/acq-other_m0scan", minute=21),
    ]
    links = link_m0scans(records)
    assert links[records[1].path] == {
        "IntendedFor": ["bids::sub-01/ses-1/perf/sub-01_ses-1_acq-pcasl_asl.nii.gz"]
    }
    assert links[records[3].path] == {
        "IntendedFor": ["bids::sub-01/ses-1/perf/sub-01_ses-1_acq-pasl_asl.nii.gz"]
    }
