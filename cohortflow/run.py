"""`cohortflow run SOURCE`: the main job, through the gateway's public API, with progress bars.

`prepare` checks everything that can be checked before any server is asked (the source folder, the
stage configs against the models the gateway validates with, the audit password, whether the folder
holds DICOM at all), so a typo is reported in a second, not after the stack has started. `run` then
finds or creates the cohort (a new cohort and its pipeline in one request: a config the gateway
refuses leaves no cohort behind), runs what is not done yet with one progress bar per stage, prints
a summary, writes the export to `--out`, and returns one of the documented exit codes (`EXIT_*`).
The same command again is a no-op that re-delivers the result (or follows a run still going on);
`--rerun STAGE` redoes a stage and the ones after it.
A job the gateway marks stalled (no word from its stage service for `COHORTFLOW_STALL_AFTER_S`) ends
the wait with that reason and exit 1 instead of waiting on; nothing is cancelled, and the same
command run again follows the job once its service is back (a job still marked stalled then gets
`STALL_GRACE_S` to be taken up again).
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.extractor.catalog.sniff import SNIFF_BYTES, sniff
from shared.settings import Settings

# The stage config models the gateway validates with: this is the one place the CLI imports them
# from (repoint here when they move).
from shared.stage_config import StageConfigError, validate_stage_config
from shared.storage import write_hashed
from shared.topics import STAGE_ORDER, Stage

TERMINAL = {"completed", "failed", "cancelled"}
STALLED = "stalled: "  # the status_reason prefix the gateway gives a job nobody works on
STALL_GRACE_S = 60.0
# how long the gateway may hold a request for a run's jobs until one changes (it holds at most 10 s)
HOLD_S = 5.0
# exit codes (README "Exit codes", `cohortflow run --help`)
EXIT_OK = 0  # everything asked for was done
EXIT_FAILED = 1  # a job failed or was cancelled, nothing usable came out, or a server refused
EXIT_REFUSED = 2  # nothing was started: bad arguments, source, config or password, or no DICOM
EXIT_LEFT_BEHIND = 3  # every job completed, but not everything came through (see status_reason)
EXIT_CODES_HELP = (
    "Exit codes: 0 everything asked for was done; 1 a job failed or was cancelled, nothing "
    "usable came out, or a server refused; 2 nothing was started (bad arguments, source, config "
    "or password, or no DICOM in the source); 3 every job completed but work was left behind "
    "(files de-identification refused, stacks not exported, failed work items)."
)
AUDIT_PASSWORD_ENV = "COHORTFLOW_AUDIT_PASSWORD"
# the gateway `run` talks to instead of the local stack's (with COHORTFLOW_API_TOKEN)
GATEWAY_URL_ENV = "COHORTFLOW_GATEWAY_URL"
STAGE_NAMES = ", ".join(s.value for s in STAGE_ORDER)


class RunError(RuntimeError):
    """The run cannot go on; the message says what to do, `code` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def refused(message: str) -> RunError:
    """An error found before anything was started (exit code 2)."""
    return RunError(message, EXIT_REFUSED)


@dataclass
class RunOptions:
    source: Path
    name: str
    stages: list[Stage] | None = None
    anonymize: bool = False
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    out: Path | None = None
    as_json: bool = False
    rerun: Stage | None = None
    poll_s: float = 0.5
    timeout_s: float = 24 * 3600


# ---- before anything starts ------------------------------------------------------------------


def load_config(path: Path | None) -> dict[str, dict[str, Any]]:
    """Per-stage configs from a JSON or YAML file keyed anonymization|extraction|sorting|export."""
    if path is None:
        return {}
    try:
        text = path.expanduser().read_text()
    except OSError as exc:
        raise refused(f"cannot read the config file {path}: {exc.strerror or exc}") from exc
    import yaml  # only for a config file: not on every run's start

    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise refused(f"the config file {path} is not valid JSON/YAML: {exc}") from exc
    data = data or {}
    if not isinstance(data, dict):
        raise refused(f"the config file {path} must hold an object keyed by stage ({STAGE_NAMES})")
    unknown = sorted(str(k) for k in set(data) - {s.value for s in Stage})
    if unknown:
        raise refused(
            f"the config file {path} names unknown stage(s) {', '.join(unknown)}; "
            f"the stages are {STAGE_NAMES}"
        )
    for key, value in data.items():
        if value is not None and not isinstance(value, dict):
            raise refused(f"the config file {path}: {key} must be an object of options")
    return {k: dict(v or {}) for k, v in data.items()}


