"""`cohortflow run` starts without loading what only the services or other commands need: its
imports are part of every run's time before the first stage."""

from __future__ import annotations

import subprocess
import sys

import pytest

import services.extractor.catalog as catalog

# each costs 0.1-0.3 s of start-up and is not needed to check a folder and follow a run
NOT_AT_START = ("pydicom", "openpyxl", "msoffcrypto", "fastapi", "yaml")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.partition(".")[0] for name in out.stdout.split()}


def test_the_command_line_loads_no_service_only_library() -> None:
    loaded = _loaded_after("import cohortflow.cli")
    assert not loaded & set(NOT_AT_START)


def test_sniffing_for_dicom_does_not_load_the_parser() -> None:
    assert "pydicom" not in _loaded_after("from services.extractor.catalog import sniff")


@pytest.mark.parametrize("name", catalog.__all__)
def test_every_public_name_of_the_catalog_core_loads(name: str) -> None:
    assert getattr(catalog, name) is not None


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        _ = catalog.no_such_name  # type: ignore[attr-defined]
