"""JSON sidecars: the converter's sidecar plus what BIDS requires and a converter cannot know.

dcm2niix writes most keys (EchoTime, RepetitionTime, PhaseEncodingDirection, SliceTiming, ...). The
exporter adds `TaskName` for functional runs (BIDS REQUIRED; the `task-` label when no better name
is given), `Units` for field maps in Hz and for phase images (`arbitrary`), the field-map links
(`IntendedFor`, `B0FieldIdentifier`, `B0FieldSource`) and drops keys that only describe the
converter's guesses (`BidsGuess`). What is still missing is reported by `missing_required`, never
invented.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from typing import Any

_FUNC_SUFFIXES = frozenset({"bold", "cbv", "sbref", "phase"})


@lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        resources.files(__package__).joinpath("sidecar_required.json").read_text("utf-8")
    )
    return data


def build_sidecar(
    converted: Mapping[str, Any] | None,
    *,
    datatype: str,
    suffix: str,
    entities: Mapping[str, str],
    task_name: str | None = None,
) -> dict[str, Any]:
    """The sidecar to write next to an image, from the converter's sidecar (`None` if none)."""
    sidecar = {k: v for k, v in (converted or {}).items() if k not in _table()["drop"]}
    if datatype == "func" and suffix in _FUNC_SUFFIXES:
        label = entities.get("task")
        name = task_name or label
        if name:
            sidecar["TaskName"] = name
    if suffix == "fieldmap" and "Units" not in sidecar:
        sidecar["Units"] = "Hz"  # dcm2niix writes field maps (GE, Philips _fieldmaphz) in Hz
    if entities.get("part") == "phase" and "Units" not in sidecar:
        # REQUIRED for part-phase images: "rad" or "arbitrary"; dcm2niix keeps the scanner's
        # integer phase (e.g. -4096..4095), so it is not radians
        sidecar["Units"] = "arbitrary"
    return sidecar


def missing_required(sidecar: Mapping[str, Any], suffix: str) -> list[str]:
    """REQUIRED keys of `suffix` that the sidecar lacks (reported on the export item), including
    those another key makes required (`LabelingDuration` for PCASL, `SliceTiming` for 2D ASL)."""
    required: list[str] = list(_table()["required"].get(suffix, []))
    for rule in _table()["required_when"]:
        if suffix in rule["suffixes"] and all(
            sidecar.get(key) in values for key, values in rule["when"].items()
        ):
            required += [key for key in rule["require"] if key not in required]
    return [key for key in required if key not in sidecar]


def needs_time_series(suffix: str) -> bool:
    """True for suffixes BIDS defines as 4D time series (bold, cbv, asl): a 3D image is invalid."""
    return suffix in _table()["time_series"]


def slice_normal(orientation: list[float]) -> tuple[float, float, float] | None:
    """The unit slice normal from ImageOrientationPatient (0020,0037): row x column direction cosines."""
    if len(orientation) != 6:
        return None
    r, c = orientation[:3], orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    length = sum(v * v for v in n) ** 0.5
    return (n[0] / length, n[1] / length, n[2] / length) if length > 0 else None
