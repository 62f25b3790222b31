"""Shared fixtures for the extraction core: the team's real DICOM, parsed once per session
(`parsed` and `shared_files` come from `tests/unit/conftest.py`)."""

from __future__ import annotations

import pytest

from services.extractor.catalog import InstanceRecord, Rejection


@pytest.fixture(scope="session")
def instances(parsed: dict[str, InstanceRecord | Rejection]) -> list[InstanceRecord]:
    return [r for r in parsed.values() if isinstance(r, InstanceRecord)]


@pytest.fixture(scope="session")
def rejections(parsed: dict[str, InstanceRecord | Rejection]) -> dict[str, Rejection]:
    return {key: r for key, r in parsed.items() if isinstance(r, Rejection)}
