"""Where a cohort's DICOM comes from, and the raw zone it is ingested into: the one resolver.

A cohort's `source_path` (and a new study's `location`) is a local folder under one of the
configured data roots (`COHORTFLOW_DATA_ROOTS`) or an `s3://bucket/prefix` under one of the
configured S3 sources (`COHORTFLOW_S3_SOURCES`). Anything else is refused, with a reason a person
can act on. File names and extensions are never used to decide what a file is.

What is checked (docs/adr-0017-sources.md):
- local: the folder, after resolving links, lies inside a data root and outside the stack's own
  state (`COHORTFLOW_HOME`: its database, object and broker files). While listing, every link is
  resolved and one that leaves the roots, dangles, loops or points back at one of its own parent
  folders is listed as *rejected* with its reason and never read; so are FIFOs, sockets, devices and
  folders that cannot be read. Reading re-checks the resolved path and opens it without following
  a link swapped in since, so a file is never read from outside the roots.
- `s3://`: the bucket and prefix lie under a configured S3 source, and never in the system's own
  buckets (data bucket with its raw, de-identified and export zones, audit bucket, the local
  broker's log); keys with `.` or `..` segments are rejected, not read.
- names: a local file name need not be valid UTF-8. Its key is the name with every byte that is
  not UTF-8 written `%XX` and every `%` written `%25`: valid text (JSON, Postgres, object keys)
  that maps back to the exact bytes (`source_key_of` / `source_name_of`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from shared.settings import BROKER_BUCKET, Settings, get_settings
from shared.storage import ObjectStore, parse_s3_uri


class SourceError(ValueError):
    """A source location that may not or cannot be used; the message says why."""


@dataclass(frozen=True)
class SourceFile:
    key: str  # path relative to the source root, POSIX separators (see `source_key_of`)
    size: int
    mtime_ns: int = 0  # 0 for object storage
    # why this entry is not read (a link leaving the roots, a FIFO, ...); None for a file to read
    rejected: str | None = None


# --- names ------------------------------------------------------------------------------------

_ESCAPE = re.compile(r"%(25|[89A-F][0-9A-F])")


def source_key_of(name: bytes) -> str:
    """The key of a relative path given as bytes: valid UTF-8 text that maps back losslessly.

    A `%` becomes `%25`; a byte that is not part of valid UTF-8 becomes `%XX` (upper-case hex,
    as in a URL). Every other character stays as it is, so ordinary names are their own keys.
    (Percent rather than backslash: S3 servers handle `%` in object keys, not always `\\`.)"""
    text = name.decode("utf-8", "surrogateescape")
    out = []
    for ch in text:
        if ch == "%":
            out.append("%25")
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"%{ord(ch) - 0xDC00:02X}")
        else:
            out.append(ch)
    return "".join(out)


def source_name_of(key: str) -> bytes:
    """The bytes of the relative path a key stands for (the inverse of `source_key_of`)."""
    return _ESCAPE.sub(
        lambda m: "%" if m.group(1) == "25" else chr(0xDC00 + int(m.group(1), 16)), key
    ).encode("utf-8", "surrogateescape")


# --- where a source may be --------------------------------------------------------------------


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@dataclass(frozen=True)
class Roots:
    """The local folders sources may be read from (real paths), minus the stack's own state."""

    allowed: tuple[str, ...]
    excluded: tuple[str, ...]

    @classmethod
    def of(cls, settings: Settings) -> Roots:
        def real(p: str | os.PathLike[str]) -> str:
            return os.path.realpath(os.path.expanduser(p))

        return cls(
            tuple(real(r) for r in settings.data_roots),
            (real(settings.home),),
        )

    def refusal(self, real: str) -> str | None:
        """Why the resolved path `real` may not be read, or None when it may."""
        if any(_inside(real, ex) for ex in self.excluded):
            return "inside the system's own state folder (COHORTFLOW_HOME)"
        if not any(_inside(real, root) for root in self.allowed):
            return "outside the allowed data roots"
        return None

    def describe(self) -> str:
        return ", ".join(self.allowed) or "none configured (set COHORTFLOW_DATA_ROOTS)"


