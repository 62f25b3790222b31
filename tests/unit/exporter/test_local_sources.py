"""An identified cohort's DICOM are read from its source folder when they still have the
catalogued SHA-256, and downloaded otherwise (ADR 0027)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from services.exporter.plugin import copy_if_unchanged
from shared.sources import LocalSource, Roots, source_key_of


def _source(tmp_path: Path) -> LocalSource:
    root = tmp_path / "source"
    (root / "study").mkdir(parents=True)
    return LocalSource(root, roots=Roots((str(root.resolve()),), ()))


def test_an_unchanged_file_is_copied_and_a_changed_or_missing_one_is_not(tmp_path: Path) -> None:
    source = _source(tmp_path)
    data = b"DICM" * 1000
    (source.root / "study" / "a.dcm").write_bytes(data)
    key = source_key_of(b"study/a.dcm")
    digest = hashlib.sha256(data).hexdigest()
    target = tmp_path / "scratch" / "000000.dcm"
    target.parent.mkdir()
    assert copy_if_unchanged(source, key, target, digest)
    assert target.read_bytes() == data
    target.unlink()
    # changed since ingestion, gone, or a link out of the roots: nothing written
    assert not copy_if_unchanged(source, key, target, "0" * 64)
    assert not copy_if_unchanged(source, source_key_of(b"study/gone.dcm"), target, digest)
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(data)
    (source.root / "study" / "link.dcm").symlink_to(outside)
    assert not copy_if_unchanged(source, source_key_of(b"study/link.dcm"), target, digest)
    assert list(target.parent.iterdir()) == []
