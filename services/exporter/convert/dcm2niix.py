"""Running dcm2niix: finding the binary, its version, and one isolated, time-limited conversion."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


class ConverterError(RuntimeError):
    """A converter could not turn the stack into NIfTI; the message says why."""


@lru_cache(maxsize=1)
def dcm2niix_binary() -> Path:
    """The dcm2niix executable: the `dcm2niix` PyPI wheel's binary, else one next to Python or on PATH."""
    try:
        import dcm2niix  # the PyPI wheel ships the binary inside the package

        candidate = Path(dcm2niix.bin_path)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    except ImportError:
        pass
    beside = Path(sys.executable).parent / "dcm2niix"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("dcm2niix")
    if found:
        return Path(found)
    raise ConverterError("dcm2niix not found: install the `dcm2niix` package into this environment")


@lru_cache(maxsize=1)
def dcm2niix_version() -> str:
    """The version dcm2niix reports, e.g. `v1.0.20260724`."""
    done = subprocess.run(
        [str(dcm2niix_binary()), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    match = re.search(r"v\d+\.\d+\.\d+\w*", done.stdout + done.stderr)
    if not match:
        raise ConverterError(f"cannot read the dcm2niix version from: {done.stdout[-200:]!r}")
    return match.group(0)


@dataclass(frozen=True)
class ProcessOutcome:
    returncode: int
    output: str  # stdout and stderr, merged, tail-trimmed
    timed_out: bool


def run_isolated(
    args: list[str], *, timeout_s: float, cwd: Path, env: dict[str, str]
) -> ProcessOutcome:
    """Run a converter in its own process group; on timeout the whole group is killed."""
    process = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
        errors="replace",
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
        return ProcessOutcome(process.returncode, output[-20000:], False)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return ProcessOutcome(-9, (output or "")[-20000:], True)


def run_dcm2niix(
    input_dir: Path, output_dir: Path, base: str, *, compress: bool, timeout_s: float
) -> ProcessOutcome:
    """Convert every DICOM in `input_dir` (not its sub-folders) into `output_dir` as `<base>*`.

    Options: BIDS sidecar on and anonymized (`-b y -ba y`), no search below the folder (`-d 0`),
    overwrite rather than rename on conflicts (`-w 1`), gzip (`-z y`, zlib when pigz is absent) or
    not (`-z n`). HOME points at the scratch folder so that no user defaults file
    (`~/.dcm2nii.ini`) changes the result.
    """
    args = [
        str(dcm2niix_binary()),
        "-b", "y",
        "-ba", "y",
        "-d", "0",
        "-w", "1",
        "-z", "y" if compress else "n",
        "-f", base,
        "-o", str(output_dir),
        str(input_dir),
    ]  # fmt: skip
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(output_dir.parent), "LC_ALL": "C"}
    return run_isolated(args, timeout_s=timeout_s, cwd=output_dir.parent, env=env)
