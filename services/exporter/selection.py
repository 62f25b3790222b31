"""What an export run takes from the catalog and the classification, and why it leaves the rest.

Pure (no Kafka, SQL or S3): the export options of the user's config, one `ExportStack` per classified
stack, the reason a stack is not exported, the kind of each output file, and the fingerprint that
says "this stack would give exactly the outputs an earlier export already holds" (`overwrite: skip`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from services.exporter.bids import ExportStack, select_stacks
from services.exporter.bids.entities import subject_label
from services.exporter.bids.plan import load_naming_rules
from shared.catalog import StackSummary
from shared.vocabulary import ExportLayout as Layout
from shared.vocabulary import OutputMode, OverwritePolicy

if TYPE_CHECKING:  # a type only: the module would pull object storage into the core
    from shared.stage_config import ExportConfig

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
    """The export core's options, built from the export stage config (`from_config`)."""

    output_modes: tuple[OutputMode, ...]
    layout: Layout
    include_intents: tuple[str, ...]
    include_provenance: tuple[str, ...]
    group_symri: bool
    overwrite: OverwritePolicy
    destination: str | None
    convert_timeout_s: float
    validate_timeout_s: float

    @classmethod
    def from_config(cls, config: ExportConfig) -> ExportOptions:
        """The options of the user's export config (validated; each key's default and limits are
        declared in `shared.stage_config.ExportConfig`)."""
        return cls(
            output_modes=tuple(dict.fromkeys(config.outputModes)),
            layout=config.layout,
            include_intents=tuple(config.includeIntents),
            include_provenance=tuple(config.includeProvenance),
            group_symri=config.groupSyMRI,
            overwrite=config.overwrite,
            destination=config.destination or None,
            convert_timeout_s=config.convert_timeout_s,
            validate_timeout_s=config.validate_timeout_s,
        )

    def tree_shape(self) -> dict[str, Any]:
        """The options that decide which files a tree holds and how they are named: a scoped
        export carries the previous export's other subjects only when these are equal."""
        return {
            "output_modes": sorted(self.output_modes),
            "layout": self.layout,
            "include_intents": sorted(self.include_intents),
            "include_provenance": sorted(self.include_provenance),
            "group_symri": self.group_symri,
        }

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


def leave_out_retracted(
    stacks: Iterable[tuple[ExportStack, Mapping[str, Any]]], retracted: Mapping[str, str]
) -> tuple[list[tuple[ExportStack, Mapping[str, Any]]], dict[str, str]]:
    """The stacks whose study was not retracted and, by key, why the others are not exported
    (`retracted`: StudyInstanceUID -> the retraction's reason)."""
    kept: list[tuple[ExportStack, Mapping[str, Any]]] = []
    reasons: dict[str, str] = {}
    for stack, classification in stacks:
        why = retracted.get(stack.summary.study_instance_uid)
        if why is None:
            kept.append((stack, classification))
        else:
            reasons[stack.key] = f"study {why}"
    return kept, reasons


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
