"""The source resolver (shared/sources.py) on real folders in tmp_path: what is listed, what is
rejected with which reason, what may be read, and which locations a cohort may name."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from shared.settings import BROKER_BUCKET, Settings
from shared.sources import (
    LocalSource,
    SourceError,
    check_destination,
    check_location,
    in_place_key,
    in_place_locator,
    open_source,
    read_catalogued,
    readable_in_place,
    source_key_of,
    source_name_of,
)


def settings(root: Path, home: Path | None = None, s3: list[str] | None = None) -> Settings:
    return Settings(data_roots=[root], home=home or root.parent / "state", s3_sources=s3 or [])


@pytest.mark.parametrize(
    "name",
    [b"plain/a.dcm", b"caf\xc3\xa9", b"bad\xff\xfename", b"100%", b"%FF literal", b"\xc3", b"%41"],
)
def test_keys_are_text_and_round_trip(name: bytes) -> None:
    key = source_key_of(name)
    key.encode("utf-8")  # valid text: JSON, Postgres and object keys take it
    assert source_name_of(key) == name


def test_distinct_names_get_distinct_keys() -> None:
    names = [b"\xff", b"%FF", b"%\xff", b"%%FF", b"%25"]
    assert len({source_key_of(n) for n in names}) == len(names)
    assert source_key_of(b"ordinary name.dcm") == "ordinary name.dcm"


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """(data root, cohort folder) with one of each kind of hostile entry."""
    root = tmp_path / "data"
    cohort = root / "cohort"
    (cohort / "sub").mkdir(parents=True)
    (cohort / "sub" / "a.dcm").write_bytes(b"A")
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "b.dcm").write_bytes(b"BB")
    (cohort / "inside").symlink_to(root / "elsewhere", target_is_directory=True)
    (cohort / "etc").symlink_to("/etc", target_is_directory=True)
    (cohort / "passwd").symlink_to("/etc/passwd")
    (cohort / "self").symlink_to(cohort / "self")
    (cohort / "dangling").symlink_to(cohort / "missing")
    (cohort / "sub" / "up").symlink_to(cohort, target_is_directory=True)
    os.mkfifo(cohort / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(cohort / "sock"))
    sock.close()
    (cohort / os.fsdecode(b"caf\xe9.dcm")).write_bytes(b"CCC")
    return root, cohort


def test_listing_rejects_every_entry_it_does_not_read(tree: tuple[Path, Path]) -> None:
    root, cohort = tree
    source = open_source(str(cohort), settings(root))
    listed = {f.key: f for f in source.list()}
    read = {k for k, f in listed.items() if f.rejected is None}
    assert read == {"sub/a.dcm", "inside/b.dcm", "caf%E9.dcm"}
    reasons = {k: f.rejected for k, f in listed.items() if f.rejected is not None}
    assert reasons == {
        "etc": "a link that leads outside the allowed data roots",
        "passwd": "a link that leads outside the allowed data roots",
        "self": "a link that loops (it leads back to itself)",
        "dangling": "a dangling link (its target does not exist)",
        "sub/up": "a link to one of its own parent folders (it would loop)",
        "fifo": "not a regular file: a FIFO (named pipe)",
        "sock": "not a regular file: a socket",
    }
    assert listed["inside/b.dcm"].size == 2
    assert source.read("caf%E9.dcm") == b"CCC"
    assert source.read("inside/b.dcm") == b"BB"


def test_reading_refuses_what_listing_would_reject(tree: tuple[Path, Path]) -> None:
    root, cohort = tree
    source = open_source(str(cohort), settings(root))
    for key in ("etc/passwd", "passwd", "../elsewhere/b.dcm", "self"):
        with pytest.raises((SourceError, OSError)):
            source.read(key)
    # a file swapped for a link out of the roots after it was listed is not read
    (cohort / "sub" / "a.dcm").unlink()
    (cohort / "sub" / "a.dcm").symlink_to("/etc/hostname")
    with pytest.raises(SourceError, match="outside the allowed data roots"):
        source.read("sub/a.dcm")


def test_a_fifo_never_blocks_a_read(tree: tuple[Path, Path]) -> None:
    root, cohort = tree
    source = open_source(str(cohort), settings(root))
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            source.read("fifo")
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert isinstance(outcome[0], SourceError) and "FIFO" in str(outcome[0])


def test_roots_bound_a_source_with_no_roots_given(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "out").symlink_to(tmp_path, target_is_directory=True)
    listed = list(LocalSource(tmp_path / "c").list())
    assert [(f.key, f.rejected) for f in listed] == [
        ("out", "a link that leads outside the allowed data roots")
    ]


def test_local_locations(tree: tuple[Path, Path], tmp_path: Path) -> None:
    root, cohort = tree
    s = settings(root)
    assert check_location(str(cohort), s) == str(cohort.resolve())
    assert check_location(str(cohort / "inside"), s) == str((root / "elsewhere").resolve())
    with pytest.raises(SourceError, match="outside the allowed data roots"):
        check_location(str(cohort / "etc"), s)
    with pytest.raises(SourceError, match="outside the allowed data roots"):
        check_location("/", s)
    # the stack's own state (database, object and broker files) is never a source
    state = root / "state"
    (state / "s3" / "cohortflow").mkdir(parents=True)
    with pytest.raises(SourceError, match="own state folder"):
        check_location(str(state / "s3" / "cohortflow"), settings(root, home=state))


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("s3://cohortflow/raw/0b7a", "system's own buckets"),
        ("s3://cohortflow", "system's own buckets"),
        ("s3://cohortflow-audit", "system's own buckets"),
        (f"s3://{BROKER_BUCKET}/clusters", "system's own buckets"),
        ("s3://pacs/2025", "not under an allowed S3 source"),
        ("s3://other", "not under an allowed S3 source"),
        ("s3://pacs/2024ms", "not under an allowed S3 source"),
        ("s3://pacs/2024/../2025", "'..'"),
        ("s3://", "bucket"),
    ],
)
def test_s3_locations_refused(tmp_path: Path, location: str, message: str) -> None:
    s = settings(tmp_path, s3=["s3://pacs/2024", "s3://cohortflow", "s3://whole"])
    with pytest.raises(SourceError, match=message):
        check_location(location, s)


def test_s3_locations_allowed(tmp_path: Path) -> None:
    s = settings(tmp_path, s3=["s3://pacs/2024", "s3://whole"])
    assert check_location("s3://pacs/2024", s) == "s3://pacs/2024"
    assert check_location("s3://pacs/2024/ms/", s) == "s3://pacs/2024/ms"
    assert check_location("s3://whole/any/prefix", s) == "s3://whole/any/prefix"


def test_s3_sources_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COHORTFLOW_S3_SOURCES", "s3://pacs/2024/, s3://whole")
    assert Settings().s3_sources == ["s3://pacs/2024", "s3://whole"]
    monkeypatch.setenv("COHORTFLOW_S3_SOURCES", "/data")
    with pytest.raises(ValueError, match="s3://bucket"):
        Settings()


def test_destinations_are_never_the_systems_own_buckets(tmp_path: Path) -> None:
    s = settings(tmp_path)
    assert check_destination("s3://exports/a", s) == "s3://exports/a"
    for own in ("s3://cohortflow/export/x", "s3://cohortflow-audit", f"s3://{BROKER_BUCKET}"):
        with pytest.raises(SourceError, match="own buckets"):
            check_destination(own, s)


def test_a_study_folder_is_keyed_within_its_cohort(tmp_path: Path) -> None:
    """Two studies that both hold IM0001 never share a key: inside the cohort's source a study's
    files are keyed as a whole-cohort run keys them, outside it under a prefix of their own."""
    root = tmp_path / "data"
    cohort = root / "incoming"
    for study, content in (("s1", b"one"), ("s2", b"two")):
        (cohort / study).mkdir(parents=True)
        (cohort / study / "IM0001").write_bytes(content)
    (root / "elsewhere" / "s3").mkdir(parents=True)
    (root / "elsewhere" / "s3" / "IM0001").write_bytes(b"three")
    env = settings(root)

    whole = {f.key for f in open_source(str(cohort), env, within=str(cohort)).list()}
    assert whole == {"s1/IM0001", "s2/IM0001"}
    inside = open_source(str(cohort / "s2"), env, within=str(cohort))
    assert [f.key for f in inside.list()] == ["s2/IM0001"]
    assert inside.location == str(cohort)  # reopened there, the key reads the same file
    assert open_source(inside.location, env).read("s2/IM0001") == b"two"

    outside = open_source(str(root / "elsewhere" / "s3"), env, within=str(cohort))
    [key] = [f.key for f in outside.list()]
    assert key.startswith("@") and key.endswith("/IM0001") and key not in whole
    again = open_source(outside.location, env, within=str(cohort))
    assert again.read(key) == b"three"
    with again.open(key) as fh:
        assert fh.read() == b"three"
    with pytest.raises(SourceError):
        again.read("IM0001")
    # without a cohort to be within, a folder is its own source, as before
    assert [f.key for f in open_source(str(cohort / "s1"), env).list()] == ["IM0001"]


def test_what_can_be_catalogued_in_place(tmp_path: Path) -> None:
    """A cohort's folder and a study inside it are read again through the cohort's folder at
    their keys (ADR 0035); a study outside it and an s3:// source are copied instead."""
    root = tmp_path / "data"
    cohort = root / "incoming"
    (cohort / "s1").mkdir(parents=True)
    (cohort / "s1" / "IM0001").write_bytes(b"one")
    (root / "elsewhere").mkdir()
    env = settings(root, s3=["s3://pacs"])
    assert readable_in_place(open_source(str(cohort), env))
    assert readable_in_place(open_source(str(cohort / "s1"), env, within=str(cohort)))
    assert not readable_in_place(open_source(str(root / "elsewhere"), env, within=str(cohort)))
    assert not readable_in_place(open_source("s3://pacs/in", env))


