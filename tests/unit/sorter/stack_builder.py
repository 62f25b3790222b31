"""Test-side stand-in for the extractor: real DICOM files -> `StackSummary` records.

Groups a series' files into stacks by per-volume constants (echo time, ImageType component,
orientation, GE private image kind; Enhanced objects by FrameType / ComplexImageComponent / TE per
frame) and fills the aggregates the sorter reads. It reads headers only. The real extractor replaces
it later; the sorter tests only need the same contract (`shared.catalog.StackSummary`).
"""

from __future__ import annotations

import functools
import gzip
import io
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from services.sorter.rules.fingerprint import orientation_label
from shared.catalog import StackSummary

_COMPONENTS = {
    "M",
    "P",
    "R",
    "I",
    "MAGNITUDE",
    "PHASE",
    "REAL",
    "IMAGINARY",
    "FIELD_MAP",
    "B0",
    "B0 MAP",
    "ADC",
    "FA",
    "TRACEW",
    "DIFFUSION",
    "UNI",
    "T1 MAP",
}
_PRIVATE_B = {"siemens": (0x0019, 0x100C), "philips": (0x2001, 0x1003), "ge": (0x0043, 0x1039)}


def read_header(path: Path) -> Dataset | None:
    """Headers of DICOM files (gzip allowed); None for files that are not DICOM or are DICOMDIRs."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True, force=True)
    except Exception:
        return None
    if "SOPClassUID" not in ds and "Modality" not in ds:
        return None
    if str(ds.get("SOPClassUID", "")) == "1.2.840.10008.1.3.10":  # media storage directory
        return None
    return ds


def _header_json(ds: Dataset) -> dict[str, Any]:
    return ds.to_json_dict(
        bulk_data_threshold=4096,
        bulk_data_element_handler=lambda _el: "",
        suppress_invalid_tags=True,
    )


def _vendor_word(ds: Dataset) -> str:
    name = str(ds.get("Manufacturer", "")).lower()
    for vendor in ("siemens", "philips", "ge ", "toshiba", "canon"):
        if name.startswith(vendor.strip()) or vendor in name + " ":
            return vendor.strip()
    return ""


def _b_value(ds: Dataset) -> float | None:
    if "DiffusionBValue" in ds:
        return float(ds.DiffusionBValue)
    tag = _PRIVATE_B.get(_vendor_word(ds))
    if tag and tag in ds:
        value = ds[tag].value
        value = value[0] if isinstance(value, list | pydicom.multival.MultiValue) else value
        try:
            number = float(value.decode() if isinstance(value, bytes) else value)
        except (TypeError, ValueError):
            return None
        return number % 1e9 if number >= 1e9 else number
    return None


def _direction(ds: Dataset) -> tuple[float, ...] | None:
    for tag in ((0x0018, 0x9089), (0x0019, 0x100E)):
        if tag in ds:
            try:
                return tuple(round(float(v), 3) for v in ds[tag].value)
            except (TypeError, ValueError):
                return None
    if (0x2005, 0x10B0) in ds:
        return tuple(round(float(ds[(0x2005, t)].value), 3) for t in (0x10B0, 0x10B1, 0x10B2))
    return None


def _component(image_type: Iterable[str]) -> str:
    values = [str(v).upper() for v in image_type]
    return "\\".join(v for v in values[2:] if v in _COMPONENTS)


def _classic_key(ds: Dataset) -> tuple[Any, ...]:
    te = round(float(ds.get("EchoTime") or 0), 3)
    ti = round(float(ds.get("InversionTime") or 0), 1)
    # GE private image kind: (0043,102F) magnitude/phase/real/imaginary; in B0map series (0043,1030)
    # separates the field map from its magnitude
    ge_kind = tuple(str(ds[tag].value) for tag in ((0x0043, 0x102F), (0x0043, 0x1030)) if tag in ds)
    iop = [float(v) for v in ds.get("ImageOrientationPatient", [])]
    return (te, ti, _component(ds.get("ImageType", [])), orientation_label(iop), str(ge_kind))


def _stack_from_classic(series: list[Dataset], files: list[Dataset]) -> StackSummary:
    files = sorted(files, key=lambda d: int(d.get("InstanceNumber") or 0))
    rep = files[0]
    positions = {
        tuple(round(float(v), 2) for v in d.get("ImagePositionPatient", [])) for d in files
    }
    n_slices = max(1, len(positions))
    mosaic = "MOSAIC" in [str(v).upper() for v in rep.get("ImageType", [])]
    n_volumes = len(files) if mosaic else max(1, len(files) // n_slices)
    b_values = sorted({b for b in (_b_value(d) for d in series) if b is not None})
    directions = {d for d in (_direction(f) for f in series) if d and any(abs(x) > 0 for x in d)}
    image_types = sorted({"\\".join(d.get("ImageType", [])) for d in files} - {""})
    te = rep.get("EchoTime")
    constants = {
        "TE": float(te) if te not in (None, "") else None,
        "ECHO": int(rep.get("EchoNumbers") or 0) or None,
        # GE private image kind (see _classic_key): keeps B0 map and magnitude stacks apart
        "GE_KIND": ".".join(
            str(rep[tag].value) for tag in ((0x0043, 0x102F), (0x0043, 0x1030)) if tag in rep
        )
        or None,
    }
    return _summary(
        rep, series, files, constants, n_slices, n_volumes, b_values, len(directions), image_types
    )


def _summary(
    rep: Dataset,
    series: list[Dataset],
    files: list[Dataset],
    constants: dict[str, Any],
    n_slices: int,
    n_volumes: int,
    b_values: list[float],
    n_dirs: int,
    image_types: list[str],
    header: dict[str, Any] | None = None,
) -> StackSummary:
    modality = str(rep.get("Modality", ""))
    key_parts = [modality] + [f"{k}={v}" for k, v in constants.items() if v not in (None, "")]
    echo_times = sorted(
        {round(float(d.EchoTime), 3) for d in series if d.get("EchoTime") not in (None, "")}
    )
    tis = sorted(
        {float(d.InversionTime) for d in series if d.get("InversionTime") not in (None, "")} - {0.0}
    )
    return StackSummary(
        subject_id=str(rep.get("PatientID", "")),
        study_instance_uid=str(rep.get("StudyInstanceUID", "")),
        series_instance_uid=str(rep.get("SeriesInstanceUID", "")),
        stack_key="|".join(key_parts),
        constants=constants,
        modality=modality,
        sop_class_uid=str(rep.get("SOPClassUID", "")),
        manufacturer=str(rep.get("Manufacturer", "")),
        manufacturer_model=str(rep.get("ManufacturerModelName", "")),
        series_number=int(rep.get("SeriesNumber") or 0) or None,
        series_description=str(rep.get("SeriesDescription", "") or ""),
        protocol_name=str(rep.get("ProtocolName", "") or ""),
        study_date=str(rep.get("StudyDate", "")) or None,
        n_instances=len(files),
        n_frames=sum(int(d.get("NumberOfFrames") or 1) for d in files),
        n_slices=n_slices,
        n_volumes=n_volumes,
        rows=int(rep.get("Rows") or 0) or None,
        columns=int(rep.get("Columns") or 0) or None,
        image_types=image_types,
        echo_times=echo_times,
        inversion_times=tis,
        b_values=b_values,
        n_diffusion_directions=n_dirs,
        header=header if header is not None else _header_json(rep),
    )


def _stacks_from_enhanced(files: list[Dataset]) -> list[StackSummary]:
    files = sorted(files, key=lambda d: int(d.get("InstanceNumber") or 0))
    ds = files[0]
    frames = [frame for f in files for frame in f.PerFrameFunctionalGroupsSequence]
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    echo_times: set[float] = set()
    for index, frame in enumerate(frames):
        ftype = (
            frame.MRImageFrameTypeSequence[0] if "MRImageFrameTypeSequence" in frame else Dataset()
        )
        te = (
            round(float(frame.MREchoSequence[0].EffectiveEchoTime), 3)
            if "MREchoSequence" in frame
            else None
        )
        if te:
            echo_times.add(te)
        key = (tuple(ftype.get("FrameType", [])), ftype.get("ComplexImageComponent"), te)
        groups[key].append(index)
    stacks = []
    whole = _header_json(ds)  # once per file: its per-frame sequence alone holds every frame
    for (frame_type, component, te), indices in groups.items():
        # the stack's header keeps one item of the sequence: the stack's first frame
        frame = frames[indices[0]].to_json_dict(4096, lambda _el: "", suppress_invalid_tags=True)
        header = {**whole, "52009230": {**whole["52009230"], "Value": [frame]}}
        positions = set()
        b_values = set()
        directions = set()
        for i in indices:
            frame = frames[i]
            if "PlanePositionSequence" in frame:
                positions.add(
                    tuple(
                        round(float(v), 2)
                        for v in frame.PlanePositionSequence[0].ImagePositionPatient
                    )
                )
            if "MRDiffusionSequence" in frame:
                diff = frame.MRDiffusionSequence[0]
                if "DiffusionBValue" in diff:
                    b_values.add(float(diff.DiffusionBValue))
                seq = diff.get("DiffusionGradientDirectionSequence")
                if seq:
                    directions.add(
                        tuple(round(float(v), 3) for v in seq[0].DiffusionGradientOrientation)
                    )
        n_slices = max(1, len(positions))
        constants = {"TE": te, "PART": component or None}
        stack = _summary(
            ds,
            files,
            files,
            constants,
            n_slices,
            max(1, len(indices) // n_slices),
            sorted(b_values),
            len(directions),
            ["\\".join(frame_type)],
            header,
        )
        stack.echo_times = sorted(echo_times)
        stack.n_frames = len(indices)
        stacks.append(stack)
    return stacks


def build_stacks(paths: Iterable[Path]) -> list[StackSummary]:
    """StackSummary records for a set of files (any mix of series), the caller's own copies."""
    return [stack.model_copy(deep=True) for stack in _built(tuple(sorted(paths)))]


@functools.cache
def _built(paths: tuple[Path, ...]) -> tuple[StackSummary, ...]:
    # built once per set of files: the labelled set and several sorter tests read the same folders
    series: dict[str, list[Dataset]] = defaultdict(list)
    enhanced: dict[str, list[Dataset]] = defaultdict(list)
    stacks: list[StackSummary] = []
    for path in paths:
        if not path.is_file():
            continue
        ds = read_header(path)
        if ds is None:
            continue
        if (
            "PerFrameFunctionalGroupsSequence" in ds
            and "MRImageFrameTypeSequence" in ds.PerFrameFunctionalGroupsSequence[0]
        ):
            enhanced[str(ds.get("SeriesInstanceUID", path))].append(ds)
            continue
        series[str(ds.get("SeriesInstanceUID", path))].append(ds)
    for files in enhanced.values():
        stacks.extend(_stacks_from_enhanced(files))
    for files in series.values():
        by_key: dict[tuple[Any, ...], list[Dataset]] = defaultdict(list)
        for ds in files:
            by_key[_classic_key(ds)].append(ds)
        for group in by_key.values():
            stacks.append(_stack_from_classic(files, group))
    return tuple(stacks)
