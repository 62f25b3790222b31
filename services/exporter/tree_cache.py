"""The last validated tree of each cohort, kept on the exporter's disk and synced by manifest.

The BIDS validator needs the tree as files. Downloading every file of it at each export makes a
new study's export cost the cohort (ADR 0024); instead each cohort's tree stays in a folder under
`export_tree_cache_dir`, with an index beside it (path -> object key and SHA-256) of the files
that are current. A sync downloads the rows whose path is missing or whose key or content
changed, deletes the files the manifest no longer lists, and writes the index.

The index never marks a file current that is not: before a sync touches anything it drops from
the index every entry it is about to replace or delete, and it writes the new entries only after
every download has succeeded. At most `keep` cohorts' trees stay; the least recently synced go
first. One sync of a cohort at a time: the caller holds `lock(cohort)` around sync and use.

Files this process has just written need no download (ADR 0027): an export item offers each
output it uploaded, and finalize each dataset file it published, to the next sync as
`staged/<SHA-256>` (a hard link, else a copy, renamed into place once complete, so a staged name
always holds the bytes its name hashes). A sync takes a missing row from there when a file with
the row's SHA-256 is staged, and downloads it otherwise: the index rules are unchanged, and a
row converted by another replica, or staged on a disk this process no longer has, is simply
downloaded. Staging is best effort and takes no lock: it only ever adds complete files under
their content's name; the sync removes what it took and what is older than `STALE_STAGED_S`
(a run that failed or was cancelled before its finalize, or that another replica finalized),
and so does `sweep_staged`, which the items of a replica that syncs nothing call now and then.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

INDEX = "index.json"
TREE = "tree"
STAGED = "staged"
# a staged file no sync took within this time belongs to a run that never finalized here
STALE_STAGED_S = 3600.0


class TreeFile(Protocol):
    """What a sync needs of a manifest row."""

    @property
    def path(self) -> str: ...

    @property
    def object_key(self) -> str: ...

    @property
    def sha256(self) -> str: ...


# fetch(object_key, local_path) -> SHA-256 of what was written
Fetch = Callable[[str, Path], str]
# runs fn over the work (in parallel or not)
Parallel = Callable[[Iterable[TreeFile], Callable[[TreeFile], None]], object]


@dataclass(frozen=True)
class Synced:
    """What a sync did."""

    tree: Path
    downloaded: int
    kept: int
    removed: int
    staged: int = 0  # taken from the files staged by this process instead of downloaded


def _serial(work: Iterable[TreeFile], fn: Callable[[TreeFile], None]) -> None:
    for item in work:
        fn(item)


def read_index(folder: Path) -> dict[str, list[str]]:
    """path -> [object key, SHA-256] of the files marked current; empty when none or unreadable."""
    try:
        data = json.loads((folder / INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_index(folder: Path, index: dict[str, list[str]]) -> None:
    partial = folder / (INDEX + ".part")
    partial.write_text(json.dumps(index, sort_keys=True))
    partial.replace(folder / INDEX)


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` holds `source`'s bytes once complete (a hard link, else a copy, then a rename)."""
    partial = target.with_name(f"{target.name}.{uuid.uuid4().hex}.part")
    try:
        os.link(source, partial)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, partial)
    partial.replace(target)


def stage_file(folder: Path, source: Path, sha256: str) -> bool:
    """Offer `source`, whose SHA-256 the caller computed, to the folder's next sync; False when
    it could not be staged (that sync downloads the file instead)."""
    staged = folder / STAGED
    try:
        staged.mkdir(parents=True, exist_ok=True)
        _link_or_copy(source, staged / sha256)
    except OSError:
        return False
    return True


def stage_bytes(folder: Path, data: bytes, sha256: str) -> bool:
    """`stage_file` for content in memory (a dataset file finalize just published)."""
    staged = folder / STAGED
    try:
        staged.mkdir(parents=True, exist_ok=True)
        partial = staged / f"{sha256}.{uuid.uuid4().hex}.part"
        partial.write_bytes(data)
        partial.replace(staged / sha256)
    except OSError:
        return False
    return True


def _take_staged(staged: Path, row: TreeFile, target: Path) -> bool:
    """Place the staged copy of the row's content at `target`; False when none is staged."""
    if not row.sha256:
        return False
    source = staged / row.sha256
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _link_or_copy(source, target)
    except FileNotFoundError:
        return False
    return True


def _clear_staged(staged: Path, taken: set[str], now: float) -> None:
    """Remove the staged files a sync took, and the ones no sync took for `STALE_STAGED_S`."""
    if not staged.is_dir():
        return
    for entry in staged.iterdir():
        try:
            if entry.name in taken or now - entry.stat().st_mtime > STALE_STAGED_S:
                entry.unlink()
        except FileNotFoundError:
            continue