def test_a_file_catalogued_in_place_is_read_only_while_unchanged(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "cohort" / "s1").mkdir(parents=True)
    path = root / "cohort" / "s1" / "IM0001"
    path.write_bytes(b"one")
    env = settings(root)
    locator = in_place_locator("s1/IM0001")
    assert in_place_key(locator) == "s1/IM0001" and in_place_key("raw/c/s1/IM0001") is None
    digest = hashlib.sha256(b"one").hexdigest()
    store: Any = None  # an in-place file never touches object storage
    assert read_catalogued(store, locator, digest, str(root / "cohort"), env) == b"one"
    path.write_bytes(b"two")
    with pytest.raises(SourceError, match="changed since it was catalogued"):
        read_catalogued(store, locator, digest, str(root / "cohort"), env)
    with pytest.raises(SourceError, match="not a local folder here"):
        read_catalogued(store, locator, digest, "s3://pacs/in", settings(root, s3=["s3://pacs"]))
    path.unlink()
    with pytest.raises(OSError):
        read_catalogued(store, locator, digest, str(root / "cohort"), env)


@pytest.mark.parametrize(
    ("base", "location", "relative"),
    [
        ("/data/in", "/data/in/s1", "s1"),
        ("/data/in", "/data/in/a/b", "a/b"),
        ("/data/in", "/data/in", None),
        ("/data/in", "/data/inbox/s1", None),
        ("s3://b/in", "s3://b/in/s1", "s1"),
        ("s3://b", "s3://b/s1", "s1"),
        ("s3://b/in", "s3://c/in/s1", None),
        ("/data/in", "s3://b/in/s1", None),
    ],
)
def test_where_a_study_lies_relative_to_its_cohort(
    base: str, location: str, relative: str | None
) -> None:
    from shared.sources import _relative

    assert _relative(base, location) == relative