def own_buckets(settings: Settings) -> frozenset[str]:
    """The buckets the system itself writes: never a source."""
    return frozenset({settings.data_bucket, settings.audit_bucket, BROKER_BUCKET})


_DOT_KEY = "an object key with '.' or '..' segments (never read: a server may resolve them)"


def _s3_prefix_refusal(prefix: str) -> str | None:
    parts = prefix.split("/") if prefix else []
    if any(p in (".", "..") for p in parts):
        return "'.' and '..' are not allowed in an s3:// prefix"
    return None


def check_s3(location: str, settings: Settings, what: str = "source_path") -> str:
    """The normalized `s3://bucket[/prefix]` if it may be read as a source; raises otherwise."""
    try:
        bucket, prefix = parse_s3_uri(location)
    except ValueError as exc:
        raise SourceError(str(exc)) from exc
    normalized = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    if bucket in own_buckets(settings):
        raise SourceError(
            f"{what} {normalized!r} is in one of the system's own buckets (its data zones, audit"
            " exports or broker log), which are never a source"
        )
    if (why := _s3_prefix_refusal(prefix)) is not None:
        raise SourceError(f"{what} {normalized!r}: {why}")
    for allowed in settings.s3_sources:
        a_bucket, a_prefix = parse_s3_uri(allowed)
        if a_bucket == bucket and (not a_prefix or _inside(prefix, a_prefix)):
            return normalized
    configured = ", ".join(settings.s3_sources) or "none configured (set COHORTFLOW_S3_SOURCES)"
    raise SourceError(f"{what} {normalized!r} is not under an allowed S3 source: {configured}")


def check_location(location: str, settings: Settings | None = None) -> str:
    """The normalized location if a cohort may use it; raises `SourceError` otherwise."""
    settings = settings or get_settings()
    location = location.strip()
    if not location:
        raise SourceError("source_path is empty")
    if location.startswith("s3://"):
        return check_s3(location, settings)
    if "://" in location:
        raise SourceError(f"source_path must be a local folder or an s3:// URI, not {location!r}")
    path = Path(location).expanduser()
    if not path.is_absolute():
        raise SourceError(f"source_path must be an absolute path: {location!r}")
    resolved = path.resolve()
    roots = Roots.of(settings)
    why = roots.refusal(str(resolved))
    if why == "outside the allowed data roots":
        raise SourceError(f"source_path {str(resolved)!r} is {why}: {roots.describe()}")
    if why is not None:
        raise SourceError(f"source_path {str(resolved)!r} is {why}")
    if not resolved.exists():
        raise SourceError(f"source_path {str(resolved)!r} does not exist")
    if not resolved.is_dir():
        raise SourceError(f"source_path {str(resolved)!r} is not a directory")
    return str(resolved)


def check_destination(destination: str, settings: Settings | None = None) -> str:
    """A place an export may be copied to: an `s3://` bucket other than the system's own, or a
    folder under a data root that need not exist yet (its nearest existing parent must be inside
    a root). Returns it normalized."""
    settings = settings or get_settings()
    if destination.startswith("s3://"):
        try:
            bucket, prefix = parse_s3_uri(destination)
        except ValueError as exc:
            raise SourceError(str(exc)) from exc
        if bucket in own_buckets(settings):
            raise SourceError(
                f"destination s3://{bucket} is one of the system's own buckets; name another"
            )
        if (why := _s3_prefix_refusal(prefix)) is not None:
            raise SourceError(f"destination {destination!r}: {why}")
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    if "://" in destination:
        return check_location(destination, settings)
    path = Path(destination).expanduser()
    if not path.is_absolute():
        raise SourceError(f"destination must be an absolute path: {destination!r}")
    resolved = path.resolve()
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    check_location(str(existing), settings)  # inside a root, and a folder
    return str(resolved)


# --- reading ----------------------------------------------------------------------------------


