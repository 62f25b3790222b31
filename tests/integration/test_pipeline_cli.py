"""The main job end to end: `cohortflow run SOURCE --anonymize --out DIR --json` against the real
services of the test stack. All four stages run; the tree written to DIR must pass the BIDS
validator and hold no original identifier anywhere: not in file contents (sidecars, TSVs, NIfTI
headers, decompressed) and not in file or folder names.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from services.exporter.validate import run_bids_validator

pytestmark = [
    pytest.mark.integration,
    pytest.mark.e2e,
    pytest.mark.needs_dcm2niix,
    pytest.mark.needs_validator,
    pytest.mark.stack_services("all"),
]

PASSWORD = "e2e-audit-password"
# attributes whose values identify a person, a place, a device or a study instance
IDENTIFYING = (
    "PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "PatientAddress",
    "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "StationName", "DeviceSerialNumber", "AccessionNumber", "StudyID",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
)  # fmt: skip


def original_identifiers(root: Path) -> set[str]:
    """Every identifying value of the source files, split into searchable tokens."""
    found: set[str] = set()
    for dirpath, _, names in os.walk(root, followlinks=True):
        for name in names:
            try:
                ds = pydicom.dcmread(Path(dirpath) / name, stop_before_pixels=True)
            except Exception:
                continue
            for keyword in IDENTIFYING:
                value = ds.get(keyword)
                if value is None:
                    continue
                for item in value if isinstance(value, pydicom.multival.MultiValue) else [value]:
                    for token in re.split(r"[\^\s=,]+", str(item)):
                        if len(token) >= 5:  # shorter tokens match by chance (e.g. "MR", "1")
                            found.add(token)
    return found


def test_cohortflow_run_anonymize_gives_a_clean_valid_bids_tree(
    gateway_url: str, tmp_path: Path, dicom_root: Path
) -> None:
    source = tmp_path / "incoming"
    source.mkdir()
    (source / "deident").symlink_to(dicom_root / "dcm_qa_deident" / "In", target_is_directory=True)
    (source / "pdt2").symlink_to(dicom_root / "dcm_qa_pdt2" / "In", target_is_directory=True)
    out = tmp_path / "bids"
    # dates are removed (the default); timepoint labels name the sessions instead (ses-M00)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"anonymization": {"study_dates": {"timepoint_labels": True}}}))
    env = {
        **os.environ,
        "COHORTFLOW_GATEWAY_URL": gateway_url,
        "COHORTFLOW_AUDIT_PASSWORD": PASSWORD,
    }
    done = subprocess.run(
        [sys.executable, "-m", "cohortflow.cli", "run", str(source), "--name", "e2e-anon",
         "--anonymize", "--config", str(config), "--out", str(out), "--json"],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(done.stdout)
    stages = [j["stage"] for j in doc["jobs"]]
    assert stages == ["anonymization", "extraction", "sorting", "export"]
    assert all(j["status"] == "completed" for j in doc["jobs"]), doc["jobs"]
    assert all(j["items_failed"] == 0 for j in doc["jobs"]), [
        (j["stage"], j["errors"]) for j in doc["jobs"]
    ]
    assert doc["cohort"]["status"] == "completed"
    assert doc["cohort"]["total_subjects"] == 2
    export = doc["jobs"][-1]
    assert export["summary"]["validator"]["errors"] == 0, export["summary"]["validator"]

    # the tree the CLI downloaded is itself valid, with the dataset files
    for name in ("dataset_description.json", "participants.tsv", "README"):
        assert (out / name).is_file()
    niftis = sorted(out.rglob("*.nii.gz"))
    assert len(niftis) >= 3  # the T1w, and the PD and T2 of the dual-echo series
    report = run_bids_validator(out)
    assert report.errors == 0, report.as_json()
    sessions = {p.name for p in out.glob("sub-*/ses-*") if p.is_dir()}
    assert sessions == {"ses-M00"}, sessions

    originals = original_identifiers(source)
    assert originals, "the source should have identifying values to look for"
    pattern = re.compile(
        "|".join(re.escape(v) for v in sorted(originals, key=len, reverse=True)).encode()
    )
    leaks: list[str] = []
    for path in out.rglob("*"):
        relative = str(path.relative_to(out))
        if pattern.search(relative.encode()):
            leaks.append(f"name: {relative}")
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".gz":
                data = gzip.decompress(data)
            hit = pattern.search(data)
            if hit:
                leaks.append(f"{relative}: {hit.group().decode(errors='replace')[:3]}...")
    assert not leaks, leaks


def test_a_run_that_leaves_files_behind_says_so_and_exits_3(
    gateway_url: str, tmp_path: Path, dicom_root: Path
) -> None:
    """A de-identification that refuses a study completes, but it is not a clean success: a red
    line with the reasons grouped, the job's status reason, and exit code 3 (1 means failed)."""
    source = tmp_path / "incoming"
    files = sorted((dicom_root / "dcm_qa_ts" / "In").rglob("*.dcm"))  # one study refused
    fine = sorted((dicom_root / "dcm_qa_ct" / "In").rglob("*.dcm"))  # another released
    for i, path in enumerate(files + fine):
        ds = pydicom.dcmread(path)
        if i == 0:  # the patient's name where no profile row removes it: verification refuses
            ds.SequenceName = str(ds.PatientName)
        target = source / path.relative_to(dicom_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
    env = {
        **os.environ,
        "COHORTFLOW_GATEWAY_URL": gateway_url,
        "COHORTFLOW_AUDIT_PASSWORD": PASSWORD,
    }
    command = [sys.executable, "-m", "cohortflow.cli", "run", str(source), "--name",
               "left-behind", "--anonymize", "--stages", "anonymization"]  # fmt: skip
    shown = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert shown.returncode == 3, shown.stdout[-3000:] + shown.stderr[-3000:]
    assert "completed with work left behind" in shown.stdout
    assert f"{len(files) - 1} files in 1 studies" in shown.stdout  # the withdrawn series
    # a new cohort (a re-run of the same one would plan only the refused study, and fail)
    command[command.index("left-behind")] = "left-behind-json"
    done = subprocess.run(
        [*command, "--json"], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    (job,) = json.loads(done.stdout)["jobs"]
    assert job["status"] == "completed" and job["left_work_behind"] is True
    assert job["status_reason"].startswith(f"completed with work left behind: {len(files)} files")


def test_asl_goes_end_to_end_from_dicom_to_a_valid_perf_folder(
    gateway_url: str, tmp_path: Path, dicom_root: Path
) -> None:
    """A pCASL series and its M0 scan (a real Siemens EPI rewritten the way a scanner writes ASL)
    through extraction, sorting and export: classified perf/asl and perf/m0scan (never dsc or
    bold), exported with aslcontext.tsv and linked M0, and the dataset validates."""
    from tests.unit.exporter.asl_series import write_asl_series

    source = tmp_path / "incoming"
    study = f"2.25.{int.from_bytes(os.urandom(16), 'big')}"
    write_asl_series(
        dicom_root, source / "asl", volumes=["CONTROL", "LABEL"] * 3,
        standard_attributes=True, study_uid=study,
    )  # fmt: skip
    write_asl_series(
        dicom_root, source / "m0", volumes=["M_ZERO_SCAN"], description="ep2d_pcasl_M0",
        image_type=("ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"), series_number=11,
        study_uid=study,
    )  # fmt: skip
    out = tmp_path / "bids"
    env = {**os.environ, "COHORTFLOW_GATEWAY_URL": gateway_url}
    done = subprocess.run(
        [sys.executable, "-m", "cohortflow.cli", "run", str(source), "--name", "e2e-asl",
         "--out", str(out), "--json"],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert [j["status"] for j in doc["jobs"]] == ["completed"] * 3, doc["jobs"]
    perf = sorted(p.name for p in out.rglob("perf/*"))
    assert any(n.endswith("_asl.nii.gz") for n in perf), perf
    assert any(n.endswith("_aslcontext.tsv") for n in perf), perf
    assert any(n.endswith("_m0scan.nii.gz") for n in perf), perf
    context = next(out.rglob("*_aslcontext.tsv")).read_text().split()
    assert context == ["volume_type", *(["control", "label"] * 3)]
    asl = json.loads(next(out.rglob("perf/*_asl.json")).read_text())
    assert asl["ArterialSpinLabelingType"] == "PCASL" and asl["M0Type"] == "Separate"
    assert not list(out.rglob("*_dsc*")) and not list(out.rglob("*_bold*"))
    report = run_bids_validator(out)
    assert report.errors == 0, report.as_json()


def test_the_same_command_again_follows_the_run_in_progress(
    gateway_url: str, tmp_path: Path, dicom_root: Path
) -> None:
    """Re-running `cohortflow run` while its run goes on attaches to that run (no 409, no second
    run) and ends with its result."""
    import time

    import httpx

    source = tmp_path / "incoming"
    source.mkdir()
    # all of the shared data: a run long enough for a second command to find it going on
    (source / "all").symlink_to(dicom_root, target_is_directory=True)
    env = {**os.environ, "COHORTFLOW_GATEWAY_URL": gateway_url}
    command = [sys.executable, "-m", "cohortflow.cli", "run", str(source), "--name",
               f"attach-{tmp_path.name}", "--stages", "extraction", "--json"]  # fmt: skip
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=gateway_url, timeout=10) as api:
            while True:  # wait until the first command's job exists and is not finished
                cohorts = [c for c in api.get("/api/cohorts").json() if c["name"] == command[6]]
                jobs = api.get(f"/api/cohorts/{cohorts[0]['id']}/jobs").json() if cohorts else []
                if jobs and jobs[0]["status"] in ("pending", "running"):
                    break
                assert time.monotonic() < deadline, "the first run never started"
                time.sleep(0.1)
        second = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        out, _ = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0
    ids = [j["id"] for j in json.loads(second.stdout)["jobs"]]
    assert ids == [j["id"] for j in json.loads(out)["jobs"]] == [jobs[0]["id"]]


def _cli_run(gateway_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COHORTFLOW_GATEWAY_URL": gateway_url}
    return subprocess.run(
        [sys.executable, "-m", "cohortflow.cli", "run", *args],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


def test_the_same_command_again_delivers_the_result_and_rerun_redoes_a_stage(
    gateway_url: str, tmp_path: Path, dicom_root: Path
) -> None:
    """A finished command run again starts nothing: it writes the latest export to the new
    --out and prints the summary, exit 0; `--rerun export` runs the export again."""
    source = tmp_path / "incoming"
    source.mkdir()
    (source / "ct").symlink_to(dicom_root / "dcm_qa_ct" / "In", target_is_directory=True)
    name = f"again-{tmp_path.name}"
    first = _cli_run(
        gateway_url, str(source), "--name", name, "--out", str(tmp_path / "a"), "--json"
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    jobs = json.loads(first.stdout)["jobs"]
    assert [j["stage"] for j in jobs] == ["extraction", "sorting", "export"]

    again = _cli_run(gateway_url, str(source), "--name", name, "--out", str(tmp_path / "b"))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "nothing to do" in again.stdout and "--rerun STAGE" in again.stdout
    written = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*"))
    assert written == sorted(
        str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*")
    )
    as_json = _cli_run(gateway_url, str(source), "--name", name, "--json")
    doc = json.loads(as_json.stdout)
    assert doc["delivered_again"] is True
    assert [j["id"] for j in doc["jobs"]] == [j["id"] for j in jobs]

    redo = _cli_run(gateway_url, str(source), "--name", name, "--rerun", "export", "--json")
    assert redo.returncode == 0, redo.stdout[-3000:] + redo.stderr[-3000:]
    redone = json.loads(redo.stdout)["jobs"]
    assert [j["stage"] for j in redone] == ["extraction", "sorting", "export"]
    assert [j["id"] for j in redone[:2]] == [j["id"] for j in jobs[:2]]
    assert redone[2]["id"] != jobs[2]["id"] and redone[2]["status"] == "completed"


def test_a_config_the_gateway_refuses_creates_no_cohort(
    gateway_url: str, tmp_path: Path, dicom_root: Path
) -> None:
    """A config only the gateway can judge (an export destination outside its data roots) is
    printed as `stage.key: message`, exits 1, and leaves no cohort behind."""
    import httpx

    source = tmp_path / "incoming"
    source.mkdir()
    (source / "ct").symlink_to(dicom_root / "dcm_qa_ct" / "In", target_is_directory=True)
    config = tmp_path / "config.yaml"
    config.write_text("export:\n  destination: /proc/not-a-data-root\n")
    name = f"refused-{tmp_path.name}"
    done = _cli_run(gateway_url, str(source), "--name", name, "--config", str(config))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "\n  export.destination: " in done.stderr and "Traceback" not in done.stderr
    cohorts = httpx.get(f"{gateway_url}/api/cohorts", timeout=10).json()
    assert name not in [c["name"] for c in cohorts]


def test_an_export_with_a_failed_stack_exits_3_and_names_the_stack(
    gateway_url: str, tmp_path: Path, dicom_root: Path
) -> None:
    """One stack of the export cannot be converted (a single-volume series classified bold), the
    others are: the run completed but is not a clean success."""
    source = tmp_path / "incoming"
    source.mkdir()
    (source / "pdt2").symlink_to(dicom_root / "dcm_qa_pdt2" / "In", target_is_directory=True)
    (source / "ts").symlink_to(dicom_root / "dcm_qa_ts" / "In", target_is_directory=True)
    name = f"failed-stack-{tmp_path.name}"
    done = _cli_run(gateway_url, str(source), "--name", name)
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    assert "export: completed with work left behind" in done.stdout
    assert "not exported" in done.stdout


def test_stages_out_of_order_say_how_to_run_them(
    gateway_url: str, tmp_path: Path, dicom_root: Path
) -> None:
    source = tmp_path / "incoming"
    source.mkdir()
    (source / "ct").symlink_to(dicom_root / "dcm_qa_ct" / "In", target_is_directory=True)
    done = _cli_run(
        gateway_url, str(source), "--name", f"order-{tmp_path.name}", "--stages", "sorting"
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sorting needs extraction completed first" in done.stderr
    assert "--stages runs only the stages it names" in done.stderr
