"""New studies through all four services, as a hospital system sends them: a cohort is exported with
`cohortflow run`, then one study is announced twice and another arrives in two deliveries without
saying it is complete. Exactly one scoped job per stage runs for each new study, the next export
holds the earlier subject's files unchanged plus the new subjects, and the validator passes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from tests.integration.polling import eventually_blocking
from tests.integration.studies import study_uid

pytestmark = [
    pytest.mark.integration,
    pytest.mark.e2e,
    pytest.mark.needs_dcm2niix,
    pytest.mark.needs_validator,
    pytest.mark.stack_services("all"),
]


def dicom_files(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and pydicom.misc.is_dicom(path):
            found.append(path)
    return found


def export_files(api: httpx.Client, cohort_id: str, job_id: str) -> dict[str, dict[str, Any]]:
    response = api.get(f"/api/cohorts/{cohort_id}/exports/{job_id}")
    assert response.status_code == 200, response.text
    return {f["path"]: f for f in response.json()["files"]}


@pytest.mark.parametrize("anonymize", [False, True], ids=["identified", "anonymized"])
def test_new_studies_are_processed_once_and_only_they_are_added(
    gateway_url: str, tmp_path: Path, dicom_root: Path, anonymize: bool
) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    first = dicom_root / "dcm_qa_pdt2" / "In" / "Siemens"
    (incoming / "study-a").symlink_to(first, target_is_directory=True)
    env = {
        **os.environ,
        "COHORTFLOW_GATEWAY_URL": gateway_url,
        "COHORTFLOW_AUDIT_PASSWORD": "new-studies-audit-password",
    }
    name = f"new-studies-{'anon-' if anonymize else ''}{int(time.time())}"
    done = subprocess.run(
        [sys.executable, "-m", "cohortflow.cli", "run", str(incoming), "--name", name,
         "--out", str(tmp_path / "out1"), "--json", *(["--anonymize"] if anonymize else [])],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    cohort_id = json.loads(done.stdout)["cohort_id"]

    with httpx.Client(base_url=gateway_url, timeout=60.0) as api:
        assert api.patch(f"/api/cohorts/{cohort_id}", json={"study_quiet_period_s": 2}).is_success
        first_export = max(
            (
                j
                for j in api.get(f"/api/jobs?cohort_id={cohort_id}").json()
                if j["stage"] == "export"
            ),
            key=lambda j: j["created_at"],
        )
        before = export_files(api, cohort_id, first_export["id"])

        # study B, announced twice (a router that resends)
        b = incoming / "study-b"
        shutil.copytree(dicom_root / "dcm_qa_nih" / "In" / "20180918Si", b)
        notice = {"study_instance_uid": study_uid(b), "location": str(b), "cohort": cohort_id,
                  "complete": True}  # fmt: skip
        accepted = api.post("/api/studies", json=notice)
        assert accepted.status_code == 202 and accepted.json()["outcome"] == "accepted"
        again = api.post("/api/studies", json=notice)
        assert again.status_code == 200 and again.json()["outcome"] == "duplicate"

        # study C, in two deliveries, the sender not saying when it is complete
        c_files = dicom_files(dicom_root / "dcm_qa_enh" / "In" / "Siemens")
        assert len(c_files) >= 2
        c = incoming / "study-c"
        c.mkdir()
        half = len(c_files) // 2
        for dcm in c_files[:half]:
            shutil.copy(dcm, c / dcm.name)
        piece = {"study_instance_uid": study_uid(c), "location": str(c), "cohort": cohort_id}
        waiting = api.post("/api/studies", json=piece)
        assert waiting.json()["outcome"] == "waiting", waiting.text
        for dcm in c_files[half:]:
            shutil.copy(dcm, c / dcm.name)
        assert api.post("/api/studies", json=piece).json()["outcome"] == "duplicate"

        def all_done() -> list[dict[str, Any]] | None:
            jobs = api.get(f"/api/jobs?cohort_id={cohort_id}&limit=1000").json()
            scoped = [j for j in jobs if j["scoped"]]
            if len(scoped) < 2 * len(stages) or any(
                j["status"] in ("pending", "running") for j in scoped
            ):
                return None
            return scoped

        stages = ["extraction", "sorting", "export"]
        if anonymize:
            stages.insert(0, "anonymization")
        scoped = eventually_blocking(all_done, timeout=600)
        by_stage: dict[str, int] = {}
        for job in scoped:
            assert job["status"] == "completed", job
            by_stage[job["stage"]] = by_stage.get(job["stage"], 0) + 1
        assert by_stage == dict.fromkeys(stages, 2)  # one per new study

        received = api.get(f"/api/studies?cohort_id={cohort_id}").json()
        c_notice = next(r for r in received if r["seq"] == waiting.json()["notice"])
        assert c_notice["outcome"] == "accepted" and c_notice["files"] == len(c_files)

        latest = max((j for j in scoped if j["stage"] == "export"), key=lambda j: j["finished_at"])
        after = export_files(api, cohort_id, latest["id"])
        assert latest["summary"]["validator"]["errors"] == 0, latest["summary"]["validator"]
        # each export planned its new subject only (after anonymization too: the scope travels
        # on as the copies' UIDs)
        for job in scoped:
            if job["stage"] == "export":
                assert job["summary"]["subjects_planned"] == 1, job["summary"]
                assert job["summary"]["carried_from"], job["summary"]

    subjects_before = {p.split("/")[0] for p in before if p.startswith("sub-")}
    subjects_after = {p.split("/")[0] for p in after if p.startswith("sub-")}
    assert subjects_before < subjects_after and len(subjects_after) == len(subjects_before) + 2
    for key, entry in before.items():
        if key.startswith("sub-"):  # the earlier subject's files: the same bytes
            assert after[key]["sha256"] == entry["sha256"], key
    # the files written by the first run are what the API lists for it
    for key, entry in before.items():
        local = tmp_path / "out1" / key
        if key.startswith("sub-") and local.is_file():
            assert hashlib.sha256(local.read_bytes()).hexdigest() == entry["sha256"], key
