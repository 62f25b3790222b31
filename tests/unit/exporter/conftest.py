"""Fixtures of the exporter tests."""

from __future__ import annotations

import pytest

from tests.unit.exporter.stacks import StackFactory, real_stack


@pytest.fixture
def make_stack() -> StackFactory:
    """Build an `ExportStack` from a real folder with a hand-given classification."""
    return real_stack
