"""Where a cohort's DICOM comes from, and the raw zone it is ingested into.

A cohort's `source_path` is a local folder under one of the configured data roots
(`COHORTFLOW_DATA_ROOTS`) or an `s3://bucket/prefix`. Anything else is refused, with a reason a
person can act on. File names and extensions are never used to decide what a file is.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from shared.settings import Settings, get_settings
from shared.storage import ObjectStore, parse_s3_uri


class SourceError(ValueError):
    """A source location that may not or cannot be used; the message says why."""


@dataclass(frozen=True)
class SourceFile:
    key: str  # path relative to the source root, POSIX separators
    size: int
    mtime_ns: int = 0  # 0 for object storage


def check_location(location: str, settings: Settings | None = None) -> str:
    """The normalized location if a cohort may use it; raises `SourceError` otherwise."""
    settings = settings or get_settings()
    location = location.strip()
    if not location:
        raise SourceError("source_path is empty")
    if location.startswith("s3://"):
        try:
            bucket, prefix = parse_s3_uri(location)
        except ValueError as exc:
            raise SourceError(str(exc)) from exc
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    if "://" in location:
        raise SourceError(f"source_path must be a local folder or an s3:// URI, not {location!r}")
    path = Path(location).expanduser()
    if not path.is_absolute():
        raise SourceError(f"source_path must be an absolute path: {location!r}")
    resolved = path.resolve()
    roots = [Path(r).expanduser().resolve() for r in settings.data_roots]
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots) or "none configured (set COHORTFLOW_DATA_ROOTS)"
        raise SourceError(
            f"source_path {str(resolved)!r} is outside the allowed data roots: {allowed}"
        )
    if not resolved.exists():
        raise SourceError(f"source_path {str(resolved)!r} does not exist")
    if not resolved.is_dir():
        raise SourceError(f"source_path {str(resolved)!r} is not a directory")
    return str(resolved)


def check_destination(destination: str, settings: Settings | None = None) -> str:
    """A place an export may be copied to: `s3://`, or a folder under a data root that need not
    exist yet (its nearest existing parent must be inside a root). Returns it normalized."""
    settings = settings or get_settings()
    if "://" in destination:
        return check_location(destination, settings)
    path = Path(destination).expanduser()
    if not path.is_absolute():
        raise SourceError(f"destination must be an absolute path: {destination!r}")
    resolved = path.resolve()
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    check_location(str(existing), settings)  # inside a root, and a folder
    return str(resolved)


class Source(Protocol):
    location: str

    def list(self) -> Iterator[SourceFile]: ...

    def read(self, key: str) -> bytes: ...

    def as_file(self, key: str, scratch: Path) -> Path:
        """A path to the file's content without holding it in memory: the file itself when it is
        local, else a download into the folder `scratch` (the caller removes it)."""
        ...


class LocalSource:
    """A folder on a local (or mounted) file system, walked in parallel."""

    def __init__(self, root: Path, folder_workers: int = 4) -> None:
        self.root = root
        self.location = str(root)
        self._workers = max(1, folder_workers)

    def _scan(self, folder: Path) -> tuple[list[SourceFile], list[Path]]:
        files: list[SourceFile] = []
        folders: list[Path] = []
        try:
            entries = list(os.scandir(folder))
        except (PermissionError, FileNotFoundError):
            return files, folders
        for entry in entries:
            if entry.is_dir(follow_symlinks=True):
                folders.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=True):
                st = entry.stat()
                rel = PurePosixPath(Path(entry.path).relative_to(self.root).as_posix())
                files.append(SourceFile(str(rel), st.st_size, st.st_mtime_ns))
        return files, folders

    def list(self) -> Iterator[SourceFile]:
        """Every file below the root, folders scanned by a small thread pool, in sorted order.

        Linked folders are followed (a cohort folder of links is fine, the same data linked twice
        is listed twice), except a link back to one of its own ancestors, which would loop.
        """
        root_real = self.root.resolve()
        pending: list[tuple[Path, frozenset[Path]]] = [(self.root, frozenset({root_real}))]
        found: list[SourceFile] = []
        with ThreadPoolExecutor(max_workers=self._workers) as pool:
            while pending:
                results = list(pool.map(lambda p: self._scan(p[0]), pending))
                next_pending: list[tuple[Path, frozenset[Path]]] = []
                for (_, ancestors), (files, folders) in zip(pending, results, strict=True):
                    found.extend(files)
                    for folder in folders:
                        real = folder.resolve()
                        if real not in ancestors:
                            next_pending.append((folder, ancestors | {real}))
                pending = next_pending
        found.sort(key=lambda f: f.key)
        yield from found

    def path(self, key: str) -> Path:
        # lexical check: a key may not climb out of the root; symlinks inside the root are the
        # user's own choice (a cohort folder of links to data elsewhere) and are followed
        path = Path(os.path.normpath(self.root / key))
        if not path.is_relative_to(self.root):
            raise SourceError(f"{key!r} escapes the source root")
        return path

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def as_file(self, key: str, scratch: Path) -> Path:
        return self.path(key)


class ObjectSource:
    """A prefix in an S3 bucket (an `s3://` source, or a zone of our own bucket)."""

    def __init__(self, store: ObjectStore, bucket: str, prefix: str) -> None:
        self.store = store
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}"

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def list(self) -> Iterator[SourceFile]:
        start = len(self.prefix) + 1 if self.prefix else 0
        for obj in self.store.list(self.prefix + "/" if self.prefix else "", bucket=self.bucket):
            yield SourceFile(obj.key[start:], obj.size, 0)

    def read(self, key: str) -> bytes:
        return self.store.get_bytes(self._full(key), bucket=self.bucket)

    def as_file(self, key: str, scratch: Path) -> Path:
        path = scratch / "object"
        self.store.download(self._full(key), path, bucket=self.bucket)
        return path


def open_source(location: str, settings: Settings | None = None, folder_workers: int = 4) -> Source:
    settings = settings or get_settings()
    checked = check_location(location, settings)
    if checked.startswith("s3://"):
        bucket, prefix = parse_s3_uri(checked)
        return ObjectSource(ObjectStore(settings), bucket, prefix)
    return LocalSource(Path(checked), folder_workers)


def raw_key(cohort_id: object, source_key: str) -> str:
    """Where an ingested file lives in the identified zone."""
    return f"raw/{cohort_id}/{source_key}"
