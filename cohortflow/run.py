"""`cohortflow run SOURCE`: the main job, through the gateway's public API, with progress bars.

It brings the local stack up when no gateway is configured, creates (or reuses) the cohort, runs the
requested stages in order, shows one progress bar per stage, prints a summary, optionally downloads
the export to `--out`, and exits non-zero unless everything asked for was done: `EXIT_FAILED` when
a job failed or was cancelled, `EXIT_LEFT_BEHIND` when every job completed but one left work behind
(files refused by de-identification, failed work items: the job's `status_reason` says what).
A job the gateway marks stalled (no word from its stage service for `COHORTFLOW_STALL_AFTER_S`) ends
the wait with that reason and exit 1 instead of waiting on; nothing is cancelled, and the same
command run again follows the job once its service is back (a job still marked stalled then gets
`STALL_GRACE_S` to be taken up again).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.topics import STAGE_ORDER, Stage

TERMINAL = {"completed", "failed", "cancelled"}
STALLED = "stalled: "  # the status_reason prefix the gateway gives a job nobody works on
STALL_GRACE_S = 60.0
EXIT_FAILED = 1  # a job failed or was cancelled
EXIT_LEFT_BEHIND = 3  # every job completed, but not everything came through (see status_reason)
AUDIT_PASSWORD_ENV = "COHORTFLOW_AUDIT_PASSWORD"


class RunError(RuntimeError):
    """The run cannot go on; the message says what to do."""


@dataclass
class RunOptions:
    source: Path
    name: str
    stages: list[Stage] | None = None
    anonymize: bool = False
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    out: Path | None = None
    as_json: bool = False
    poll_s: float = 0.5
    timeout_s: float = 24 * 3600


def load_config(path: Path | None) -> dict[str, dict[str, Any]]:
    """Per-stage configs from a JSON or YAML file keyed anonymization|extraction|sorting|export."""
    if path is None:
        return {}
    try:
        text = path.read_text()
    except OSError as exc:
        raise RunError(f"cannot read config file {path}: {exc}") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise RunError(f"config file {path} is not valid JSON/YAML: {exc}") from exc
    data = data or {}
    if not isinstance(data, dict):
        raise RunError(f"config file {path} must hold an object keyed by stage")
    unknown = set(data) - {s.value for s in Stage}
    if unknown:
        raise RunError(
            f"config file {path}: unknown stage(s) {sorted(unknown)}; use {[s.value for s in Stage]}"
        )
    return {k: dict(v or {}) for k, v in data.items()}


def parse_stages(text: str | None) -> list[Stage] | None:
    if not text:
        return None
    try:
        wanted = {Stage(s.strip()) for s in text.split(",") if s.strip()}
    except ValueError as exc:
        raise RunError(f"--stages: {exc}; choose from {[s.value for s in Stage]}") from exc
    return [s for s in STAGE_ORDER if s in wanted]


class GatewayClient:
    def __init__(self, base_url: str, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=60.0)

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise RunError(
                f"{response.request.method} {response.request.url.path}: {response.status_code} {detail}"
            )
        return response.json() if response.content else None

    def find_cohort(self, name: str) -> dict[str, Any] | None:
        for cohort in self._check(self.http.get("/api/cohorts")):
            if cohort["name"] == name:
                return dict(cohort)
        return None

    def create_cohort(self, name: str, source: Path, anonymize: bool) -> dict[str, Any]:
        body = {
            "name": name,
            "source_path": str(source),
            "description": f"created by cohortflow run from {source}",
            "owner": os.environ.get("USER", "cohortflow"),
            "tags": ["cli"],
            "anonymization_enabled": anonymize,
        }
        return dict(self._check(self.http.post("/api/cohorts", json=body)))

    def cohort(self, cohort_id: str) -> dict[str, Any]:
        return dict(self._check(self.http.get(f"/api/cohorts/{cohort_id}")))

    def run_pipeline(self, cohort_id: str, configs: dict[str, Any]) -> list[dict[str, Any]]:
        result = self._check(self.http.post(f"/api/cohorts/{cohort_id}/pipeline", json=configs))
        return list(result["jobs"] if isinstance(result, dict) else result)

    def run_stage(self, cohort_id: str, stage: Stage, config: dict[str, Any]) -> dict[str, Any]:
        return dict(
            self._check(
                self.http.post(
                    f"/api/cohorts/{cohort_id}/stages/{stage.value}/run", json={"config": config}
                )
            )
        )

    def run_in_progress(self, cohort_id: str) -> list[dict[str, Any]]:
        """The jobs of the cohort's newest run when any of them is not finished, else []."""
        jobs = self._check(self.http.get(f"/api/cohorts/{cohort_id}/jobs", params={"limit": 50}))
        if not jobs:
            return []
        newest = [j for j in jobs if j["run_id"] == jobs[0]["run_id"]]
        return newest if any(j["status"] not in TERMINAL for j in newest) else []

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._check(self.http.get(f"/api/jobs/{job_id}")))

    def export_files(self, cohort_id: str, job_id: str) -> list[dict[str, Any]]:
        result = self._check(self.http.get(f"/api/cohorts/{cohort_id}/exports/{job_id}"))
        return list(result["files"] if isinstance(result, dict) else result)

    def download(self, cohort_id: str, job_id: str, path: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        url = f"/api/cohorts/{cohort_id}/exports/{job_id}/files/{path}"
        with self.http.stream("GET", url) as response:
            if response.status_code >= 400:
                raise RunError(f"download {path}: {response.status_code}")
            with dest.open("wb") as fh:
                for chunk in response.iter_bytes():
                    fh.write(chunk)


def _stage_configs(options: RunOptions) -> dict[str, dict[str, Any]]:
    configs = {k: dict(v) for k, v in options.config.items()}
    if options.anonymize:
        anon = configs.setdefault(Stage.anonymization.value, {})
        audit = anon.setdefault("audit_export", {})
        if not audit.get("password"):
            password = os.environ.get(AUDIT_PASSWORD_ENV)
            if not password:
                raise RunError(
                    f"--anonymize needs an audit password: set {AUDIT_PASSWORD_ENV} or"
                    " anonymization.audit_export.password in --config (it is never stored in clear)"
                )
            audit["password"] = password
    return configs


def _watch(
    client: GatewayClient, jobs: list[dict[str, Any]], console: Console, options: RunOptions
) -> list[dict[str, Any]]:
    """Poll the jobs until each is terminal, one progress bar per stage."""
    deadline = time.monotonic() + options.timeout_s
    states = {j["id"]: j for j in jobs}
    already = {j["id"] for j in jobs if _stalled(j)}
    grace_until = time.monotonic() + STALL_GRACE_S
    with Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]:<10}"),
        TimeElapsedColumn(),
        console=console,
        disable=options.as_json,
        transient=False,
    ) as progress:
        bars = {
            j["id"]: progress.add_task(j["stage"], total=None, status=j["status"]) for j in jobs
        }
        while True:
            for job_id in list(states):
                job = client.job(job_id)
                states[job_id] = job
                total = job.get("items_total") or None
                done = (job.get("items_done") or 0) + (job.get("items_failed") or 0)
                progress.update(bars[job_id], total=total, completed=done, status=job["status"])
            if all(j["status"] in TERMINAL for j in states.values()):
                break
            # a job already stalled when the watch began (a re-run, after fixing the service) gets
            # a grace period to be taken up again; a stall seen arise during the watch ends it
            if time.monotonic() > grace_until:
                already.clear()
            already &= {j["id"] for j in states.values() if _stalled(j)}
            for job in states.values():
                if job["status"] not in TERMINAL and _stalled(job) and job["id"] not in already:
                    raise RunError(
                        f"{job['stage']} job {job['id']} {job['status_reason']}. Nothing was"
                        " cancelled: run the same command again to follow it once the service is"
                        " back (`cohortflow stack status` shows the services and their logs)"
                    )
            if time.monotonic() > deadline:
                raise RunError("timed out waiting for the jobs; they go on in the background")
            time.sleep(options.poll_s)
    return [states[j["id"]] for j in jobs]