def sync_tree(
    folder: Path, files: Sequence[TreeFile], fetch: Fetch, parallel: Parallel = _serial
) -> Synced:
    """Make `folder/tree` hold exactly `files` (the manifest rows), downloading only what the
    index does not mark current and no staged file holds. A failed download raises; the index
    then marks only files that are current (the ones the sync did not need to touch)."""
    tree = folder / TREE
    tree.mkdir(parents=True, exist_ok=True)
    wanted = {f.path: f for f in files}
    for path in wanted:
        if Path(path).is_absolute() or ".." in Path(path).parts:
            raise ValueError(f"manifest path leaves the tree: {path!r}")
    index = read_index(folder)
    current = {
        p: entry
        for p, entry in index.items()
        if p in wanted
        and entry == [wanted[p].object_key, wanted[p].sha256]
        and (tree / p).is_file()
    }
    if current != index:
        _write_index(folder, current)  # nothing about to change stays marked current
    missing = [f for p, f in sorted(wanted.items()) if p not in current]
    staged = folder / STAGED
    taken: list[str] = []  # appended from the parallel workers (list.append is atomic)
    started = time.time()

    def fetch_one(row: TreeFile) -> None:
        if _take_staged(staged, row, tree / row.path):
            taken.append(row.sha256)
            return
        digest = fetch(row.object_key, tree / row.path)
        if row.sha256 and digest != row.sha256:
            raise RuntimeError(f"{row.object_key}: content differs from the manifest's SHA-256")

    parallel(missing, fetch_one)
    _clear_staged(staged, set(taken), started)
    removed = 0
    for local in sorted(tree.rglob("*"), reverse=True):  # children before their folders
        relative = local.relative_to(tree).as_posix()
        if local.is_dir() and not local.is_symlink():
            if not any(local.iterdir()):
                local.rmdir()
        elif relative not in wanted:
            local.unlink()
            removed += 1
    _write_index(folder, {p: [f.object_key, f.sha256] for p, f in wanted.items()})
    return Synced(
        tree=tree,
        downloaded=len(missing) - len(taken),
        kept=len(current),
        removed=removed,
        staged=len(taken),
    )


class TreeCache:
    """The cohorts' trees under `root`, at most `keep` of them, one user per cohort at a time."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root = root
        self.keep = keep
        self._locks: dict[uuid.UUID, asyncio.Lock] = {}

    def folder(self, cohort_id: uuid.UUID) -> Path:
        return self.root / str(cohort_id)

    def lock(self, cohort_id: uuid.UUID) -> asyncio.Lock:
        """Held around a cohort's sync and every use of its tree (the validator, a copy)."""
        return self._locks.setdefault(cohort_id, asyncio.Lock())

    def sync(
        self,
        cohort_id: uuid.UUID,
        files: Sequence[TreeFile],
        fetch: Fetch,
        parallel: Parallel = _serial,
    ) -> Synced:
        """Sync the cohort's tree (blocking; hold `lock(cohort_id)`)."""
        return sync_tree(self.folder(cohort_id), files, fetch, parallel)

    def stage_file(self, cohort_id: uuid.UUID, source: Path, sha256: str) -> bool:
        """Offer a file this process wrote to the cohort's next sync (no lock needed)."""
        return stage_file(self.folder(cohort_id), source, sha256)

    def stage_bytes(self, cohort_id: uuid.UUID, data: bytes, sha256: str) -> bool:
        """Offer content this process wrote to the cohort's next sync (no lock needed)."""
        return stage_bytes(self.folder(cohort_id), data, sha256)

    def sweep_staged(self, now: float | None = None) -> None:
        """Remove every cohort's staged files older than `STALE_STAGED_S` (blocking; no lock: a
        sync that finds one gone downloads it). A replica that converts items but finalizes none
        of their runs never syncs those cohorts, so its items call this now and then."""
        if not self.root.is_dir():
            return
        now = time.time() if now is None else now
        for folder in self.root.iterdir():
            _clear_staged(folder / STAGED, set(), now)

    def remove(self, cohort_id: uuid.UUID) -> bool:
        """Delete the cohort's tree (blocking; hold `lock(cohort_id)`); whether there was one."""
        folder = self.folder(cohort_id)
        if not folder.exists():
            return False
        shutil.rmtree(folder)
        return True

    async def evict(self) -> int:
        """Delete the least recently synced trees beyond `keep` that nobody holds; how many."""

        def synced_at(folder: Path) -> float:
            """When the tree was last synced or offered a file (a first export's items stage
            before any sync has written an index)."""
            times = [0.0]
            for name in (INDEX, STAGED):
                try:
                    times.append(os.stat(folder / name).st_mtime)
                except OSError:
                    continue
            return max(times)

        if not self.root.is_dir():
            return 0
        folders = sorted(
            (f for f in self.root.iterdir() if f.is_dir()), key=synced_at, reverse=True
        )
        evicted = 0
        for folder in folders[self.keep :]:
            try:
                cohort = uuid.UUID(folder.name)
            except ValueError:
                continue  # not a cohort's tree
            lock = self.lock(cohort)
            if lock.locked():
                continue  # in use: the next eviction looks again
            async with lock:
                await asyncio.to_thread(shutil.rmtree, folder, True)
            evicted += 1
        return evicted
