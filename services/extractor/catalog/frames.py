"""Frame records: the per-image values that decide stacks and geometry.

A classic file is one frame; its values come from the top-level attributes. An Enhanced multi-frame
object (Enhanced MR/CT/PET, Legacy Converted) keeps per-frame values in the Per-frame Functional Groups
Sequence (5200,9230), one item per frame, over defaults in the Shared Functional Groups Sequence
(5200,9229). Each item holds macros (one-item sequences):
- MR Echo (0018,9114): EffectiveEchoTime (0018,9082)
- MR Modifier (0018,9115): InversionTimes (0018,9079)
- MR Timing and Related Parameters (0018,9112): FlipAngle (0018,1314)
- MR Diffusion (0018,9117): DiffusionBValue (0018,9087), DiffusionGradientDirectionSequence (0018,9076)
  holding DiffusionGradientOrientation (0018,9089)
- MR/CT/PET Image Frame Type (0018,9226 / 0018,9329 / 0018,9751): FrameType (0008,9007),
  ComplexImageComponent (0008,9208)
- Plane Position (0020,9113) / Plane Orientation (0020,9116): ImagePositionPatient / ImageOrientationPatient
- Frame Content (0020,9111): TemporalPositionIndex (0020,9128), StackID (0020,9056),
  InStackPositionNumber (0020,9057), FrameAcquisitionDateTime (0018,9074)
- Cardiac Synchronization (0018,9118): NominalCardiacTriggerDelayTime (0020,9153)
So one Enhanced file can hold several stacks (magnitude and phase, several echoes, several b-values).
"""

from __future__ import annotations

from typing import Any

from .attributes import PER_FRAME_FUNCTIONAL_GROUPS, SHARED_FUNCTIONAL_GROUPS, convert, merge_macros
from .image_part import VendorImageHints, image_part
from .records import FrameRecord

EFFECTIVE_ECHO_TIME = "00189082"
INVERSION_TIMES = "00189079"
FLIP_ANGLE = "00181314"
FRAME_TYPE = "00089007"
COMPLEX_IMAGE_COMPONENT = "00089208"
DIFFUSION_B_VALUE = "00189087"
DIFFUSION_GRADIENT_SEQUENCE = "00189076"
DIFFUSION_GRADIENT_ORIENTATION = "00189089"
IMAGE_POSITION = "00200032"
IMAGE_ORIENTATION = "00200037"
TEMPORAL_POSITION_INDEX = "00209128"
STACK_ID = "00209056"
IN_STACK_POSITION = "00209057"
FRAME_ACQUISITION_DATETIME = "00189074"
NOMINAL_TRIGGER_DELAY = "00209153"
FRAME_REFERENCE_TIME = "00541300"


def enhanced_frames(
    header: dict[str, Any], modality: str | None, hints: VendorImageHints
) -> list[FrameRecord]:
    """One record per item of the Per-frame Functional Groups Sequence of a full (all-frames) header."""
    shared: dict[str, Any] = {}
    shared_items = header.get(SHARED_FUNCTIONAL_GROUPS, {}).get("Value") or []
    if shared_items:
        merge_macros(shared, shared_items[0])
    frames = []
    for number, item in enumerate(
        header.get(PER_FRAME_FUNCTIONAL_GROUPS, {}).get("Value") or [], start=1
    ):
        values = dict(shared)
        merge_macros(values, item, override=True)
        frames.append(_enhanced_frame(number, values, modality, hints))
    return frames


def _enhanced_frame(
    number: int, values: dict[str, Any], modality: str | None, hints: VendorImageHints
) -> FrameRecord:
    frame_type = _get(values, FRAME_TYPE, "strs") or []
    gradient: list[float] = []
    gradient_items = (values.get(DIFFUSION_GRADIENT_SEQUENCE) or {}).get("Value") or []
    if gradient_items and isinstance(gradient_items[0], dict):
        gradient = _get(gradient_items[0], DIFFUSION_GRADIENT_ORIENTATION, "floats") or []
    acquired = _get(values, FRAME_ACQUISITION_DATETIME, "str")
    return FrameRecord(
        frame=number,
        echo_time=_get(values, EFFECTIVE_ECHO_TIME, "float"),
        inversion_time=_get(values, INVERSION_TIMES, "float"),
        flip_angle=_get(values, FLIP_ANGLE, "float"),
        image_type=frame_type,
        part=image_part(frame_type, _get(values, COMPLEX_IMAGE_COMPONENT, "str"), hints, modality),
        b_value=_get(values, DIFFUSION_B_VALUE, "float"),
        gradient=gradient,
        position=_get(values, IMAGE_POSITION, "floats") or [],
        orientation=_get(values, IMAGE_ORIENTATION, "floats") or [],
        temporal_position=_get(values, TEMPORAL_POSITION_INDEX, "int"),
        stack_id=_get(values, STACK_ID, "str"),
        in_stack_position=_get(values, IN_STACK_POSITION, "int"),
        acquisition_time=acquired[8:] if acquired and len(acquired) > 8 else acquired,
        trigger_time=_get(values, NOMINAL_TRIGGER_DELAY, "float"),
        frame_reference_time=_get(values, FRAME_REFERENCE_TIME, "float"),
    )


def _get(values: dict[str, Any], key: str, kind: Any) -> Any:
    elem = values.get(key)
    raw = elem.get("Value") if elem else None
    return convert(raw, kind) if raw else None
