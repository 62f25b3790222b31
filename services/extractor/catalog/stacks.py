"""Stacks: the images of one series that share per-volume acquisition constants.

A frame's stack key lists, in a fixed order, only values that stay constant over a volume:

    MR  | TE | TI | FA | ECHO | PART | B (derived diffusion maps only) | ORIENT
    CT  | TYPE | ORIENT
    PT  | AC | TYPE | ORIENT
    other modalities | TYPE | ORIENT

TE/TI/FA in ms/degrees, ECHO the echo number, PART the image component (see `image_part`), TYPE the
third ImageType value (AXIAL, LOCALIZER, ...), AC whether PET images are attenuation corrected, ORIENT
the plane (AX, COR, SAG, OBL) of the slice normal. Per-slice values (CT tube current and exposure, slice
location, trigger time, PET frame timing) never enter a key. Numbers are rounded to two decimals with
trailing zeros stripped, so the same data always gives the same key, whatever the order files arrive in.
Why these fields: docs/adr-0009-stack-key.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.catalog import StackSummary
from shared.subjects import catalog_subject_id

from .records import FrameRecord, InstanceRecord

# parts that are derived diffusion images: one volume per b-value, so b splits them
DERIVED_DIFFUSION_PARTS = frozenset({"TRACEW", "ADC", "EADC"})
# a slice normal within ~37 degrees of an axis names that plane; beyond, the plane is oblique
PLANE_COSINE = 0.8
# a b-value below this (s/mm²) is a b0: Philips stores b0 as 0.001..0.004, others round to 5
B0_LIMIT = 50.0


@functools.lru_cache(maxsize=4096)  # the same few TE/TI/FA values, frame after frame
def format_number(value: float) -> str:
    """Fixed rounding (2 decimals) with trailing zeros stripped: 2.460 -> "2.46", 900.0 -> "900"."""
    text = f"{round(value, 2):.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def orientation_label(orientation: list[float]) -> str | None:
    """AX, COR, SAG or OBL from ImageOrientationPatient (row and column direction cosines)."""
    if len(orientation) != 6:
        return None
    r, c = orientation[:3], orientation[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    length = math.sqrt(sum(n * n for n in normal))
    if length == 0:
        return None
    axis = max(range(3), key=lambda i: abs(normal[i]))
    if abs(normal[axis]) / length < PLANE_COSINE:
        return "OBL"
    return ("SAG", "COR", "AX")[axis]


def stack_constants(instance: InstanceRecord, frame: FrameRecord) -> dict[str, Any]:
    """The per-volume constants of one frame, in key order (absent values are left out)."""
    modality = instance.series.modality or "OT"
    constants: dict[str, Any] = {"MOD": modality}
    if modality == "MR":
        _put(constants, "TE", frame.echo_time)
        _put(
            constants, "TI", frame.inversion_time or None
        )  # TI 0 (GE writes it) means no inversion
        _put(constants, "FA", frame.flip_angle)
        if frame.echo_number is not None:
            constants["ECHO"] = frame.echo_number
        if frame.part:
            constants["PART"] = frame.part
        if frame.part in DERIVED_DIFFUSION_PARTS and frame.b_value is not None:
            constants["B"] = _b_class(frame.b_value)
    else:
        if modality == "PT" and instance.pet is not None:
            constants["AC"] = int("ATTN" in (c.upper() for c in instance.pet.corrected_image))
        image_type = frame.image_type or instance.image_type
        if len(image_type) > 2 and image_type[2]:
            constants["TYPE"] = image_type[2].upper()
        elif frame.part:
            constants["PART"] = frame.part
    plane = orientation_label(frame.orientation or instance.image_orientation)
    if plane:
        constants["ORIENT"] = plane
    return constants


def stack_key(constants: dict[str, Any]) -> str:
    """ "MR|TE=2.46|TI=900|FA=9|ECHO=1|PART=M|ORIENT=AX" from `stack_constants` output."""
    parts = [str(constants["MOD"])]
    for name, value in constants.items():
        if name == "MOD":
            continue
        parts.append(f"{name}={format_number(value) if isinstance(value, float) else value}")
    return "|".join(parts)


def _put(constants: dict[str, Any], name: str, value: float | None) -> None:
    if value is not None:
        constants[name] = float(format_number(value))


def _b_class(b_value: float) -> float:
    return 0.0 if b_value < B0_LIMIT else float(round(b_value))


@dataclass(slots=True)
class _Stack:
    """Running aggregate of one (series, stack_key)."""

    constants: dict[str, Any]
    sop_uids: set[str] = field(default_factory=set)
    frame_ids: set[tuple[str, int]] = field(
        default_factory=set
    )  # (SOP instance, frame): adds are idempotent
    n_frames: int = 0
    positions: set[tuple[float, ...]] = field(default_factory=set)
    image_types: set[str] = field(default_factory=set)
    b_values: set[float] = field(default_factory=set)
    directions: set[tuple[float, ...]] = field(default_factory=set)
    acquisition_times: set[str] = field(default_factory=set)
    representative: tuple[Any, ...] | None = None
    representative_instance: InstanceRecord | None = None
    representative_frame: FrameRecord | None = None


@dataclass(slots=True)
class _Series:
    stacks: dict[str, _Stack] = field(default_factory=dict)
    echo_times: set[float] = field(default_factory=set)
    inversion_times: set[float] = field(default_factory=set)
    diffusion_weighted: bool = False
    standard_b: bool = False


class StackBuilder:
    """Builds `StackSummary`s incrementally: add instances in any order, ask for summaries any time.

    The result depends only on the set of instances added, never on their order.
    """

    def __init__(self) -> None:
        self._series: dict[str, _Series] = {}

    def add(self, instance: InstanceRecord) -> None:
        """Add one catalogued image (all its frames)."""
        uid = instance.series.series_instance_uid or ""
        series = self._series.setdefault(uid, _Series())
        if instance.mr is not None and instance.mr.diffusion_b_value is not None:
            series.standard_b = True
        for frame in instance.frames:
            constants = stack_constants(instance, frame)
            key = stack_key(constants)
            stack = series.stacks.get(key)
            if stack is None:
                stack = series.stacks[key] = _Stack(constants)
            self._add_frame(series, stack, instance, frame)

    def add_all(self, instances: Iterable[InstanceRecord]) -> None:
        for instance in instances:
            self.add(instance)

    @staticmethod
    def _add_frame(
        series: _Series, stack: _Stack, instance: InstanceRecord, frame: FrameRecord
    ) -> None:
        sop_uid = instance.sop_instance_uid or instance.source_key
        if (sop_uid, frame.frame) in stack.frame_ids:
            return  # the same object seen twice (a copy in another folder, a re-delivery)
        stack.frame_ids.add((sop_uid, frame.frame))
        stack.sop_uids.add(sop_uid)
        stack.n_frames += 1
        position = frame.position or instance.image_position
        if position:
            stack.positions.add(tuple(round(p, 2) for p in position))
        stack.image_types.update(t for t in (frame.image_type or instance.image_type) if t)
        if frame.echo_time is not None:
            series.echo_times.add(float(format_number(frame.echo_time)))
        if frame.inversion_time is not None:
            series.inversion_times.add(float(format_number(frame.inversion_time)))
        if frame.b_value is not None:
            b_class = _b_class(frame.b_value)
            stack.b_values.add(b_class)
            if b_class > 0:
                series.diffusion_weighted = True
                if frame.gradient and any(abs(g) > 1e-6 for g in frame.gradient):
                    stack.directions.add(tuple(round(g, 3) + 0.0 for g in frame.gradient))
        if frame.acquisition_time:
            stack.acquisition_times.add(frame.acquisition_time)
        rank = (
            instance.instance_number if instance.instance_number is not None else math.inf,
            tuple(position or ()),
            instance.sop_instance_uid or "",
            frame.frame,
        )
        if stack.representative is None or rank < stack.representative:
            stack.representative = rank
            stack.representative_instance = instance
            stack.representative_frame = frame

    def representatives(self) -> dict[tuple[str, str], str]:
        """(series UID, stack key) -> SOP Instance UID of the stack's representative instance.

        For rebuilding from stored rows without their headers: fetch just these headers and pass
        them to `summaries(headers=...)`.
        """
        return {
            (series_uid, key): _representative_uid(stack)
            for series_uid, series in self._series.items()
            for key, stack in series.stacks.items()
        }

    def summaries(self, headers: Mapping[str, dict[str, Any]] | None = None) -> list[StackSummary]:
        """All stacks, sorted by series UID then stack key.

        The representative's own header is used when its record has one; otherwise `headers`
        (SOP Instance UID -> DICOM JSON) supplies it.
        """
        out: list[StackSummary] = []
        for series_uid in sorted(self._series):
            series = self._series[series_uid]
            for key in sorted(series.stacks):
                stack = series.stacks[key]
                summary = _summary(key, stack, series)
                if not summary.header and headers is not None:
                    summary.header = headers.get(_representative_uid(stack), {})
                out.append(summary)
        return out


def frame_stack_keys(instance: InstanceRecord) -> list[tuple[int, str]]:
    """(frame number, stack key) for every frame of an instance: which stack each image belongs to.

    A classic file gives one pair; an Enhanced file can give several keys (magnitude and phase, echoes).
    """
    return [(frame.frame, stack_key(stack_constants(instance, frame))) for frame in instance.frames]


def _representative_uid(stack: _Stack) -> str:
    instance = stack.representative_instance
    assert instance is not None  # a stack exists only once a frame was added
    return instance.sop_instance_uid or instance.source_key


def build_stacks(instances: Iterable[InstanceRecord]) -> list[StackSummary]:
    """Group images into stacks by series and per-volume constants; one summary per stack."""
    builder = StackBuilder()
    builder.add_all(instances)
    return builder.summaries()


def _summary(key: str, stack: _Stack, series: _Series) -> StackSummary:
    instance = stack.representative_instance
    frame = stack.representative_frame
    assert instance is not None and frame is not None  # a stack exists only once a frame was added
    n_positions = len(stack.positions) or 1
    show_b = series.diffusion_weighted or series.standard_b
    acquisition_times = sorted(stack.acquisition_times)
    return StackSummary(
        subject_id=catalog_subject_id(
            instance.subject.patient_id, instance.study.study_instance_uid or ""
        ),
        study_instance_uid=instance.study.study_instance_uid or "",
        series_instance_uid=instance.series.series_instance_uid or "",
        stack_key=key,
        constants={name: value for name, value in stack.constants.items() if name != "MOD"},
        modality=instance.series.modality or "",
        sop_class_uid=instance.sop_class_uid or "",
        manufacturer=instance.series.manufacturer or "",
        manufacturer_model=instance.series.manufacturer_model or "",
        series_number=instance.series.series_number,
        series_description=instance.series.series_description or "",
        protocol_name=instance.series.protocol_name or "",
        study_date=instance.study.study_date,
        acquisition_time=acquisition_times[0] if acquisition_times else None,
        n_instances=len(stack.sop_uids),
        sop_instance_uids=sorted(stack.sop_uids),
        n_frames=stack.n_frames,
        n_slices=len(stack.positions) * (instance.mosaic_slices or 1),
        n_volumes=max(stack.n_frames // n_positions, 1),
        rows=instance.rows,
        columns=instance.columns,
        pixel_spacing=list(instance.pixel_spacing),
        slice_thickness=instance.slice_thickness,
        image_orientation=list(frame.orientation or instance.image_orientation),
        image_types=sorted(stack.image_types),
        echo_times=sorted(series.echo_times),
        inversion_times=sorted(series.inversion_times),
        b_values=sorted(stack.b_values) if show_b else [],
        n_diffusion_directions=len(stack.directions),
        header=instance.header,
    )
