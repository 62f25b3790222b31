"""The sorter service on the local stack: incremental runs and `selectedModalities`.

A cohort of real CT and MR (symlinks into the team's QA sets) is extracted, then sorted twice under
the default `skipClassified`: first with only CT selected, then with only MR. The MR stacks the first
run stored as "modality MR not selected" must be classified by the second run, not skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.integration.polling import wait_job_blocking
from tests.integration.test_extraction import create_cohort, link_tree, run_extraction

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.stack_services("gateway", "extractor", "sorter"),
]


@pytest.fixture(scope="module")
def api(gateway_url: str) -> Any:
    with httpx.Client(base_url=gateway_url, timeout=60.0) as client:
        yield client


def run_sorting(api: httpx.Client, cohort_id: str, config: dict[str, Any]) -> dict[str, Any]:
    response = api.post(f"/api/cohorts/{cohort_id}/stages/sorting/run", json={"config": config})
    assert response.status_code == 202, response.text
    job = wait_job_blocking(api, response.json()["id"])
    assert job["status"] == "completed", job
    return job


async def rows_by_modality(pool: asyncpg.Pool, cohort_id: str) -> dict[str, list[asyncpg.Record]]:
    rows = await pool.fetch(
        "SELECT stack_key, intent, excluded_reason FROM sorting.series_classification"
        " WHERE cohort_id = $1",
        cohort_id,
    )
    out: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        out.setdefault(row["stack_key"].split("|", 1)[0], []).append(row)
    return out


async def test_stacks_left_out_by_selected_modalities_are_classified_when_selected(
    api: httpx.Client, tmp_path: Path, dicom_root: Path, db_pool: asyncpg.Pool
) -> None:
    source = link_tree(
        tmp_path / "modalities",
        {
            "ct": dicom_root / "dcm_qa_ct",
            "mr": dicom_root / "dcm_qa_fmap/In/Siemens/2_gre_field_magph",
        },
    )
    cohort = create_cohort(api, "sorting-modalities", source)
    extraction = wait_job_blocking(api, run_extraction(api, cohort["id"])["id"])
    assert extraction["status"] == "completed", extraction

    run_sorting(api, cohort["id"], {"selectedModalities": ["CT"]})
    first = await rows_by_modality(db_pool, cohort["id"])
    assert first["MR"] and all(
        r["excluded_reason"] == "modality MR not selected" for r in first["MR"]
    )
    assert any(r["intent"] != "excluded" for r in first["CT"])

    run_sorting(api, cohort["id"], {"selectedModalities": ["MR"]})  # skipClassified by default
    second = await rows_by_modality(db_pool, cohort["id"])
    assert len(second["MR"]) == len(first["MR"])
    assert all(r["excluded_reason"] is None and r["intent"] == "fmap" for r in second["MR"]), [
        dict(r) for r in second["MR"]
    ]
    # the CT stacks classified by the first run were skipped, not overwritten by an exclusion
    assert [dict(r) for r in second["CT"]] == [dict(r) for r in first["CT"]]