def parse_stages(text: str | None) -> list[Stage] | None:
    if not text:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in {s.value for s in Stage}]
    if unknown:
        raise refused(f"--stages: unknown stage(s) {', '.join(unknown)}; choose from {STAGE_NAMES}")
    return [s for s in STAGE_ORDER if s.value in names] or None


def parse_stage(text: str | None, option: str) -> Stage | None:
    if not text:
        return None
    try:
        return Stage(text.strip())
    except ValueError as exc:
        raise refused(f"{option}: unknown stage {text!r}; choose from {STAGE_NAMES}") from exc


def config_error_lines(errors: Iterable[Mapping[str, Any]], stage: str | None = None) -> str:
    """`stage.key: message` lines from `{loc, msg}` errors (the gateway's 422 or the models')."""
    lines = []
    for error in errors:
        loc = [str(p) for p in error.get("loc") or []]
        if loc[:1] == ["body"]:
            loc = loc[1:]
        if loc[:1] == ["config"]:
            loc = ([stage] if stage else []) + loc[1:]
        lines.append(f"  {'.'.join(loc) or '(body)'}: {error.get('msg')}")
    return "\n".join(lines)


@dataclass
class DicomScan:
    """What a source folder holds: the first DICOM file met, else every file counted by kind."""

    first_dicom: Path | None
    kinds: Counter[str] = field(default_factory=Counter)
    unreadable: int = 0
    complete: bool = True  # False: stopped at the limit before a DICOM file was met

    def describe(self) -> str:
        if not self.kinds and not self.unreadable:
            return "it holds no files at all"
        found = ", ".join(f"{n} {kind}" for kind, n in self.kinds.most_common(8))
        more = len(self.kinds) - 8
        found += f" and {more} more kinds" if more > 0 else ""
        if self.unreadable:
            found += f"{', ' if found else ''}{self.unreadable} that could not be read"
        return f"it holds {found}"


def _kind(path: Path, head: bytes) -> str:
    """A file's kind for the user's eyes only (what was found instead of DICOM)."""
    if not head:
        return "empty files"
    if head.startswith(b"PK\x03\x04"):
        return "zip archives (unpack them first)"
    if head.startswith(b"\x1f\x8b"):
        return ".gz files" if not path.name.endswith(".nii.gz") else ".nii.gz files"
    suffix = path.suffix.lower()
    return f"{suffix} files" if suffix else "files without an extension"


# files looked at before the run goes on without a verdict (the extraction then decides; a run
# that catalogues nothing still ends with an error)
SCAN_LIMIT = 20_000


def scan_for_dicom(source: Path, limit: int = SCAN_LIMIT) -> DicomScan:
    """Walk `source` (following links, each real folder once) until a DICOM file is met, judging
    content like the extractor does (`sniff`), never names; at most `limit` files."""
    scan = DicomScan(first_dicom=None)
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                if not path.is_file():
                    continue
                with path.open("rb") as fh:
                    head = fh.read(SNIFF_BYTES)
            except OSError:
                scan.unreadable += 1
                continue
            if sniff(head).is_dicom:
                scan.first_dicom = path
                return scan
            scan.kinds[_kind(path, head)] += 1
            if sum(scan.kinds.values()) + scan.unreadable >= limit:
                scan.complete = False
                return scan
    return scan


@dataclass
class Prepared:
    """What `prepare` checked: the resolved source and the configs to send (password included)."""

    source: Path
    configs: dict[str, dict[str, Any]]


def check_source(source: Path, stack_home: Path | None) -> Path:
    """The source as an absolute folder this user can read, outside the stack's own state."""
    resolved = source.expanduser().resolve()
    if not resolved.exists():
        raise refused(f"{source} does not exist; give the folder that holds your DICOM files")
    if not resolved.is_dir():
        raise refused(f"{source} is not a folder; give the folder that holds your DICOM files")
    if not os.access(resolved, os.R_OK | os.X_OK):
        raise refused(
            f"{resolved} cannot be read by this user; fix its permissions or run as its owner"
        )
    if stack_home is not None:
        home = stack_home.expanduser().resolve()
        if resolved == home or home in resolved.parents or resolved in home.parents:
            raise refused(
                f"{resolved} overlaps the stack's own state folder {home} (its database, objects"
                " and logs), which is never a source; give a folder outside it"
            )
    return resolved


