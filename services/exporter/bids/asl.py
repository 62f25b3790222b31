"""ASL sidecars and `aslcontext.tsv` from what the DICOM records, never from assumptions.

Two sources are combined:

- dcm2niix's sidecar. It reads the Siemens protocol (ASCCONV in the CSA series header) for the
  sequences it knows (`ep2d_pcasl`, `tgse_pcasl`, `ep2d_pasl`, `tgse_pasl`, ...): labelling type,
  post-labelling delay, labelling/bolus duration, and GE's private ASL fields (0043,10A3-10A5).
  Two of its outputs are corrected here: it writes ASL Pulse Train Duration (0018,9258) as
  `PostLabelingDelay` although DICOM defines it as the labelling pulse train's duration, and for
  Siemens pCASL it writes `RepetitionTimePreparation` in milliseconds.
- `AslEvidence`, read from the stack's DICOM by the converter (`convert/asl.py`): the standard
  enhanced-MR ASL attributes (labelling contrast, pulse train duration, crusher and bolus cut-off
  flags) and one volume type per NIfTI volume where the vendor records it per instance or frame
  (ASL Context (0018,9257); Philips' private label type).

What neither gives stays absent from the sidecar and is reported by `missing_required`; BIDS keys
that describe the dataset rather than the series (`M0Type` Separate/Absent, the m0scan's
`IntendedFor`) are set when the dataset files are computed (`dataset.py`, `fieldmaps.py`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from pydantic import BaseModel

VOLUME_TYPES = frozenset({"control", "label", "m0scan", "deltam", "cbf"})
_TOLERANCE_S = 0.0005


@lru_cache(maxsize=1)
def asl_table() -> dict[str, Any]:
    """`asl.json`: DICOM values -> BIDS values, and where per-volume types are recorded."""
    data: dict[str, Any] = json.loads(
        resources.files(__package__).joinpath("asl.json").read_text("utf-8")
    )
    return data


class AslEvidence(BaseModel):
    """What a stack's DICOM says about its labelling, as read by `convert.asl.read_asl_evidence`.

    `volume_types` has one BIDS `volume_type` per converted volume, in the NIfTI's order, or is
    `None` when the DICOM does not record them (`volume_types_problem` says why)."""

    labeling_contrast: str | None = None  # (0018,9250): CONTINUOUS, PSEUDOCONTINUOUS, PULSED
    pulse_train_duration_ms: float | None = None  # (0018,9258)
    crusher: bool | None = None  # (0018,9259)
    crusher_flow_limit: float | None = None  # (0018,925A), cm/s
    bolus_cut_off: bool | None = None  # (0018,925C)
    bolus_cut_off_technique: str | None = None  # (0018,925E)
    bolus_cut_off_delay_ms: float | None = None  # (0018,925F)
    volume_types: list[str] | None = None
    volume_types_source: str | None = None
    volume_types_problem: str | None = None


@dataclass
class AslSidecar:
    """The corrected sidecar, the volume types to write (or `None`) and what was changed or left
    out, for the export item's warnings."""

    sidecar: dict[str, Any]
    aslcontext: list[str] | None
    notes: list[str] = field(default_factory=list)


