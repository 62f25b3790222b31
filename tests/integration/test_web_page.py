"""The web page in Debian chromium against the whole local stack (every service, real DICOM).

One cohort is curated the way a researcher would: created from the sidebar, the pipeline run from
its form, progress followed to 100 %, a series flagged for review corrected, the export run again,
the validator's report and the corrected name seen in the export. Then the page's failure cases:
an error is seen while scrolled down, a stale address never shows (or runs) another cohort, a
cohort deleted elsewhere stops being polled, and no page scrolls sideways at 390, 1366 or 1920 px.
Screenshots of each step go to test-artifacts/web/ (ignored by git).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

pytestmark = [
    pytest.mark.integration,
    pytest.mark.e2e,
    pytest.mark.stack_services("all"),
    pytest.mark.asyncio(loop_scope="module"),
]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"
PASSWORD = "web-audit-password"
PIPELINE_TIMEOUT_MS = 540_000


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, dicom_root: Path) -> Path:
    """Two real studies (a de-identification test set and a dual-echo PD/T2), linked in."""
    folder = tmp_path_factory.mktemp("web-source")
    for name, data in (("deident", "dcm_qa_deident"), ("pdt2", "dcm_qa_pdt2")):
        (folder / name).symlink_to(dicom_root / data / "In", target_is_directory=True)
    return folder


@pytest.fixture(scope="module")
def flagged_source(tmp_path_factory: pytest.TempPathFactory, dev_corpus_root: Path) -> Path:
    """A real Siemens multi-echo spin-echo excerpt (dev-corpus) that the sorter flags for review:
    its rules say anat/MESE, its BidsGuess-style check anat/PDw."""
    folder = tmp_path_factory.mktemp("web-flagged")
    (folder / "qt2").symlink_to(dev_corpus_root / "dcmstack" / "2D_16Echo_qT2")
    return folder


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    chromium = shutil.which("chromium")
    # scripts/bootstrap installs it; a missing browser is a broken setup, not a reason to skip
    assert chromium is not None, "Debian chromium is not installed (scripts/bootstrap installs it)"
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(viewport={"width": 1366, "height": 900})
    opened = await context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(str(error)))
    opened.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    yield opened
    await context.close()
    assert problems == [], problems


async def shot(page: Any, name: str) -> None:
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def no_sideways_scroll(page: Any) -> bool:
    return bool(
        await page.evaluate(
            "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        )
    )


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    """What the first test leaves for the others (the curated cohort)."""
    return {}


async def run_to_end(page: Any, stages: int) -> None:
    """Wait until every stage of the cohort page has ended; all must have completed."""
    from playwright.async_api import expect

    await page.wait_for_function(
        "() => { const b = [...document.querySelectorAll('#stage-table tbody .badge')];"
        " return b.length > 0 && b.every(x => /completed|failed|cancelled|incomplete/"
        ".test(x.className)) }",
        timeout=PIPELINE_TIMEOUT_MS,
    )
    badges = await page.locator("#stage-table tbody .badge").all_inner_texts()
    assert badges == ["completed"] * stages, await page.locator("#main").inner_text()
    await expect(page.locator("#stage-table tbody")).not_to_contain_text("not started")


async def create_from_sidebar(
    page: Any, gateway_url: str, source: Path, *, anonymize: bool
) -> tuple[str, str]:
    from playwright.async_api import expect

    await page.goto(gateway_url + "/")
    await expect(page.locator("#home-view")).to_be_visible()
    await page.click("#new-cohort")
    name = f"web-{uuid.uuid4().hex[:8]}"
    form = page.locator("#cohort-form")
    await form.locator("[name=name]").fill(name)
    await form.locator("[name=source_path]").fill("/etc")
    await form.locator("[name=owner]").fill("Dr Web")
    await form.locator("[name=tags]").fill("web, e2e")
    if anonymize:
        await form.locator("[name=anonymization_enabled]").check()
    await form.locator("button[type=submit]").click()
    # the refusal is said next to the form, readable (no "source_path: source_path")
    problem = form.locator(".form-problem")
    await expect(problem).to_contain_text("outside the allowed data roots")
    assert "source_path: source_path" not in await problem.inner_text()
    await shot(page, f"01-new-cohort-refused{'-anon' if anonymize else ''}")
    await form.locator("[name=source_path]").fill(str(source))
    await form.locator("button[type=submit]").click()
    await expect(page.locator("#cohort-name")).to_have_text(name)
    await expect(page.locator("#cohort-list")).to_contain_text(name)
    await expect(page.locator("#stage-table tbody tr")).to_have_count(4 if anonymize else 3)
    return page.url.rsplit("/", 1)[-1], name


async def test_a_researcher_curates_a_cohort(
    page: Any, gateway_url: str, flagged_source: Path, state: dict[str, Any]
) -> None:
    from playwright.async_api import expect

    cohort_id, name = await create_from_sidebar(page, gateway_url, flagged_source, anonymize=False)
    state["cohort_id"] = cohort_id
    state["name"] = name

    # the pipeline form, generated from the config schema: a section per stage
    await page.click("#pipeline-box summary")
    await expect(page.locator("#pipeline-form .stage-section")).to_have_count(3)
    await page.locator("#pipeline-form .stage-section > summary", has_text="Sorting").click()
    await page.select_option("#pipeline-form [name='sorting.profile']", '"research"')
    await shot(page, "02-pipeline-form")
    await page.click("#run-pipeline")
    await expect(page.locator("#cohort-status")).to_contain_text("running")
    await shot(page, "03-pipeline-running")

    # followed to the end: every stage completed, 100 %
    await run_to_end(page, 3)
    await expect(page.locator("#stage-table tbody")).to_contain_text("100 %")
    await expect(page.locator("#export-result .verdict")).to_contain_text("BIDS validator")
    await expect(page.locator("#cohort-list li.active")).to_contain_text("completed")
    await shot(page, "04-pipeline-done")

    # review: a flagged stack, corrected to what the second opinion says (proton density)
    await page.click("#load-series")
    flagged = page.locator("#series-table tbody tr.flagged")
    await expect(flagged.first).to_contain_text("BidsGuess-style check says anat/PDw")
    first = flagged.first
    stack_key = await first.get_attribute("data-stack")
    await first.locator("button.correct").click()
    editor = page.locator("#series-table tr.editor")
    await editor.locator("[name=bids_datatype]").select_option("anat")
    await editor.locator("[name=bids_suffix]").fill("PDw")
    await editor.locator("[name=entities]").fill("acq=corrected")
    await shot(page, "05-correcting")
    await editor.locator("button.save-rule").click()
    corrected = page.locator(f"#series-table tr[data-stack='{stack_key}']").first
    await expect(corrected).to_contain_text("set by a person")
    await expect(corrected).to_contain_text("acq-corrected_PDw")
    await expect(corrected).not_to_have_class(re.compile("flagged"))
    await page.click("#rules-box summary")
    await expect(page.locator("#rules tbody tr").first).to_contain_text("Dr Web")
    await expect(page.locator("#rules tbody tr").first).to_contain_text("anat/echo-1_MESE")

    # the export again, from its stage form: the corrected name is in it, the validator's report too
    old_export = await page.locator("#stage-table tbody tr").nth(2).locator("a").inner_text()
    await page.locator("#stage-table button[data-stage=export]").click()
    await page.locator("#stage-form button[type=submit]").click()
    await expect(page.locator("#stage-table tbody tr").nth(2).locator("a")).not_to_have_text(
        old_export
    )
    await run_to_end(page, 3)
    await expect(page.locator("#export-files")).to_contain_text(
        "acq-corrected_PDw.nii.gz", timeout=30_000
    )
    await expect(page.locator("#export-result .verdict")).to_have_class(re.compile("ok"))
    await expect(page.locator("#export-result .verdict")).to_contain_text("valid (")
    await shot(page, "06-export-with-correction")

    # an export file is a link for a new tab (signed when the API has a token)
    link = page.locator("#export-files a", has_text="dataset_description.json")
    assert await link.get_attribute("target") == "_blank"
    async with httpx.AsyncClient(base_url=gateway_url) as client:
        got = await client.get(str(await link.get_attribute("href")))
    assert got.status_code == 200 and "BIDSVersion" in got.json()


async def test_an_anonymized_cohort_shows_what_was_removed(
    page: Any, gateway_url: str, source: Path, state: dict[str, Any]
) -> None:
    from playwright.async_api import expect

    cohort_id, _ = await create_from_sidebar(page, gateway_url, source, anonymize=True)
    state["anonymized_id"] = cohort_id
    await page.click("#pipeline-box summary")
    await expect(page.locator("#pipeline-form .stage-section")).to_have_count(4)
    secret = page.locator("#pipeline-form [name='anonymization.audit_export.password']")
    assert await secret.get_attribute("type") == "password"
    await page.click("#run-pipeline")  # no password: refused, and readably
    await expect(page.locator("#pipeline-form .form-problem")).to_contain_text("audit export")
    await secret.fill("short")
    await page.click("#run-pipeline")
    await expect(page.locator("#pipeline-form .form-problem")).to_contain_text(
        "at least 8 characters"
    )
    await secret.fill(PASSWORD)
    await page.check("#pipeline-form [name='anonymization.study_dates.timepoint_labels']")
    await shot(page, "02-pipeline-form-anon")
    await page.click("#run-pipeline")
    await run_to_end(page, 4)
    result = page.locator("#results")
    await expect(result).to_contain_text("Files listed")
    await expect(page.locator("#audit-download")).to_be_visible()
    await expect(page.locator("#export-result .verdict")).to_have_class(re.compile("ok"))
    await shot(page, "04-anonymized-results")
    assert PASSWORD not in await page.content()
    async with httpx.AsyncClient(base_url=gateway_url) as client:
        jobs = (await client.get(f"/api/jobs?cohort_id={cohort_id}&stage=anonymization")).json()
        audit = await client.get(f"/api/jobs/{jobs[0]['id']}/audit-export")
    assert audit.status_code == 200 and audit.content.startswith(b"\xd0\xcf\x11\xe0")


async def test_the_job_page_and_the_jobs_tab(
    page: Any, gateway_url: str, state: dict[str, Any]
) -> None:
    from playwright.async_api import expect

    cohort_id = state["anonymized_id"]
    await page.goto(f"{gateway_url}/#/jobs?cohort_id={cohort_id}&stage=anonymization")
    await expect(page.locator("#job-table tbody tr")).to_have_count(1)
    await page.locator("#job-table tbody tr a").click()
    await expect(page.locator("#job-title")).to_contain_text("Anonymization")
    await expect(page.locator("#job-config")).to_contain_text('"password": "***"')
    assert PASSWORD not in await page.content()
    await expect(page.locator("#job-facts")).to_contain_text("100 %")
    await expect(page.locator("#job-events tbody tr").first).to_be_visible()
    await shot(page, "07-job-page")


async def test_errors_are_seen_where_the_user_is(
    page: Any, gateway_url: str, state: dict[str, Any]
) -> None:
    from playwright.async_api import expect

    await page.goto(f"{gateway_url}/#/cohorts/{state['cohort_id']}")
    await page.click("#load-series")
    row = page.locator("#series-table tbody tr[data-stack]").last
    await row.locator("button.correct").click()
    editor = page.locator("#series-table tr.editor")
    await editor.scroll_into_view_if_needed()
    await editor.locator("[name=bids_suffix]").fill("not a suffix!")
    await editor.locator("button.save-rule").click()
    notice = page.locator("#notices .notice").last
    await expect(notice).to_be_visible()
    await expect(notice).to_contain_text("not allowed")
    assert "^" not in await notice.inner_text()  # no raw regular expression
    assert await notice.evaluate(
        "n => { const r = n.getBoundingClientRect(); return r.top >= 0 && r.bottom <= innerHeight }"
    )
    await expect(editor.locator(".form-problem")).to_be_in_viewport()
    await shot(page, "08-error-when-scrolled")
    # notices clear when the view changes
    await page.click("#tab-jobs")
    await expect(page.locator("#notices .notice")).to_have_count(0)


async def test_a_stale_address_and_a_deleted_cohort(
    page: Any, gateway_url: str, state: dict[str, Any], source: Path
) -> None:
    from playwright.async_api import expect

    await page.goto(f"{gateway_url}/#/cohorts/{state['cohort_id']}")
    await expect(page.locator("#cohort-name")).to_have_text(state["name"])
    await page.evaluate(f"location.hash = '#/cohorts/{uuid.uuid4()}'")
    await expect(page.locator("#missing-view")).to_be_visible()
    await expect(page.locator("#cohort-view")).to_be_hidden()
    await expect(page.locator("#stage-table button:visible")).to_have_count(0)
    await shot(page, "09-unknown-cohort")

    async with httpx.AsyncClient(base_url=gateway_url) as client:
        created = await client.post(
            "/api/cohorts",
            json={"name": f"doomed-{uuid.uuid4().hex[:6]}", "source_path": str(source)},
        )
        doomed = created.json()["id"]
        await page.evaluate(f"location.hash = '#/cohorts/{doomed}'")
        await expect(page.locator("#cohort-name")).to_have_text(created.json()["name"])
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url) if doomed in r.url else None)
        assert (await client.delete(f"/api/cohorts/{doomed}")).status_code == 204
    await expect(page.locator("#missing-text")).to_contain_text("deleted", timeout=10_000)
    await expect(page.locator("#cohort-list")).not_to_contain_text(created.json()["name"])
    settled = len(asked)
    await page.wait_for_timeout(5000)  # a deleted cohort is not polled any more
    assert len(asked) == settled, asked[settled:]
    await shot(page, "10-deleted-elsewhere")


@pytest.mark.parametrize("width", [390, 1366, 1920])
async def test_no_page_scrolls_sideways(
    browser: Any, gateway_url: str, state: dict[str, Any], width: int
) -> None:
    from playwright.async_api import expect

    context = await browser.new_context(viewport={"width": width, "height": 900})
    page = await context.new_page()
    try:
        await page.goto(f"{gateway_url}/#/cohorts/{state['cohort_id']}")
        await expect(page.locator("#series-table tbody tr").first).to_be_visible()
        await page.click("#pipeline-box summary")
        # the browser: a subject, its session, a picture of each stack
        await page.locator("#browser details.subject > summary").first.click()
        await page.locator("#browser details.session > summary").first.click()
        picture = page.locator("#browser img.thumb").first
        await expect(picture).to_have_attribute("src", re.compile("thumbnail"))
        await page.wait_for_function(
            "() => [...document.querySelectorAll('#browser img.thumb')]"
            ".some(i => i.complete && i.naturalWidth > 16)"
        )
        assert await no_sideways_scroll(page), f"cohort page scrolls sideways at {width}px"
        await shot(page, f"11-cohort-{width}")
        await page.goto(f"{gateway_url}/#/jobs")
        await expect(page.locator("#job-table tbody tr").first).to_be_visible()
        assert await no_sideways_scroll(page), f"jobs page scrolls sideways at {width}px"
        job = await page.locator("#job-table tbody tr a").first.get_attribute("href")
        await page.evaluate(f"location.hash = '{job}'")
        await expect(page.locator("#job-title")).not_to_be_empty()
        assert await no_sideways_scroll(page), f"job page scrolls sideways at {width}px"
        await shot(page, f"12-job-{width}")
    finally:
        await context.close()


async def test_screenshots_were_kept() -> None:
    kept = sorted(p.name for p in ARTIFACTS.glob("*.png"))
    assert any(n.startswith("06-") for n in kept), kept