def stage_configs(options: RunOptions, stages: Sequence[Stage]) -> dict[str, dict[str, Any]]:
    """The configs to send, the audit password put in for anonymization; each one checked
    against the gateway's own models so a typo is reported before anything starts."""
    configs = {k: dict(v) for k, v in options.config.items()}
    if Stage.anonymization.value in configs and not options.anonymize:
        raise refused(
            "the config has anonymization options but --anonymize was not given; add --anonymize"
            " (a cohort's anonymization is decided when it is created) or drop them"
        )
    if options.anonymize and Stage.anonymization in stages:
        anon = configs.setdefault(Stage.anonymization.value, {})
        audit = anon.setdefault("audit_export", {})
        if isinstance(audit, dict) and not audit.get("password"):
            password = os.environ.get(AUDIT_PASSWORD_ENV)
            if not password:
                raise refused(
                    f"--anonymize needs a password for the encrypted audit export (the only key"
                    f" from pseudonyms back to patients): set {AUDIT_PASSWORD_ENV}, or"
                    " anonymization.audit_export.password in --config; keep it, `cohortflow"
                    " audit decrypt` asks for it"
                )
            audit["password"] = password
    # locations are checked by the gateway against its data roots; here only their form
    settings = Settings(data_roots=[Path("/")])
    lines = []
    for stage in stages:
        try:
            validate_stage_config(stage, configs.get(stage.value), settings)
        except StageConfigError as exc:
            lines.append(config_error_lines(exc.errors, stage.value))
    if lines:
        raise refused("the stage config is not valid:\n" + "\n".join(lines))
    return configs


def prepare(options: RunOptions, stack_home: Path | None = None) -> Prepared:
    """Everything checkable before a server is asked; raises `RunError` (exit code 2)."""
    source = check_source(options.source, stack_home)
    applicable = [s for s in STAGE_ORDER if options.anonymize or s is not Stage.anonymization]
    wanted = options.stages or applicable
    if Stage.anonymization in wanted and not options.anonymize:
        raise refused("--stages names anonymization: add --anonymize to de-identify")
    if options.rerun is not None and options.rerun not in wanted:
        raise refused(
            f"--rerun {options.rerun.value}: that stage is not among the stages to run"
            f" ({', '.join(s.value for s in wanted)})"
        )
    if options.out is not None:
        if Stage.export not in wanted:
            raise refused(
                f"--out writes the export, but the stages to run ({', '.join(s.value for s in wanted)})"
                " do not include export; add it to --stages or drop --out"
            )
        if options.out.exists() and not options.out.is_dir():
            raise refused(f"--out {options.out} exists and is not a folder")
    configs = stage_configs(options, wanted)
    if wanted[0] in (Stage.anonymization, Stage.extraction):
        scan = scan_for_dicom(source)
        if scan.first_dicom is None and scan.complete:
            raise refused(
                f"no DICOM found in {source}: {scan.describe()}. Files are recognised by their"
                " content (a DICM preamble or a DICOM data set), not their names; point at the"
                " folder that holds the scanner's DICOM files"
            )
    return Prepared(source=source, configs=configs)


# ---- the gateway ----------------------------------------------------------------------------