def repeated_keys(text: str) -> dict[str, list[Any]]:
    """Top-level keys a converter's JSON sidecar writes more than once, with every value in order
    (`json.loads` keeps only the last; dcm2niix repeats `PostLabelingDelay` for some series)."""
    found: dict[str, list[Any]] = {}

    def collect(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        counts: dict[str, list[Any]] = {}
        for key, value in pairs:
            counts.setdefault(key, []).append(value)
        found.clear()
        found.update({k: v for k, v in counts.items() if len(v) > 1})
        return dict(pairs)

    json.loads(text, object_pairs_hook=collect)  # the outermost object is decoded last
    return found


def check_volume_types(types: Sequence[str], volumes: int) -> str | None:
    """Why `types` cannot be this series' `aslcontext.tsv`, or `None` when it can: one known type
    per volume, and as many labels as controls (a context shifted by one volume fails here)."""
    if len(types) != volumes:
        return f"{len(types)} volume types for {volumes} volumes"
    unknown = sorted(set(types) - VOLUME_TYPES)
    if unknown:
        return f"unknown volume types {', '.join(unknown)}"
    if types.count("control") != types.count("label"):
        return f"{types.count('control')} control and {types.count('label')} label volumes"
    return None


def asl_sidecar(
    converted: Mapping[str, Any],
    repeated: Mapping[str, Sequence[Any]],
    evidence: AslEvidence,
    volumes: int,
) -> AslSidecar:
    """The ASL sidecar from dcm2niix's (`converted`, with its `repeated` keys) and the evidence."""
    sidecar = dict(converted)
    notes: list[str] = []
    _post_labeling_delay(sidecar, repeated, evidence, notes)
    _labelling(sidecar, evidence, notes)
    preparation_time(sidecar, notes)

    context = evidence.volume_types
    problem = evidence.volume_types_problem
    if context is not None:
        problem = check_volume_types(context, volumes)
        if problem:
            problem = f"{evidence.volume_types_source}: {problem}"
            context = None
    if context is None:
        notes.append(f"volume types unknown ({problem or 'not recorded in the DICOM'})")
        return AslSidecar(sidecar, None, notes)
    # the volume types are known: M0Type and the pair count follow from them, not from dcm2niix's
    # guess from the number of volumes
    sidecar.pop("M0Type", None)
    if "m0scan" in context:
        sidecar["M0Type"] = "Included"
    pairs = context.count("control")
    if pairs:
        sidecar["TotalAcquiredPairs"] = pairs
    return AslSidecar(sidecar, list(context), notes)


_ASL_SERIES_KEYS = ("M0Type", "TotalAcquiredPairs")


def m0scan_sidecar(converted: Mapping[str, Any]) -> AslSidecar:
    """The m0scan sidecar: `RepetitionTimePreparation` in seconds, and without the keys BIDS
    defines for an ASL series only (dcm2niix writes `M0Type: Included` for any single volume of a
    sequence it knows as ASL)."""
    sidecar = dict(converted)
    notes: list[str] = []
    for key in _ASL_SERIES_KEYS:
        if key in sidecar:
            notes.append(f"{key} {sidecar.pop(key)} (dcm2niix) dropped: it describes an ASL series")
    preparation_time(sidecar, notes)
    return AslSidecar(sidecar, None, notes)


def _labelling(sidecar: dict[str, Any], evidence: AslEvidence, notes: list[str]) -> None:
    """Labelling type and duration, crushing and bolus cut-off from the standard attributes."""
    labeling = asl_table()["labeling_contrast"].get((evidence.labeling_contrast or "").upper())
    if labeling:
        if sidecar.get("ArterialSpinLabelingType") not in (None, labeling):
            notes.append(
                f"ArterialSpinLabelingType {sidecar['ArterialSpinLabelingType']} (dcm2niix) "
                f"replaced by {labeling} from Arterial Spin Labeling Contrast (0018,9250)"
            )
        sidecar["ArterialSpinLabelingType"] = labeling
    if evidence.pulse_train_duration_ms and sidecar.get("ArterialSpinLabelingType") in (
        "CASL",
        "PCASL",
    ):
        duration = evidence.pulse_train_duration_ms / 1000.0
        previous = sidecar.get("LabelingDuration")
        if isinstance(previous, int | float) and abs(previous - duration) > _TOLERANCE_S:
            notes.append(
                f"LabelingDuration {previous} s (vendor protocol) differs from ASL Pulse Train "
                f"Duration (0018,9258) {duration} s; the standard attribute is used"
            )
        sidecar["LabelingDuration"] = duration
    if evidence.crusher is not None:
        sidecar["VascularCrushing"] = evidence.crusher
        if evidence.crusher and evidence.crusher_flow_limit:
            sidecar["VascularCrushingVENC"] = evidence.crusher_flow_limit
    if evidence.bolus_cut_off is not None and sidecar.get("ArterialSpinLabelingType") == "PASL":
        sidecar["BolusCutOffFlag"] = evidence.bolus_cut_off
        if evidence.bolus_cut_off and evidence.bolus_cut_off_technique:
            sidecar["BolusCutOffTechnique"] = evidence.bolus_cut_off_technique
        if evidence.bolus_cut_off and evidence.bolus_cut_off_delay_ms is not None:
            sidecar["BolusCutOffDelayTime"] = evidence.bolus_cut_off_delay_ms / 1000.0


def preparation_time(sidecar: dict[str, Any], notes: list[str]) -> None:
    """`RepetitionTimePreparation` (REQUIRED for asl and m0scan) in seconds.

    In an ASL acquisition each repetition starts with its labelling (or, for an M0, saturation)
    module, so the preparation repeats with the RepetitionTime (0018,0080) dcm2niix reports in
    seconds; dcm2niix itself derives the key from TR for Siemens pCASL, but in milliseconds."""
    tr = sidecar.get("RepetitionTime")
    if not isinstance(tr, int | float) or isinstance(tr, bool):
        return
    previous = sidecar.get("RepetitionTimePreparation")
    if isinstance(previous, int | float) and abs(previous - tr * 1000.0) < 1.0:
        notes.append(f"RepetitionTimePreparation {previous} (ms, dcm2niix) written in seconds")
    sidecar["RepetitionTimePreparation"] = tr


def _post_labeling_delay(
    sidecar: dict[str, Any],
    repeated: Mapping[str, Sequence[Any]],
    evidence: AslEvidence,
    notes: list[str],
) -> None:
    """Drop the `PostLabelingDelay` dcm2niix took from ASL Pulse Train Duration (0018,9258)."""
    values = list(repeated.get("PostLabelingDelay") or [])
    if not values and "PostLabelingDelay" in sidecar:
        values = [sidecar["PostLabelingDelay"]]
    if evidence.pulse_train_duration_ms:
        duration = evidence.pulse_train_duration_ms / 1000.0
        for i, value in enumerate(values):
            if isinstance(value, int | float) and abs(value - duration) < _TOLERANCE_S:
                del values[i]
                notes.append(
                    f"PostLabelingDelay {value} s dropped: dcm2niix took it from ASL Pulse Train "
                    "Duration (0018,9258), which DICOM defines as the labelling duration"
                )
                break
    if values:
        sidecar["PostLabelingDelay"] = values[0]
    else:
        sidecar.pop("PostLabelingDelay", None)
