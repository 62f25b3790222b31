"""What an export run takes from the catalog and the classification, and why it leaves the rest.

Pure (no Kafka, SQL or S3): the export options of the user's config, one `ExportStack` per classified
stack, the reason a stack is not exported, the kind of each output file, and the fingerprint that
says "this stack would give exactly the outputs an earlier export already holds" (`overwrite: skip`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, cast

from services.exporter.bids import ExportStack, select_stacks
from services.exporter.bids.entities import Layout, subject_label
from services.exporter.bids.plan import load_naming_rules
from services.exporter.convert.export import OutputMode, OverwritePolicy
from shared.catalog import StackSummary

INTENTS = ("anat", "dwi", "func", "fmap", "perf")
PROVENANCES = ("SyMRI", "SWIRecon", "EPIMix")
_OUTPUT_MODES: tuple[OutputMode, ...] = ("dcm", "nii", "nii.gz")
_FINGERPRINT_FIELDS = {
    "subject", "session", "datatype", "suffix", "entities", "intent", "constructs", "provenance",
}  # fmt: skip

# the classification_v columns an export uses, stored with each manifest row
CLASSIFICATION_FIELDS = (
    "rule_version", "base", "technique", "modifiers", "constructs", "provenance", "post_contrast",
    "localizer", "intent", "bids_datatype", "bids_suffix", "entities", "confidence",
    "review_required", "review_reasons", "excluded_reason",
)  # fmt: skip


@dataclass(frozen=True)
class ExportOptions:
    """The export stage's config keys (README, Configuration), with the service's defaults."""

    output_modes: tuple[OutputMode, ...] = ("nii.gz",)
    layout: Layout = "bids"
    include_intents: tuple[str, ...] = INTENTS
    include_provenance: tuple[str, ...] = PROVENANCES
    group_symri: bool = False
    overwrite: OverwritePolicy = "skip"
    destination: str | None = None
    convert_timeout_s: float = 600.0
    validate_timeout_s: float = 900.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ExportOptions:
        """Read the config (already validated by the gateway); unknown values raise `ValueError`."""

        def listed(key: str, default: Sequence[str]) -> tuple[str, ...]:
            value = config.get(key)
            if value is None:
                return tuple(default)
            return (value,) if isinstance(value, str) else tuple(str(v) for v in value)

        modes = listed("outputModes", ("nii.gz",))
        if not modes or any(m not in _OUTPUT_MODES for m in modes):
            raise ValueError(f"outputModes must be among {', '.join(_OUTPUT_MODES)}: {modes}")
        layout = str(config.get("layout", "bids"))
        if layout not in ("bids", "flat"):
            raise ValueError(f"layout must be bids or flat, not {layout!r}")
        overwrite = str(config.get("overwrite", "skip"))
        if overwrite not in ("skip", "overwrite"):
            raise ValueError(f"overwrite must be skip or overwrite, not {overwrite!r}")
        return cls(
            output_modes=cast(tuple[OutputMode, ...], tuple(dict.fromkeys(modes))),
            layout=cast(Layout, layout),
            include_intents=listed("includeIntents", INTENTS),
            include_provenance=listed("includeProvenance", PROVENANCES),
            group_symri=bool(config.get("groupSyMRI", False)),
            overwrite=cast(OverwritePolicy, overwrite),
            destination=str(config["destination"]) if config.get("destination") else None,
            convert_timeout_s=float(config.get("convert_timeout_s", 600.0)),
            validate_timeout_s=float(config.get("validate_timeout_s", 900.0)),
        )

    @property
    def nifti(self) -> bool:
        return any(m in ("nii", "nii.gz") for m in self.output_modes)


def export_stack_of(
    summary: StackSummary, classification: Mapping[str, Any], session: str | None
) -> ExportStack:
    """The core's `ExportStack` (no files yet) from a catalog stack and its classification row."""
    entities = classification.get("entities") or {}
    return ExportStack(
        subject=subject_label(summary.subject_id),
        session=session,
        datatype=str(classification.get("bids_datatype") or ""),
        suffix=str(classification.get("bids_suffix") or ""),
        entities={str(k): v for k, v in dict(entities).items() if v not in (None, "")},
        intent=classification.get("intent"),
        constructs=list(classification.get("constructs") or []),
        provenance=classification.get("provenance"),
        acquisition_date=summary.study_date,
        acquisition_time=summary.acquisition_time,
        summary=summary,
    )


def not_exported_reason(stack: ExportStack, classification: Mapping[str, Any]) -> str:
    """Why `select_stacks` (or the lack of a BIDS name) leaves a classified stack out."""
    intent = stack.intent or ""
    if intent == "localizer" or classification.get("localizer"):
        return "localizer"
    if intent == "excluded":
        return f"excluded: {classification.get('excluded_reason') or 'by classification'}"
    if not stack.datatype or not stack.suffix:
        return f"no BIDS name for intent {intent or 'unknown'}"
    if stack.provenance in load_naming_rules().provenance:
        return f"provenance {stack.provenance} not in includeProvenance"
    return f"intent {intent or stack.datatype} not in includeIntents"


def split_selected(
    stacks: Iterable[tuple[ExportStack, Mapping[str, Any]]], options: ExportOptions
) -> tuple[list[ExportStack], dict[str, str]]:
    """The stacks to export (the core's `select_stacks`) and, by key, why the others are not."""
    pairs = list(stacks)
    named = [s for s, _ in pairs if s.datatype and s.suffix]
    kept = select_stacks(
        named,
        include_intents=options.include_intents,
        include_provenance=options.include_provenance,
    )
    kept_keys = {s.key for s in kept}
    reasons = {s.key: not_exported_reason(s, c) for s, c in pairs if s.key not in kept_keys}
    return kept, reasons


def file_kind(path: PurePosixPath | str) -> str:
    """The manifest kind of an output file, from its name."""
    name = PurePosixPath(str(path)).name
    for ending, kind in (
        (".nii.gz", "nifti"), (".nii", "nifti"), (".json", "sidecar"), (".bval", "bval"),
        (".bvec", "bvec"), (".tsv", "tsv"), (".dcm", "dicom"),
    ):  # fmt: skip
        if name.endswith(ending):
            return kind
    return "other"


def stack_fingerprint(
    base: PurePosixPath | str,
    stack: ExportStack,
    source_sha256: Iterable[str],
    options: ExportOptions,
) -> str:
    """Equal fingerprints mean equal outputs: same names, same DICOM bytes, same modes and
    classification. `overwrite: skip` reuses an earlier export's objects on a match."""
    material = {
        "base": str(base),
        "modes": sorted(options.output_modes),
        "layout": options.layout,
        "inputs": sorted(source_sha256),
        "stack": stack.model_dump(mode="json", include=_FINGERPRINT_FIELDS),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