class GatewayError(RunError):
    """The gateway refused a request; the message holds its reason, as readable lines."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _about_config(detail: list[Any], stage: str | None) -> bool:
    """True when a 422's errors are about stage configs (`["body", <stage>, ...]` or a stage
    run's `["config", ...]`), not about other input such as a cohort's name."""
    if stage is not None:
        return True
    stages = {s.value for s in Stage}
    locs = [list(e.get("loc") or []) if isinstance(e, dict) else [] for e in detail]
    return all(len(loc) > 1 and str(loc[1]) in stages for loc in locs)


# files of the export fetched at once to --out (the gateway streams each from object storage)
_DOWNLOADERS = 8


class GatewayClient:
    def __init__(self, base_url: str, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        # TLS only for an https gateway: loading the CA bundle costs ~0.1 s of every run's start,
        # and a plain-HTTP one (the local stack's) never uses it (redirects are not followed)
        self.http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=60.0,
            verify=self.base_url.startswith("https://"),
        )

    def _check(self, response: httpx.Response, stage: str | None = None) -> Any:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text.strip()
            what = f"the gateway refused {response.request.method} {response.request.url.path}"
            if isinstance(detail, list):
                header = "the stage config" if _about_config(detail, stage) else "the input"
                text = f"{header} is not valid ({what}):\n" + config_error_lines(detail, stage)
            else:
                text = f"{detail} ({what}: {response.status_code})"
            if response.status_code == 401:
                text += "; set COHORTFLOW_API_TOKEN to the gateway's token"
            raise GatewayError(text, response.status_code)
        return response.json() if response.content else None

    def find_cohort(self, name: str) -> dict[str, Any] | None:
        for cohort in self._check(self.http.get("/api/cohorts")):
            if cohort["name"].casefold() == name.casefold():
                return dict(cohort)
        return None

    def create_cohort(
        self,
        name: str,
        source: Path,
        anonymize: bool,
        pipeline: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A new cohort; with `pipeline` (configs by stage) its pipeline starts in the same
        transaction, so a config the gateway refuses creates nothing."""
        body: dict[str, Any] = {
            "name": name,
            "source_path": str(source),
            "description": f"created by cohortflow run from {source}",
            "owner": os.environ.get("USER", "cohortflow"),
            "tags": ["cli"],
            "anonymization_enabled": anonymize,
        }
        if pipeline is not None:
            body["pipeline"] = pipeline
        return dict(self._check(self.http.post("/api/cohorts", json=body)))

    def cohort(self, cohort_id: str) -> dict[str, Any]:
        return dict(self._check(self.http.get(f"/api/cohorts/{cohort_id}")))

    def run_pipeline(self, cohort_id: str, configs: dict[str, Any]) -> list[dict[str, Any]]:
        result = self._check(self.http.post(f"/api/cohorts/{cohort_id}/pipeline", json=configs))
        return list(result["jobs"] if isinstance(result, dict) else result)

    def run_stage(self, cohort_id: str, stage: Stage, config: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(
            f"/api/cohorts/{cohort_id}/stages/{stage.value}/run", json={"config": config}
        )
        return dict(self._check(response, stage.value))

    def newest_run(self, cohort_id: str) -> list[dict[str, Any]]:
        """The jobs of the cohort's newest run, in stage order."""
        jobs = self._check(self.http.get(f"/api/cohorts/{cohort_id}/jobs", params={"limit": 50}))
        if not jobs:
            return []
        newest = [j for j in jobs if j["run_id"] == jobs[0]["run_id"]]
        return sorted(newest, key=lambda j: STAGE_ORDER.index(Stage(j["stage"])))

    def run_in_progress(self, cohort_id: str) -> list[dict[str, Any]]:
        """The jobs of the cohort's newest run when any of them is not finished, else []."""
        newest = self.newest_run(cohort_id)
        return newest if any(j["status"] not in TERMINAL for j in newest) else []

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._check(self.http.get(f"/api/jobs/{job_id}")))

    def run_jobs(
        self, run_id: str, etag: str | None = None, wait_s: float = 0.0
    ) -> tuple[list[dict[str, Any]] | None, str | None]:
        """(the run's jobs, their ETag); with `etag` and `wait_s` the gateway holds the answer
        until a job changed or `wait_s` passed, then answers (None, etag) for "no change". The
        ETag is None from a gateway that cannot hold (the caller then polls)."""
        headers = {"If-None-Match": etag, "Prefer": f"wait={wait_s:g}"} if etag else {}
        response = self.http.get("/api/jobs", params={"run_id": run_id}, headers=headers)
        if response.status_code == 304:
            return None, etag
        jobs = self._check(response)
        return list(jobs), response.headers.get("etag")

    def export_files(self, cohort_id: str, job_id: str) -> list[dict[str, Any]]:
        result = self._check(self.http.get(f"/api/cohorts/{cohort_id}/exports/{job_id}"))
        return list(result["files"] if isinstance(result, dict) else result)

    def download(self, cohort_id: str, job_id: str, path: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        url = f"/api/cohorts/{cohort_id}/exports/{job_id}/files/{path}"
        with self.http.stream("GET", url) as response:
            if response.status_code >= 400:
                raise RunError(
                    f"download of {path} from the gateway failed: {response.status_code}"
                )
            with dest.open("wb") as fh:
                for chunk in response.iter_bytes():
                    fh.write(chunk)

    def download_all(self, cohort_id: str, job_id: str, paths: Sequence[str], out: Path) -> None:
        """Every listed file of the export into `out`, a few at once; the first failure raises."""
        with ThreadPoolExecutor(max_workers=_DOWNLOADERS) as pool:
            for _ in pool.map(lambda p: self.download(cohort_id, job_id, p, out / p), paths):
                pass

    def download_export(
        self, cohort_id: str, job_id: str, files: Sequence[Mapping[str, Any]], out: Path
    ) -> None:
        """The listed files of the export into `out`, in one request for the whole tree (the
        gateway's tar stream), each checked against its listed SHA-256; file by file from a
        gateway that has no archive route."""
        listed = {str(f["path"]): f for f in files}
        url = f"/api/cohorts/{cohort_id}/exports/{job_id}/archive"
        try:
            with self.http.stream("GET", url) as response:
                if response.status_code < 400:
                    _extract(response.iter_bytes(1 << 20), listed, out)
                    return
                response.read()
                if not _no_such_route(response):
                    self._check(response)
        except (httpx.HTTPError, tarfile.TarError) as exc:
            raise RunError(f"download of the export from the gateway failed: {exc}") from exc
        self.download_all(cohort_id, job_id, list(listed), out)


def _no_such_route(response: httpx.Response) -> bool:
    """True for the answer of a gateway without the route (FastAPI's own 404/405), not a refusal
    about the export itself."""
    if response.status_code not in (404, 405):
        return False
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return False
    return detail in ("Not Found", "Method Not Allowed")


class _Chunks(io.RawIOBase):
    """A readable stream over an iterator of byte chunks (a response body, for `tarfile`)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._left = chunk
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


def _extract(chunks: Iterator[bytes], listed: Mapping[str, Mapping[str, Any]], out: Path) -> None:
    """Write the archive's files under `out`: only regular files the listing names, each
    checked against its SHA-256 and renamed into place when complete; all of them, or it raises."""
    written: set[str] = set()
    stream = io.BufferedReader(_Chunks(chunks), 1 << 20)
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            row = listed.get(member.name)
            source = archive.extractfile(member) if member.isfile() else None
            if row is None or source is None:
                raise RunError(
                    f"the export's archive holds {member.name!r}, which it does not list"
                )
            target = out / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            blocks = iter(functools.partial(source.read, 1 << 20), b"")
            if write_hashed(blocks, target, row.get("sha256") or None) is None:
                raise RunError(f"{member.name}: the downloaded content differs from its SHA-256")
            written.add(member.name)
    if missing := sorted(set(listed) - written):
        raise RunError(f"the export's archive lacks {len(missing)} file(s), e.g. {missing[0]}")


# ---- what to run ----------------------------------------------------------------------------


def plan_stages(
    wanted: Sequence[Stage], states: Mapping[Stage, str], rerun: Stage | None = None
) -> tuple[list[Stage], list[Stage]]:
    """(stages already done and kept, stages to run now) of `wanted`, in order.

    Without `rerun`: from the first wanted stage that is not completed on; nothing when every one
    is (the command was run before: its result is delivered again). With `rerun`: from that stage
    on, whatever its state."""
    wanted = list(wanted)
    if rerun is not None:
        start = wanted.index(rerun)
    else:
        start = next((i for i, s in enumerate(wanted) if states.get(s) != "completed"), len(wanted))
    return wanted[:start], wanted[start:]


def exit_code(jobs: Sequence[Mapping[str, Any]]) -> int:
    """The exit code of a run whose (terminal) jobs are `jobs`."""
    if not jobs or any(j["status"] != "completed" for j in jobs) or no_dicom_catalogued(jobs):
        return EXIT_FAILED
    return EXIT_LEFT_BEHIND if any(j.get("left_work_behind") for j in jobs) else EXIT_OK


def no_dicom_catalogued(jobs: Sequence[Mapping[str, Any]]) -> bool:
    """True when an extraction completed without cataloguing a single DICOM instance."""
    return any(
        j["stage"] == Stage.extraction.value
        and j["status"] == "completed"
        and (j.get("summary") or {}).get("instances") == 0
        for j in jobs
    )


# ---- watching and reporting -----------------------------------------------------------------


def _watch(
    client: GatewayClient, jobs: list[dict[str, Any]], console: Console, options: RunOptions
) -> list[dict[str, Any]]:
    """Follow the jobs until each is terminal, one progress bar per stage: the gateway holds each
    request until a job of the run changed (`GatewayClient.run_jobs`), so an end is seen at once;
    jobs of several runs, or a gateway that cannot hold, are asked every `poll_s`."""
    deadline = time.monotonic() + options.timeout_s
    states = {j["id"]: j for j in jobs}
    already = {j["id"] for j in jobs if _stalled(j)}
    grace_until = time.monotonic() + STALL_GRACE_S
    runs = {j.get("run_id") for j in jobs}
    run_id: str | None = str(runs.pop()) if len(runs) == 1 and None not in runs else None
    etag: str | None = None
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
            if run_id is not None:
                changed, etag = client.run_jobs(run_id, etag, HOLD_S)
                if etag is None:  # a gateway that cannot hold: ask job by job from now on
                    run_id = None
                for job in changed or []:
                    if job["id"] in states:
                        states[job["id"]] = job
            if run_id is None:
                for job_id in [i for i, j in states.items() if j["status"] not in TERMINAL]:
                    states[job_id] = client.job(job_id)  # a job that ended does not change
            for job_id, job in states.items():
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
                raise RunError(
                    "timed out waiting for the jobs; they go on in the background: the same"
                    " command again follows them"
                )
            if run_id is None:
                time.sleep(options.poll_s)
    return [states[j["id"]] for j in jobs]


def _stalled(job: dict[str, Any]) -> bool:
    return str(job.get("status_reason") or "").startswith(STALLED)


def summary_table(cohort: dict[str, Any], jobs: list[dict[str, Any]]) -> Table:
    """One row per job; cells wrap (never cut), so object keys and reasons are shown whole."""
    table = Table(title=f"cohort {cohort['name']}: {cohort.get('status')}")
    for col in ("stage", "status", "items", "failed"):
        table.add_column(col, no_wrap=True)
    table.add_column("summary", overflow="fold")
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
            brief,
        )
    return table


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
    for stack in (job.get("summary") or {}).get("failed_stacks") or []:
        console.print(
            f"  [red]stack {stack.get('stack_key')} not exported[/]: {stack.get('error')}",
            highlight=False,
        )


_JOB_FIELDS = (
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


# ---- the run --------------------------------------------------------------------------------


def run(
    options: RunOptions,
    prepared: Prepared,
    gateway_url: str,
    token: str | None,
    console: Console,
) -> tuple[int, dict[str, Any]]:
    """Run the job; returns the exit code and the `--json` document."""
    say = (lambda *a, **k: None) if options.as_json else console.print
    client = GatewayClient(gateway_url, token)
    source, configs = prepared.source, prepared.configs
    applicable = [s for s in STAGE_ORDER if options.anonymize or s is not Stage.anonymization]
    wanted = options.stages or applicable
    kept: list[dict[str, Any]] = []
    delivered = False
    cohort = client.find_cohort(options.name)
    if cohort is None and options.stages is None and options.rerun is None:
        # the common case: cohort and pipeline in one request (a refused config creates nothing)
        cohort = client.create_cohort(options.name, source, options.anonymize, configs)
        say(f"created cohort [bold]{cohort['name']}[/] ({cohort['id']})")
        finished = _watch(client, client.newest_run(cohort["id"]), console, options)
    else:
        if cohort is None:
            cohort = client.create_cohort(options.name, source, options.anonymize)
            say(f"created cohort [bold]{cohort['name']}[/] ({cohort['id']})")
        else:
            _check_reuse(cohort, options, source)
            say(f"reusing cohort [bold]{cohort['name']}[/] ({cohort['id']})")
        attached = client.run_in_progress(cohort["id"])
        if attached:  # the same command again while its run goes on: follow it, start nothing
            say(
                f"a run of this cohort is in progress ({', '.join(j['stage'] for j in attached)});"
                " following it"
            )
            finished = _watch(client, attached, console, options)
        else:
            kept, finished = _run_what_is_left(client, cohort, wanted, configs, console, options)
            delivered = not finished
    jobs = kept + finished
    cohort = client.cohort(cohort["id"])
    code = exit_code(jobs)
    if options.out is not None:
        exports = [
            j for j in jobs if j["stage"] == Stage.export.value and j["status"] == "completed"
        ]
        for job in exports[-1:]:
            files = client.export_files(cohort["id"], job["id"])
            client.download_export(cohort["id"], job["id"], files, options.out)
            say(f"wrote {len(files)} files to {options.out}")
    doc = {
        "cohort_id": cohort["id"],
        "gateway_url": gateway_url,
        "cohort": cohort,
        "exit_code": code,
        "delivered_again": delivered,
        "jobs": [{k: j.get(k) for k in _JOB_FIELDS} for j in jobs],
    }
    if not options.as_json:
        console.print(summary_table(cohort, jobs))
        for job in jobs:
            for err in (job.get("errors") or [])[:10]:
                console.print(
                    f"  [yellow]{job['stage']}[/] {err.get('item')}: {err.get('message')}",
                    highlight=False,
                )
        for job in jobs:
            if job.get("left_work_behind"):
                _print_left_behind(console, job)
        if no_dicom_catalogued(jobs):
            extraction = next(j for j in jobs if j["stage"] == Stage.extraction.value)
            rejected = (extraction.get("summary") or {}).get("rejected", 0)
            console.print(
                f"[bold red]no DICOM was catalogued from {cohort['source_path']}[/]"
                f" ({rejected} files rejected: links leaving the data roots, unreadable or not"
                " DICOM); point at the folder that holds the scanner's DICOM files",
                highlight=False,
            )
    return code, doc


def _run_what_is_left(
    client: GatewayClient,
    cohort: dict[str, Any],
    wanted: Sequence[Stage],
    configs: dict[str, dict[str, Any]],
    console: Console,
    options: RunOptions,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(jobs done before and kept, jobs run now) for a cohort with no run in progress: nothing
    when every wanted stage is done (its result is delivered again), else the rest in order."""
    say = (lambda *a, **k: None) if options.as_json else console.print
    states = {Stage(s["stage"]): s["state"] for s in cohort.get("stages") or []}
    jobs_of = {Stage(s["stage"]): s.get("job_id") for s in cohort.get("stages") or []}
    done, to_run = plan_stages(wanted, states, options.rerun)
    kept = [client.job(jobs_of[s]) for s in done if jobs_of.get(s)]
    names = ", ".join(s.value for s in wanted)
    if not to_run:
        say(
            f"nothing to do: {names} already completed for this cohort; here is its result again"
            f" (`--rerun STAGE` redoes a stage and the ones after it; stages: {names})"
        )
        return kept, []
    if options.stages is None and options.rerun is None:
        return kept, _watch(client, client.run_pipeline(cohort["id"], configs), console, options)
    if options.rerun is not None:
        say(f"--rerun {options.rerun.value}: running {', '.join(s.value for s in to_run)}")
    finished: list[dict[str, Any]] = []
    for stage in to_run:
        try:
            job = client.run_stage(cohort["id"], stage, configs.get(stage.value, {}))
        except GatewayError as exc:
            if exc.status != 409 or options.stages is None:
                raise
            raise RunError(
                f"{exc}; --stages runs only the stages it names: add the earlier ones, or leave"
                " --stages out to run whatever is not done yet"
            ) from exc
        ended = _watch(client, [job], console, options)
        finished.extend(ended)
        if ended[0]["status"] != "completed":
            break
    return kept, finished


def _check_reuse(cohort: dict[str, Any], options: RunOptions, source: Path) -> None:
    """A cohort found by name must be the one this command means."""
    if cohort["anonymization_enabled"] != options.anonymize:
        # never run an identified pipeline when --anonymize was asked for, nor the reverse: a
        # cohort's anonymization does not change once it has run (docs/adr-0017-sources.md)
        raise RunError(
            f"cohort {cohort['name']!r} exists with anonymization "
            f"{'enabled' if cohort['anonymization_enabled'] else 'disabled'}; run"
            f" {'with' if cohort['anonymization_enabled'] else 'without'} --anonymize, or give"
            " another --name for a new cohort",
            EXIT_REFUSED,
        )
    if cohort["source_path"] != str(source):
        raise RunError(
            f"cohort {cohort['name']!r} reads {cohort['source_path']}, not {source}; give another"
            " --name for a new cohort",
            EXIT_REFUSED,
        )
