"""Reading a stack's ASL evidence from its DICOM files (headers only, pixels are not read).

Series-level attributes are taken from the first instance, wherever the IOD puts them (top level,
or a shared/per-frame functional group). Volume types are read per instance or per frame and
grouped into volumes the way dcm2niix orders them: one volume per instance (mosaic, or a 3D
single-file volume), else per AcquisitionNumber, else per TemporalPositionIdentifier; in an
enhanced multi-frame object per TemporalPositionIndex (0020,9128). A volume whose parts disagree,
or a grouping that does not give the converted volume count, leaves the types unknown.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from services.exporter.bids.asl import AslEvidence, asl_table

_LABELING_CONTRAST = Tag(0x0018, 0x9250)
_PULSE_TRAIN_DURATION = Tag(0x0018, 0x9258)
_CRUSHER_FLAG = Tag(0x0018, 0x9259)
_CRUSHER_FLOW_LIMIT = Tag(0x0018, 0x925A)
_BOLUS_CUT_OFF_FLAG = Tag(0x0018, 0x925C)
_BOLUS_CUT_OFF_TECHNIQUE = Tag(0x0018, 0x925E)
_BOLUS_CUT_OFF_DELAY = Tag(0x0018, 0x925F)
_TEMPORAL_POSITION_INDEX = Tag(0x0020, 0x9128)


def _walk(ds: Dataset) -> Iterator[Dataset]:
    """`ds` and every dataset nested in its sequences, depth first."""
    yield ds
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk(item)


def _first(ds: Dataset, tag: BaseTag) -> Any:
    for item in _walk(ds):
        if tag in item and item[tag].value not in (None, ""):
            return item[tag].value
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _flag(value: Any) -> bool | None:
    text = str(value or "").strip().upper()
    return True if text == "YES" else False if text == "NO" else None


def _private_value(ds: Dataset, source: Mapping[str, str]) -> Any:
    try:
        block = ds.private_block(int(source["group"], 16), source["creator"])
        return block[int(source["element"], 16)].value
    except KeyError:
        return None


def _type_of(ds: Dataset, source: Mapping[str, Any]) -> str | None:
    """The BIDS volume type one instance or frame records in `source`, `?` for an unknown value."""
    raw = _first(ds, Tag(int(source["tag"], 16))) if "tag" in source else _private_value(ds, source)
    if raw in (None, ""):
        return None
    volume_type: str = source["values"].get(str(raw).strip().upper(), "?")
    return volume_type


def _frames(ds: Dataset) -> list[Dataset]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    return list(per_frame) if per_frame else []


def _volume_groups(headers: Sequence[Dataset], volumes: int) -> list[list[Dataset]] | None:
    """The instances (or frames) of each converted volume, in volume order, if it can be told."""
    if len(headers) == 1 and _frames(headers[0]):
        by_index: dict[int, list[Dataset]] = {}
        for frame in _frames(headers[0]):
            index = _first(frame, _TEMPORAL_POSITION_INDEX)
            if index is None:
                return None
            by_index.setdefault(int(index), []).append(frame)
        groups = [by_index[k] for k in sorted(by_index)]
        return groups if len(groups) == volumes else None
    ordered = sorted(
        headers,
        key=lambda h: (int(h.get("AcquisitionNumber") or 0), int(h.get("InstanceNumber") or 0)),
    )
    if len(ordered) == volumes:
        return [[h] for h in ordered]
    for keyword in ("AcquisitionNumber", "TemporalPositionIdentifier"):
        by_value: dict[int, list[Dataset]] = {}
        for header in ordered:
            value = header.get(keyword)
            if value in (None, ""):
                break
            by_value.setdefault(int(value), []).append(header)
        else:
            if len(by_value) == volumes:
                return [by_value[k] for k in sorted(by_value)]
    return None


def _volume_types(
    headers: Sequence[Dataset], volumes: int
) -> tuple[list[str] | None, str | None, str | None]:
    """(types, the attribute they came from, why they are unknown)."""
    for source in asl_table()["volume_type_sources"]:
        if not any(_type_of(p, source) for p in [headers[0], *_frames(headers[0])[:1]]):
            continue
        groups = _volume_groups(headers, volumes)
        if groups is None:
            return None, source["name"], "cannot group instances/frames into the volumes"
        types: list[str] = []
        for number, group in enumerate(groups, 1):
            # an enhanced object holding one volume: every frame must agree
            parts = [f for part in group for f in (_frames(part) or [part])]
            found = {_type_of(part, source) for part in parts}
            (only,) = found if len(found) == 1 else (None,)
            if only is None or only == "?":
                return None, source["name"], f"volume {number} records {sorted(map(str, found))}"
            types.append(only)
        return types, source["name"], None
    return None, None, None


def read_asl_evidence(files: Sequence[Path], volumes: int) -> AslEvidence:
    """The ASL attributes of a stack's DICOM files, for a conversion with `volumes` volumes."""
    headers = [pydicom.dcmread(path, stop_before_pixels=True, force=True) for path in files]
    if not headers:
        return AslEvidence(volume_types_problem="no DICOM files")
    first = headers[0]
    types, source, problem = _volume_types(headers, volumes)
    return AslEvidence(
        labeling_contrast=(str(_first(first, _LABELING_CONTRAST) or "").strip() or None),
        pulse_train_duration_ms=_number(_first(first, _PULSE_TRAIN_DURATION)),
        crusher=_flag(_first(first, _CRUSHER_FLAG)),
        crusher_flow_limit=_number(_first(first, _CRUSHER_FLOW_LIMIT)),
        bolus_cut_off=_flag(_first(first, _BOLUS_CUT_OFF_FLAG)),
        bolus_cut_off_technique=(
            str(_first(first, _BOLUS_CUT_OFF_TECHNIQUE) or "").strip() or None
        ),
        bolus_cut_off_delay_ms=_number(_first(first, _BOLUS_CUT_OFF_DELAY)),
        volume_types=types,
        volume_types_source=source,
        volume_types_problem=problem,
    )
