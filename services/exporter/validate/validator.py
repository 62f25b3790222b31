"""Running the BIDS validator (`bids-validator-deno`, offline) on an exported dataset.

The validator is the JavaScript BIDS validator shipped with its own Deno runtime as a PyPI wheel; it
needs no network. `--format json` gives `{"issues": {"issues": [...], "codeMessages": {...}},
"summary": {...}}`; each issue has a `code`, a `severity` (`error`, `warning`, `ignore`) and a
`location`. The report keeps counts, the codes with their count and a bounded list of issues.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

_MAX_ISSUES = 200


class ValidatorError(RuntimeError):
    """The validator could not run or did not answer in time."""


@dataclass(frozen=True)
class ValidatorIssue:
    code: str
    severity: str
    location: str
    sub_code: str | None = None
    message: str = ""


@dataclass
class ValidatorReport:
    """The validator's verdict on a dataset."""

    valid: bool  # no errors
    errors: int
    warnings: int
    error_codes: dict[str, int] = field(default_factory=dict)
    warning_codes: dict[str, int] = field(default_factory=dict)
    issues: list[ValidatorIssue] = field(default_factory=list)  # errors first, at most 200
    validator_version: str = ""
    schema_version: str = ""
    bids_version: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict, for storing on the export job."""
        return {
            "valid": self.valid,
            "errors": self.errors,
            "warnings": self.warnings,
            "error_codes": self.error_codes,
            "warning_codes": self.warning_codes,
            "issues": [issue.__dict__ for issue in self.issues],
            "validator_version": self.validator_version,
            "schema_version": self.schema_version,
            "summary": self.summary,
            "duration_s": round(self.duration_s, 3),
        }


def validator_command() -> list[str]:
    """The command that runs the validator in this environment."""
    beside = Path(sys.executable).parent / "bids-validator-deno"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("bids-validator-deno")
    if found:
        return [found]
    raise ValidatorError("bids-validator-deno not found: install the `bids-validator-deno` package")


def validator_version() -> str:
    try:
        return metadata.version("bids-validator-deno")
    except metadata.PackageNotFoundError:
        return "unknown"


def parse_report(output: dict[str, Any], duration_s: float = 0.0) -> ValidatorReport:
    """A `ValidatorReport` from the validator's JSON output."""
    raw_issues = output.get("issues", {}).get("issues", [])
    messages = output.get("issues", {}).get("codeMessages", {})
    issues = [
        ValidatorIssue(
            code=str(i.get("code", "")),
            severity=str(i.get("severity", "")),
            location=str(i.get("location", "")),
            sub_code=i.get("subCode"),
            message=str(i.get("issueMessage") or messages.get(i.get("code"), "")).strip()[:500],
        )
        for i in raw_issues
    ]
    errors = [i for i in issues if i.severity == "error"]
    warnings = [i for i in issues if i.severity == "warning"]
    summary = output.get("summary", {})
    return ValidatorReport(
        valid=not errors,
        errors=len(errors),
        warnings=len(warnings),
        error_codes=dict(sorted(Counter(i.code for i in errors).items())),
        warning_codes=dict(sorted(Counter(i.code for i in warnings).items())),
        issues=(errors + warnings)[:_MAX_ISSUES],
        validator_version=validator_version(),
        schema_version=str(summary.get("schemaVersion", "")),
        summary=summary,
        duration_s=duration_s,
    )


def run_bids_validator(
    dataset_dir: Path,
    *,
    timeout_s: float = 600.0,
    recursive: bool = True,
    ignore_nifti_headers: bool = False,
) -> ValidatorReport:
    """Validate `dataset_dir`; raises `ValidatorError` if the validator fails to run or times out.

    All TSV rows are checked (`--max-rows -1`). With `recursive` the derivative datasets under
    `derivatives/` (scanner maps, grouped SyMRI) are validated too (`-r`).
    """
    import time

    if not (dataset_dir / "dataset_description.json").is_file():
        raise ValidatorError(f"{dataset_dir} has no dataset_description.json")
    args = [
        *validator_command(),
        "--format",
        "json",
        "--max-rows",
        "-1",
        "--no-color",
        str(dataset_dir),
    ]
    if ignore_nifti_headers:
        args.insert(-1, "--ignoreNiftiHeaders")
    if recursive:
        args.insert(-1, "--recursive")
    env = dict(os.environ)
    env.setdefault("DENO_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "cohortflow-deno"))
    env["NO_COLOR"] = "1"
    started = time.perf_counter()
    process = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise ValidatorError(
            f"the BIDS validator did not finish within {timeout_s:.0f} s"
        ) from error
    duration = time.perf_counter() - started
    start = stdout.find("{")
    try:
        output = json.loads(stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        output = None
    if not isinstance(output, dict):
        raise ValidatorError(
            f"the BIDS validator gave no JSON report (exit {process.returncode}): {stderr.strip()[-1000:]}"
        )
    return parse_report(output, duration)
