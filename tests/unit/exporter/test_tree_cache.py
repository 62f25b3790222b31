"""The exporter's kept tree: a sync downloads what changed, deletes what left, and never marks a
file current that is not (ADR 0024)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.exporter.tree_cache import (
    STAGED,
    STALE_STAGED_S,
    TreeCache,
    read_index,
    stage_bytes,
    stage_file,
    sync_tree,
)


@dataclass(frozen=True)
class Row:
    path: str
    object_key: str
    sha256: str


class FakeStore:
    """Objects by key; counts downloads; a key in `broken` fails its download."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.downloads: list[str] = []
        self.broken: set[str] = set()

    def put(self, job: str, path: str, data: bytes) -> Row:
        key = f"export/c/{job}/{path}"
        self.objects[key] = data
        return Row(path, key, hashlib.sha256(data).hexdigest())

    def fetch(self, key: str, path: Path) -> str:
        self.downloads.append(key)
        if key in self.broken:
            raise OSError(f"GET {key} failed")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.objects[key])
        return hashlib.sha256(self.objects[key]).hexdigest()


def _cohort(store: FakeStore, job: str, subjects: list[str]) -> list[Row]:
    rows = [store.put(job, "participants.tsv", "\n".join(subjects).encode())]
    for sub in subjects:
        rows.append(store.put(job, f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz", sub.encode()))
        rows.append(store.put(job, f"sub-{sub}/anat/sub-{sub}_T1w.json", b"{}"))
    return rows


def _files(tree: Path) -> dict[str, bytes]:
    return {p.relative_to(tree).as_posix(): p.read_bytes() for p in tree.rglob("*") if p.is_file()}


def test_a_second_sync_downloads_only_what_changed(tmp_path: Path) -> None:
    store = FakeStore()
    first = _cohort(store, "job1", ["01", "02", "03"])
    synced = sync_tree(tmp_path, first, store.fetch)
    assert synced.downloaded == len(first) == len(store.downloads)
    # the next export: sub-02 re-exported (new keys), sub-03 gone, the others carried as rows
    carried = [r for r in first if r.path.startswith("sub-01/")]
    second = [
        *carried,
        store.put("job2", "participants.tsv", b"01\n02"),
        store.put("job2", "sub-02/anat/sub-02_T1w.nii.gz", b"02 again"),
        store.put("job2", "sub-02/anat/sub-02_T1w.json", b"{}"),
    ]
    store.downloads.clear()
    synced = sync_tree(tmp_path, second, store.fetch)
    assert sorted(store.downloads) == sorted(r.object_key for r in second if "job2" in r.object_key)
    assert (synced.downloaded, synced.kept, synced.removed) == (3, 2, 2)
    assert _files(synced.tree) == {r.path: store.objects[r.object_key] for r in second}
    assert not (synced.tree / "sub-03").exists()  # emptied folders go too
    assert read_index(tmp_path) == {r.path: [r.object_key, r.sha256] for r in second}
    store.downloads.clear()
    sync_tree(tmp_path, second, store.fetch)
    assert store.downloads == []


def test_a_failed_download_marks_nothing_current_that_is_not(tmp_path: Path) -> None:
    store = FakeStore()
    first = _cohort(store, "job1", ["01", "02"])
    sync_tree(tmp_path, first, store.fetch)
    index = read_index(tmp_path)
    changed = store.put("job2", "sub-02/anat/sub-02_T1w.nii.gz", b"02 again")
    second = [r if r.path != changed.path else changed for r in first]
    store.broken.add(changed.object_key)
    with pytest.raises(OSError):
        sync_tree(tmp_path, second, store.fetch)
    # the unchanged files stay marked; the one being replaced is no longer, the new one is not yet
    assert read_index(tmp_path) == {p: e for p, e in index.items() if p != changed.path}
    store.broken.clear()
    store.downloads.clear()
    synced = sync_tree(tmp_path, second, store.fetch)
    assert store.downloads == [changed.object_key]
    assert _files(synced.tree) == {r.path: store.objects[r.object_key] for r in second}


def test_a_file_changed_on_disk_without_the_index_is_fetched_again(tmp_path: Path) -> None:
    store = FakeStore()
    rows = _cohort(store, "job1", ["01"])
    synced = sync_tree(tmp_path, rows, store.fetch)
    (synced.tree / rows[1].path).unlink()
    store.downloads.clear()
    sync_tree(tmp_path, rows, store.fetch)
    assert store.downloads == [rows[1].object_key]
    with pytest.raises(ValueError):
        sync_tree(tmp_path, [Row("../outside", "k", "")], store.fetch)


def test_the_least_recently_synced_trees_beyond_the_bound_go(tmp_path: Path) -> None:
    store = FakeStore()
    cache = TreeCache(tmp_path, keep=2)
    cohorts = [uuid.uuid4() for _ in range(3)]
    for age, cohort in enumerate(cohorts):
        cache.sync(cohort, _cohort(store, f"job{age}", ["01"]), store.fetch)
        stamp = 1_000_000 + age  # synced one after the other
        os.utime(cache.folder(cohort) / "index.json", (stamp, stamp))

    async def evict_while_oldest_in_use() -> tuple[int, int]:
        async with cache.lock(cohorts[0]):
            held = await cache.evict()
        return held, await cache.evict()

    assert asyncio.run(evict_while_oldest_in_use()) == (0, 1)
    assert [c for c in cohorts if cache.folder(c).exists()] == cohorts[1:]
    assert cache.remove(cohorts[1]) and not cache.folder(cohorts[1]).exists()
    assert not cache.remove(cohorts[1])


def test_staged_outputs_are_taken_instead_of_downloaded(tmp_path: Path) -> None:
    """What this process converted or published is not fetched back (ADR 0027); a row whose
    content is not staged (another replica's item) is downloaded as before."""
    store = FakeStore()
    rows = _cohort(store, "job1", ["01", "02"])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    folder = tmp_path / "cohort"
    for row in rows:
        if row.path.startswith("sub-01/"):  # sub-02 was converted elsewhere
            local = scratch / row.path.replace("/", "_")
            local.write_bytes(store.objects[row.object_key])
            assert stage_file(folder, local, row.sha256)
        elif row.path == "participants.tsv":  # a dataset file finalize published
            assert stage_bytes(folder, store.objects[row.object_key], row.sha256)
    synced = sync_tree(folder, rows, store.fetch)
    # content addressed: sub-02's sidecar has the bytes of sub-01's, so it is taken too
    assert store.downloads == ["export/c/job1/sub-02/anat/sub-02_T1w.nii.gz"]
    assert (synced.downloaded, synced.staged) == (1, 4)
    assert _files(synced.tree) == {r.path: store.objects[r.object_key] for r in rows}
    assert read_index(folder) == {r.path: [r.object_key, r.sha256] for r in rows}
    # taken files leave the staging area; the scratch copy is untouched
    assert not any((folder / STAGED).iterdir())
    assert len(list(scratch.iterdir())) == 2


def test_a_stale_staged_file_goes_and_a_missing_one_is_downloaded(tmp_path: Path) -> None:
    store = FakeStore()
    rows = _cohort(store, "job1", ["01"])
    folder = tmp_path / "cohort"
    assert stage_bytes(folder, b"from a run that never finalized", "0" * 64)
    old = os.stat(folder / STAGED / ("0" * 64)).st_mtime - STALE_STAGED_S - 1
    os.utime(folder / STAGED / ("0" * 64), (old, old))
    assert stage_bytes(folder, b"a run still converting", "1" * 64)
    synced = sync_tree(folder, rows, store.fetch)
    assert (synced.downloaded, synced.staged) == (len(rows), 0)
    assert sorted(p.name for p in (folder / STAGED).iterdir()) == ["1" * 64]


def test_a_sweep_drops_stale_staged_files_of_every_cohort(tmp_path: Path) -> None:
    cache = TreeCache(tmp_path, keep=2)
    cohorts = [uuid.uuid4(), uuid.uuid4()]
    for cohort in cohorts:
        assert cache.stage_bytes(cohort, b"old", "0" * 64)
        assert cache.stage_bytes(cohort, b"new", "1" * 64)
    later = os.stat(cache.folder(cohorts[0]) / STAGED / ("1" * 64)).st_mtime + STALE_STAGED_S / 2
    cache.sweep_staged(later)
    assert all(len(list((cache.folder(c) / STAGED).iterdir())) == 2 for c in cohorts)
    cache.sweep_staged(later + STALE_STAGED_S)
    assert all(not any((cache.folder(c) / STAGED).iterdir()) for c in cohorts)
