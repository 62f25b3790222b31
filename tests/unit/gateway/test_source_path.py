from __future__ import annotations

from pathlib import Path

import pytest

from services.gateway.cohorts.source_path import LocationError, normalize_location


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "study").mkdir(parents=True)
    (tmp_path / "root" / "file.dcm").write_bytes(b"")
    (tmp_path / "outside").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    return tmp_path / "root"


def test_folders_under_a_root_are_resolved(root: Path) -> None:
    assert normalize_location(str(root / "study"), [root]) == str(root / "study")
    assert normalize_location(str(root / "study" / ".." / "study"), [root]) == str(root / "study")
    assert normalize_location(str(root), [root]) == str(root)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("study", "not an absolute path"),
        ("{root}/../outside", "outside the allowed data roots"),
        ("{root}/link", "outside the allowed data roots"),
        ("{root}/missing", "does not exist"),
        ("{root}/file.dcm", "is not a directory"),
        ("/etc", "outside the allowed data roots"),
        ("http://example.org/data", "unsupported scheme"),
        ("s3://", "not a valid s3://"),
        ("s3://Bad_Bucket/x", "not a valid s3://"),
        ("s3://bucket/a/../b", "'..' are not allowed"),
        ("   ", "empty"),
    ],
)
def test_refused_locations(root: Path, value: str, message: str) -> None:
    with pytest.raises(LocationError, match=message.replace("(", r"\(")):
        normalize_location(value.format(root=root), [root])


def test_s3_uris_are_accepted_as_given(root: Path) -> None:
    assert normalize_location("s3://hospital-pacs/2024/ms", [root]) == "s3://hospital-pacs/2024/ms"
    assert normalize_location("s3://hospital-pacs", []) == "s3://hospital-pacs"


def test_without_roots_only_s3_is_allowed(root: Path) -> None:
    with pytest.raises(LocationError, match="only s3:// is allowed"):
        normalize_location(str(root), [])


def test_destinations_need_not_exist_yet(root: Path) -> None:
    target = root / "exports" / "run1"
    assert normalize_location(str(target), [root], must_exist=False) == str(target)
