"""`cohortflow run --out` fetches the whole export in one tar stream from the gateway (ADR 0027):
what the gateway's archive sends is what the CLI writes, each file checked against the listing."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from minio.error import S3Error

from cohortflow.run import RunError, _extract
from services.gateway.api import catalog as api


class Objects:
    """Objects by key, served by byte range (what the archive asks of object storage)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if key not in self.objects:  # as minio's client says it
            raise S3Error(None, "NoSuchKey", "no such key", key, "", "")  # type: ignore[arg-type]
        return self.objects[key][offset : offset + length]

    def stat(self, key: str) -> object | None:
        return object() if key in self.objects else None


def _export(files: dict[str, bytes]) -> tuple[list[dict[str, Any]], bytes, int]:
    """The listing, the archive's bytes and its announced length, for files by path."""
    store = Objects({f"export/c/j/{p}": data for p, data in files.items()})
    entries = [(p, f"export/c/j/{p}", len(data)) for p, data in sorted(files.items())]
    headers = [api._tar_header(path, size) for path, _, size in entries]

    async def collect() -> bytes:
        return b"".join([c async for c in api._archive(store, entries, headers)])  # type: ignore[arg-type]

    body = asyncio.run(collect())
    announced = api._TAR_END + sum(
        len(h) + size + api._tar_padding(size)
        for h, (_, _, size) in zip(headers, entries, strict=True)
    )
    listing = [{"path": p, "sha256": hashlib.sha256(data).hexdigest()} for p, data in files.items()]
    return listing, body, announced


def _chunks(body: bytes, size: int = 1000) -> Iterator[bytes]:
    return (body[i : i + size] for i in range(0, len(body), size))


FILES = {
    "dataset_description.json": b'{"Name": "x"}\n',
    "participants.tsv": b"participant_id\nsub-01\n",
    "sub-01/anat/sub-01_T1w.nii.gz": bytes(range(256)) * 9000,  # several chunks and blocks
    "sub-01/anat/sub-01_T1w.json": b"{}\n",
    "sub-01/func/" + "long-" * 30 + "name_bold.json": b"",  # past ustar's 100 characters; empty
}


def test_the_archive_writes_every_listed_file_with_its_bytes(tmp_path: Path) -> None:
    listing, body, announced = _export(FILES)
    assert len(body) == announced  # the Content-Length the gateway sends
    _extract(_chunks(body), {f["path"]: f for f in listing}, tmp_path)
    written = {
        p.relative_to(tmp_path).as_posix(): p.read_bytes()
        for p in tmp_path.rglob("*")
        if p.is_file()
    }
    assert written == FILES


def test_a_file_that_differs_or_is_missing_or_not_listed_is_refused(tmp_path: Path) -> None:
    listing, body, _ = _export(FILES)
    rows = {f["path"]: f for f in listing}
    wrong = {**rows, "participants.tsv": {"path": "participants.tsv", "sha256": "0" * 64}}
    with pytest.raises(RunError, match="differs"):
        _extract(_chunks(body), wrong, tmp_path / "a")
    assert not (tmp_path / "a" / "participants.tsv").exists()
    more = {**rows, "README": {"path": "README", "sha256": ""}}
    with pytest.raises(RunError, match="lacks 1"):
        _extract(_chunks(body), more, tmp_path / "b")
    fewer = {p: r for p, r in rows.items() if p != "README" and not p.startswith("sub-")}
    with pytest.raises(RunError, match="does not list"):
        _extract(_chunks(body), fewer, tmp_path / "c")


def test_a_missing_object_cuts_the_archive_short() -> None:
    store = Objects({})
    entries = [("README", "export/c/j/README", 3)]

    async def collect() -> None:
        async for _ in api._archive(store, entries, [api._tar_header("README", 3)]):  # type: ignore[arg-type]
            pass

    with pytest.raises(api.NotFound):
        asyncio.run(collect())
