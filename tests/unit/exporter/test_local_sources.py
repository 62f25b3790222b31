"""An identified cohort's DICOM are taken from its source folder when they still have the
catalogued SHA-256 (hard linked where possible, else copied), and downloaded otherwise
(ADR 0027, ADR 0030)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from services.exporter.convert.stack import convert_stack, sole_folder
from services.exporter.plugin import take_if_unchanged
from shared.sources import LocalSource, Roots, source_key_of

DATA = b"DICM" * 1000
DIGEST = hashlib.sha256(DATA).hexdigest()
KEY = source_key_of(b"study/a.dcm")


def _source(tmp_path: Path) -> LocalSource:
    root = tmp_path / "source"
    (root / "study").mkdir(parents=True)
    (root / "study" / "a.dcm").write_bytes(DATA)
    return LocalSource(root, roots=Roots((str(root.resolve()),), ()))


def test_an_unchanged_file_is_taken_and_a_changed_or_missing_one_is_not(tmp_path: Path) -> None:
    source = _source(tmp_path)
    target = tmp_path / "scratch" / "000000.dcm"
    target.parent.mkdir()
    taken = take_if_unchanged(source, KEY, target, DIGEST)
    assert taken is not None and taken.unchanged()
    assert taken.identity is not None  # same file system: linked, not copied
    assert os.stat(target).st_ino == os.stat(source.root / "study" / "a.dcm").st_ino
    assert target.read_bytes() == DATA
    target.unlink()
    # changed since ingestion, gone, or a link out of the roots: nothing written
    assert take_if_unchanged(source, KEY, target, "0" * 64) is None
    assert take_if_unchanged(source, source_key_of(b"study/gone.dcm"), target, DIGEST) is None
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(DATA)
    (source.root / "study" / "link.dcm").symlink_to(outside)
    assert take_if_unchanged(source, source_key_of(b"study/link.dcm"), target, DIGEST) is None
    assert list(target.parent.iterdir()) == []


def test_a_file_that_cannot_be_linked_is_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _source(tmp_path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    target = tmp_path / "000000.dcm"
    taken = take_if_unchanged(source, KEY, target, DIGEST)
    assert taken is not None and taken.identity is None and taken.unchanged()
    assert target.read_bytes() == DATA and os.stat(target).st_nlink == 1
    target.unlink()
    assert take_if_unchanged(source, KEY, target, "0" * 64) is None
    assert not target.exists()


def test_a_linked_file_written_after_its_check_is_noticed(tmp_path: Path) -> None:
    source = _source(tmp_path)
    path = source.root / "study" / "a.dcm"
    target = tmp_path / "000000.dcm"
    taken = take_if_unchanged(source, KEY, target, DIGEST)
    assert taken is not None
    with path.open("r+b") as fh:  # written in place, same size
        fh.write(b"XXXX")
    assert not taken.unchanged()
    target.unlink()
    path.write_bytes(DATA)
    taken = take_if_unchanged(source, KEY, target, DIGEST)
    assert taken is not None
    replacement = path.with_name("new.dcm")
    replacement.write_bytes(b"other")
    # replaced by a rename: the link still holds the checked bytes, but the inode lost a name
    # (its ctime moves), so this counts as a change too: the item is tried again
    replacement.replace(path)
    assert target.read_bytes() == DATA and not taken.unchanged()


def test_linked_files_are_converted_where_they_are_and_stay_unchanged(
    tmp_path: Path, dicom_root: Path
) -> None:
    """The scratch folder holding exactly the stack's links is converted as it is: no second
    link moves the sources' ctime, and the output is the one of plain copies."""
    series = sorted((dicom_root / "dcm_qa_nih" / "In" / "20180918Si" / "mr_0003").iterdir())
    root = tmp_path / "source"
    root.mkdir()
    for path in series:
        shutil.copyfile(path, root / path.name)
    source = LocalSource(root, roots=Roots((str(root.resolve()),), ()))
    scratch = tmp_path / "dicom"
    scratch.mkdir()
    taken = []
    for index, path in enumerate(series):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        placed = take_if_unchanged(
            source, source_key_of(path.name.encode()), scratch / f"{index:06d}.dcm", digest
        )
        assert placed is not None and placed.identity is not None
        taken.append(placed)
    files = [t.path for t in taken]
    assert sole_folder(files) == scratch
    linked = convert_stack(files, tmp_path / "linked", "image", True)
    assert all(t.unchanged() for t in taken)
    copied = convert_stack(series, tmp_path / "copied", "image", True)
    assert [p.read_bytes() for _, p in linked.images[0].files()] == [
        p.read_bytes() for _, p in copied.images[0].files()
    ]