def _stalled(job: dict[str, Any]) -> bool:
    return str(job.get("status_reason") or "").startswith(STALLED)


def _summary_table(cohort: dict[str, Any], jobs: list[dict[str, Any]]) -> Table:
    table = Table(title=f"cohort {cohort['name']}: {cohort.get('status')}")
    for col in ("stage", "status", "items", "failed", "summary"):
        table.add_column(col)
    for job in jobs:
        summary = job.get("summary") or {}
        brief = ", ".join(
            f"{k}={v}" for k, v in summary.items() if isinstance(v, int | float | str)
        )
        table.add_row(
            job["stage"],
            job["status"],
            f"{job.get('items_done', 0)}/{job.get('items_total', 0)}",
            str(job.get("items_failed", 0)),
            brief[:120],
        )
    return table


def run(
    options: RunOptions, gateway_url: str, token: str | None, console: Console
) -> tuple[int, dict[str, Any]]:
    """Run the job; returns the exit code and the `--json` document."""
    source = options.source.expanduser().resolve()
    if not source.is_dir():
        raise RunError(f"{source} is not a folder")
    client = GatewayClient(gateway_url, token)
    configs = _stage_configs(options)
    cohort = client.find_cohort(options.name)
    verb = "reusing"
    if cohort is None:
        cohort = client.create_cohort(options.name, source, options.anonymize)
        verb = "created"
    elif cohort["anonymization_enabled"] != options.anonymize:
        # never run an identified pipeline when --anonymize was asked for, nor the reverse: a
        # cohort's anonymization does not change once it has run (docs/adr-0017-sources.md)
        raise RunError(
            f"cohort {options.name!r} exists with anonymization "
            f"{'enabled' if cohort['anonymization_enabled'] else 'disabled'}; run"
            f" {'with' if cohort['anonymization_enabled'] else 'without'} --anonymize, or give"
            " another --name for a new cohort"
        )
    if not options.as_json:
        console.print(f"{verb} cohort [bold]{options.name}[/] ({cohort['id']})")
    cohort_id = cohort["id"]

    attached = client.run_in_progress(cohort_id) if verb == "reusing" else []
    if attached:  # the same command again while its run goes on: follow it, start nothing
        if not options.as_json:
            console.print(
                f"a run of this cohort is in progress ({', '.join(j['stage'] for j in attached)});"
                " following it"
            )
        finished = _watch(client, attached, console, options)
    elif options.stages is None:
        jobs = client.run_pipeline(cohort_id, configs)
        finished = _watch(client, jobs, console, options)
    else:
        finished = []
        for stage in options.stages:
            job = client.run_stage(cohort_id, stage, configs.get(stage.value, {}))
            done = _watch(client, [job], console, options)
            finished.extend(done)
            if done[0]["status"] != "completed":
                break

    if options.out is not None:
        exports = [
            j for j in finished if j["stage"] == Stage.export.value and j["status"] == "completed"
        ]
        for job in exports:
            files = client.export_files(cohort_id, job["id"])
            for f in files:
                client.download(cohort_id, job["id"], f["path"], options.out / f["path"])
            if not options.as_json:
                console.print(f"wrote {len(files)} files to {options.out}")

    cohort = client.cohort(cohort_id)
    failed = any(j["status"] != "completed" for j in finished)
    behind = [j for j in finished if j.get("left_work_behind")]
    doc = {
        "cohort_id": cohort_id,
        "gateway_url": gateway_url,
        "cohort": cohort,
        "jobs": [
            {
                k: j.get(k)
                for k in (
                    "id",
                    "stage",
                    "status",
                    "progress",
                    "items_total",
                    "items_done",
                    "items_failed",
                    "started_at",
                    "finished_at",
                    "errors",
                    "summary",
                    "status_reason",
                    "left_work_behind",
                )
            }
            for j in finished
        ],
    }
    if not options.as_json:
        console.print(_summary_table(cohort, finished))
        for job in finished:
            for err in (job.get("errors") or [])[:10]:
                console.print(
                    f"  [yellow]{job['stage']}[/] {err.get('item')}: {err.get('message')}"
                )
        for job in behind:
            _print_left_behind(console, job)
    if failed:
        return EXIT_FAILED, doc
    return (EXIT_LEFT_BEHIND if behind else 0), doc


def _print_left_behind(console: Console, job: dict[str, Any]) -> None:
    """A red line for a job that completed without doing everything, and its reasons grouped."""
    console.print(f"[bold red]{job['stage']}: {job.get('status_reason')}[/]", highlight=False)
    for group in (job.get("summary") or {}).get("refused") or []:
        labels = ", ".join(group.get("study_labels") or [])
        console.print(
            f"  [red]{group.get('files')} files in {group.get('studies')} studies[/]:"
            f" {group.get('reason')}" + (f" (studies {labels})" if labels else ""),
            highlight=False,
        )
