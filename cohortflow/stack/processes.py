"""Long-running child processes of the local stack: start detached, track by pid file, stop.

Every process runs in its own session (process group), so stopping it also stops whatever it spawned
(uvicorn workers, dcm2niix conversions). A pid file is trusted only while the pid is alive, is not a
zombie, and still runs the program that was recorded for it: pids are reused by the kernel.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from shared.workers import process_running


def free_port(preferred: int | None = None) -> int:
    """A TCP port on 127.0.0.1 that nobody listens on; `preferred` when it is still free."""
    if preferred:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.3) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: int | None, program: str | None = None) -> bool:
    """True when `pid` runs, is not a zombie and (if given) its command line mentions `program`."""
    if not pid or pid <= 0 or not process_running(pid):
        return False
    if program:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return False
        return program in cmdline.decode(errors="replace")
    return True


def read_pid(pid_file: Path) -> int | None:
    """The pid recorded in `pid_file` (first line, as Postgres' postmaster.pid also has it)."""
    try:
        first = pid_file.read_text().splitlines()[0].strip()
        return int(first)
    except (OSError, IndexError, ValueError):
        return None


def spawn(
    argv: Sequence[str],
    log_file: Path,
    env: Mapping[str, str],
    pid_file: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` detached in a new session, stdout and stderr appended to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    if pid_file is not None:
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{proc.pid}\n")
    return proc


def signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group led by `pid` (our children lead their own), else to `pid`."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop(
    pid: int,
    program: str | None = None,
    timeout: float = 10.0,
    handle: subprocess.Popen[bytes] | None = None,
) -> bool:
    """SIGTERM the process group, SIGKILL it after `timeout` seconds; True if it had to be killed."""
    if not pid_alive(pid, program):
        return False
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle is not None:
            handle.poll()
        if not pid_alive(pid, program):
            return False
        time.sleep(0.05)
    signal_group(pid, signal.SIGKILL)
    if handle is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            handle.wait(5)
    return True


def log_tail(log_file: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file, for error messages."""
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return f"(no log at {log_file})"
    return "\n".join(text.splitlines()[-lines:])


def http_ready(url: str, timeout: float = 1.0) -> bool:
    """True when GET `url` answers 2xx."""
    try:
        return httpx.get(url, timeout=timeout).is_success
    except httpx.HTTPError:
        return False


def children(pid: int) -> list[int]:
    """The direct children of a process, whichever of its threads started them (Linux /proc lists
    a child under the thread that forked it: a worker pool started from a thread is not among
    the main thread's children)."""
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return found
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                found.extend(int(p) for p in fh.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def tree_pids(pid: int) -> list[int]:
    """A process and all its descendants (Linux /proc)."""
    out: list[int] = []
    pids = [pid]
    while pids:
        current = pids.pop()
        out.append(current)
        pids.extend(children(current))
    return out


# every process the stack starts carries this variable (its value: the stack's state dir), and so
# does everything those processes start (worker pools, conversions): `down` finds them all by it
MEMBER_ENV = "COHORTFLOW_STACK_MEMBER"


def members(home: Path) -> list[int]:
    """Pids of running processes whose environment marks them as started by the stack in `home`,
    except this process and its ancestors (a `stack down` run from inside a member)."""
    needle = f"{MEMBER_ENV}={home}".encode()
    spared = _ancestors(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in environ.split(b"\0") and process_running(int(entry.name)):
            found.append(int(entry.name))
    return found


def stop_members(home: Path, timeout: float = 10.0) -> list[int]:
    """SIGTERM every member of the stack in `home` still running, SIGKILL what remains after
    `timeout`; returns the pids found (orphans: a service's pool re-parented to init, a conversion
    whose service died, a service started by an interrupted restart)."""
    found = members(home)
    for pid in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(process_running(p) for p in found):
        time.sleep(0.05)
    for pid in found:
        if process_running(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    return found


def _ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rfind(")") + 2 :].split()[1])
    return out