class Source(Protocol):
    location: str

    def list(self) -> Iterator[SourceFile]:
        """Every entry below the source, sorted by key; entries that are not read carry their
        `rejected` reason."""
        ...

    def read(self, key: str) -> bytes: ...

    def open(self, key: str) -> BinaryIO: ...

    def as_file(self, key: str, scratch: Path) -> Path:
        """A path to the file's content without holding it in memory: the file itself when it is
        local, else a download into the folder `scratch` (the caller removes it)."""
        ...


_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _not_regular(mode: int) -> str:
    return f"not a regular file: {_KINDS.get(stat.S_IFMT(mode), 'an unknown kind of file')}"


def _link_error(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a link that loops (it leads back to itself)"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "a dangling link (its target does not exist)"
    return f"an unreadable link ({exc.strerror or exc})"


@dataclass(frozen=True)
class _Folder:
    path: str  # as reached from the root (may pass through links)
    real: str  # resolved
    ancestors: frozenset[str]  # resolved paths of it and the folders above it


class LocalSource:
    """A folder on a local (or mounted) file system, walked in parallel, confined to `roots`."""

    def __init__(self, root: Path, folder_workers: int = 4, roots: Roots | None = None) -> None:
        self.root = root
        self.location = str(root)
        self._root = os.path.realpath(root)
        self._roots = roots or Roots((self._root,), ())
        self._workers = max(1, folder_workers)

    def _key(self, path: str) -> str:
        rel = os.path.relpath(path, self.location)
        return source_key_of(os.fsencode(PurePosixPath(rel).as_posix()))

    def _scan(self, folder: _Folder) -> tuple[list[SourceFile], list[_Folder]]:
        files: list[SourceFile] = []
        folders: list[_Folder] = []

        def reject(path: str, reason: str) -> None:
            files.append(SourceFile(self._key(path), 0, 0, rejected=reason))

        try:
            entries = list(os.scandir(folder.path))
        except OSError as exc:
            reject(folder.path, f"an unreadable folder ({exc.strerror or exc})")
            return files, folders
        for entry in entries:
            try:
                if entry.is_symlink():
                    try:
                        st = os.stat(entry.path)
                    except OSError as exc:
                        reject(entry.path, _link_error(exc))
                        continue
                    real = os.path.realpath(entry.path)
                    why = self._roots.refusal(real)
                    if why is not None:
                        reject(entry.path, f"a link that leads {why}")
                        continue
                    if stat.S_ISDIR(st.st_mode) and real in folder.ancestors:
                        reject(
                            entry.path, "a link to one of its own parent folders (it would loop)"
                        )
                        continue
                else:
                    st = entry.stat(follow_symlinks=False)
                    real = os.path.join(folder.real, entry.name)
            except OSError as exc:  # vanished or unreadable while listing
                reject(entry.path, f"unreadable ({exc.strerror or exc})")
                continue
            if stat.S_ISDIR(st.st_mode):
                folders.append(_Folder(entry.path, real, folder.ancestors | {real}))
            elif stat.S_ISREG(st.st_mode):
                files.append(SourceFile(self._key(entry.path), st.st_size, st.st_mtime_ns))
            else:
                reject(entry.path, _not_regular(st.st_mode))
        return files, folders

    def list(self) -> Iterator[SourceFile]:
        """Every entry below the root, folders scanned by a small thread pool, in sorted order.

        Linked folders are followed while they stay inside the roots (a cohort folder of links is
        fine, the same data linked twice is listed twice); a link back to one of its own ancestors
        would loop and is rejected instead, like every entry that is not read."""
        pending = [_Folder(self.location, self._root, frozenset({self._root}))]
        found: list[SourceFile] = []
        with ThreadPoolExecutor(max_workers=self._workers) as pool:
            while pending:
                next_pending: list[_Folder] = []
                for files, folders in pool.map(self._scan, pending):
                    found.extend(files)
                    next_pending.extend(folders)
                pending = next_pending
        found.sort(key=lambda f: f.key)
        yield from found

    def path(self, key: str) -> Path:
        """The resolved path of a listed key; raises `SourceError` when the key climbs out of the
        root or its file now resolves outside the roots (a link swapped in after listing)."""
        lexical = os.path.normpath(os.path.join(self.location, os.fsdecode(source_name_of(key))))
        if not _inside(lexical, self.location):
            raise SourceError(f"{key!r} escapes the source root")
        real = os.path.realpath(lexical)
        why = self._roots.refusal(real)
        if why is not None:
            raise SourceError(f"{key!r} leads {why}")
        return Path(real)

    def open(self, key: str) -> BinaryIO:
        """The file opened for reading: never through a link swapped in after the check, and
        never blocking on a FIFO."""
        return self.open_resolved(key)[1]

    def open_resolved(self, key: str) -> tuple[Path, BinaryIO]:
        """`open`, with the resolved path it opened (`path`), for a caller that needs both."""
        real = self.path(key)
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise SourceError(f"{key!r} is {_not_regular(mode)}")
            os.set_blocking(fd, True)
            return real, os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def read(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    def as_file(self, key: str, scratch: Path) -> Path:
        with self.open(key):  # a regular file inside the roots, now
            return self.path(key)


class ObjectSource:
    """A prefix in an S3 bucket (an `s3://` source, or a zone of our own bucket)."""

    def __init__(self, store: ObjectStore, bucket: str, prefix: str) -> None:
        self.store = store
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}"

    def _full(self, key: str) -> str:
        if (why := _s3_prefix_refusal(key)) is not None:
            raise SourceError(f"{key!r}: {why}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def list(self) -> Iterator[SourceFile]:
        start = len(self.prefix) + 1 if self.prefix else 0
        for obj in self.store.list(self.prefix + "/" if self.prefix else "", bucket=self.bucket):
            key = obj.key[start:]
            bad = _s3_prefix_refusal(key) is not None
            yield SourceFile(key, obj.size, 0, rejected=_DOT_KEY if bad else None)

    def read(self, key: str) -> bytes:
        return self.store.get_bytes(self._full(key), bucket=self.bucket)

    def open(self, key: str) -> BinaryIO:
        return io.BytesIO(self.read(key))

    def as_file(self, key: str, scratch: Path) -> Path:
        path = scratch / "object"
        self.store.download(self._full(key), path, bucket=self.bucket)
        return path


def _open_checked(checked: str, settings: Settings, folder_workers: int) -> Source:
    if checked.startswith("s3://"):
        bucket, prefix = parse_s3_uri(checked)
        return ObjectSource(ObjectStore(settings), bucket, prefix)
    return LocalSource(Path(checked), folder_workers, Roots.of(settings))


def _relative(base: str, location: str) -> str | None:
    """`location`'s path under `base` (POSIX), or None when it does not lie inside it."""
    if base.startswith("s3://") != location.startswith("s3://"):
        return None
    if base.startswith("s3://"):
        base_bucket, base_prefix = parse_s3_uri(base)
        bucket, prefix = parse_s3_uri(location)
        if bucket != base_bucket:
            return None
        base, location = "/" + base_prefix.strip("/"), "/" + prefix.strip("/")
    if location == base or not _inside(location, base):
        return None
    return os.path.relpath(location, base).replace(os.sep, "/")


class _StudyInside:
    """A study's folder inside its cohort's source, listed alone but named and read through the
    cohort's source: its keys are the ones a whole-cohort run gives the same files."""

    def __init__(self, base: Source, study: Source, relative: str) -> None:
        self.location = base.location
        self._base, self._study, self._relative = base, study, relative

    def list(self) -> Iterator[SourceFile]:
        for f in self._study.list():
            yield SourceFile(f"{self._relative}/{f.key}", f.size, f.mtime_ns, f.rejected)

    def read(self, key: str) -> bytes:
        return self._base.read(key)

    def open(self, key: str) -> BinaryIO:
        return self._base.open(key)

    def as_file(self, key: str, scratch: Path) -> Path:
        return self._base.as_file(key, scratch)


class _StudyOutside:
    """A study's folder outside its cohort's source: its keys carry `@<digest of the location>/`,
    so two studies that both hold `IM0001` never share a key in the cohort's catalog or raw zone."""

    def __init__(self, study: Source) -> None:
        self.location = study.location
        self._study = study
        digest = hashlib.sha256(study.location.encode("utf-8", "surrogateescape")).hexdigest()
        self._prefix = f"@{digest[:16]}/"

    def _own(self, key: str) -> str:
        if not key.startswith(self._prefix):
            raise SourceError(f"{key!r} is not a key of the study at {self.location}")
        return key[len(self._prefix) :]

    def list(self) -> Iterator[SourceFile]:
        for f in self._study.list():
            yield SourceFile(self._prefix + f.key, f.size, f.mtime_ns, f.rejected)

    def read(self, key: str) -> bytes:
        return self._study.read(self._own(key))

    def open(self, key: str) -> BinaryIO:
        return self._study.open(self._own(key))

    def as_file(self, key: str, scratch: Path) -> Path:
        return self._study.as_file(self._own(key), scratch)


def open_source(
    location: str,
    settings: Settings | None = None,
    folder_workers: int = 4,
    *,
    within: str | None = None,
) -> Source:
    """The source at a cohort's location, checked (`check_location`) and confined to the roots.

    `within` is the cohort's source when `location` is a new study's folder: the study's files are
    then keyed as a whole-cohort run keys them (inside the cohort's source), or under a prefix of
    their own (outside it), so studies never collide on a file name. Open it again with the same
    arguments (or, inside, at `source.location`) to read what `list()` named.
    """
    settings = settings or get_settings()
    checked = check_location(location, settings)
    study = _open_checked(checked, settings, folder_workers)
    if within is None:
        return study
    try:
        base = check_location(within, settings)
    except (SourceError, ValueError, OSError):
        base = None  # the cohort's source is no longer allowed: the study still has its own keys
    if base == checked:
        return study
    if base is not None and (relative := _relative(base, checked)) is not None:
        return _StudyInside(_open_checked(base, settings, folder_workers), study, relative)
    return _StudyOutside(study)


RAW_ZONE = "raw"  # identified: ingested copies of the sources
ANON_ZONE = "anon"  # de-identified: what the anonymizer wrote
# where the catalog says a file is when it was not copied: read in place from the cohort's source
# folder, at its key, and checked against its catalogued SHA-256 on every read (ADR 0035)
IN_PLACE = "source:"


def in_place_locator(key: str) -> str:
    """The catalog's `object_key` of a file read in place from its cohort's source folder."""
    return IN_PLACE + key


def in_place_key(object_key: str) -> str | None:
    """The source key of an in-place locator, None for an object of the data bucket."""
    return object_key[len(IN_PLACE) :] if object_key.startswith(IN_PLACE) else None


def readable_in_place(source: Source) -> bool:
    """True when every file `source` lists can be read again, at its key, through the cohort's
    own source folder (`open_source(cohort.source_path)`): a local cohort folder, or a new study's
    folder inside it. A study outside the cohort's folder and an `s3://` source are copied."""
    if isinstance(source, _StudyInside):
        return isinstance(source._base, LocalSource)
    return isinstance(source, LocalSource)


def read_catalogued(
    store: ObjectStore,
    object_key: str,
    sha256: str | None,
    source_path: str,
    settings: Settings | None = None,
) -> bytes:
    """A catalogued file's bytes: its object, or, for an in-place locator, the file in the cohort's
    source folder (`source_path`), refused when it no longer has the catalogued SHA-256."""
    key = in_place_key(object_key)
    if key is None:
        return store.get_bytes(object_key)
    source = open_source(source_path, settings)
    if not readable_in_place(source):
        raise SourceError(f"{key}: the cohort's source {source_path} is not a local folder here")
    data = source.read(key)
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise SourceError(f"{key}: changed since it was catalogued; run extraction again")
    return data


def raw_prefix(cohort_id: object) -> str:
    """The identified zone of a cohort: its ingested copies of the source, keyed by source key."""
    return f"{RAW_ZONE}/{cohort_id}"


def anon_prefix(cohort_id: object) -> str:
    """The de-identified zone of a cohort (what the anonymizer writes, all an anonymized cohort's
    extraction may read)."""
    return f"{ANON_ZONE}/{cohort_id}"
