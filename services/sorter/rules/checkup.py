"""Checkup, the first sorting step: what of the catalogue can be classified, and what cannot.

Per stack: objects that are not image acquisitions (presentation states, reports, raw data, vendor
private objects) and modalities outside `selectedModalities` are excluded with a reason; stacks
without instances are excluded; a missing StudyDate (0008,0020) is recovered from the stack's own
SeriesDate (0008,0021), AcquisitionDate (0008,0022), ContentDate (0008,0023) or AcquisitionDateTime
(0008,002A), in that order — never from a UID, whose embedded timestamps are implementation choices,
not dates. `skipClassified` / `forceReprocess` decide which stacks need classifying at all, from the
keys (series, stack_key, rule version) already stored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from services.sorter.rules.header import first_str, flatten_header, tag_key
from services.sorter.rules.vocabulary import vocabulary
from shared.catalog import StackSummary
from shared.vocabulary import MODALITIES

_DATE_SOURCES = (
    ("SeriesDate", tag_key("SeriesDate")),
    ("AcquisitionDate", tag_key("AcquisitionDate")),
    ("ContentDate", tag_key("ContentDate")),
    ("AcquisitionDateTime", tag_key("AcquisitionDateTime")),
)
# the reason stored for a stack left out by `selectedModalities`: a choice of this run, not a
# decision about the stack, so such a row never counts as classified (see `stored_classified_keys`)
UNSELECTED_REASON = "modality {modality} not selected"
_UNSELECTED = re.compile(r"^modality \S+ not selected$")
_DA = re.compile(r"^(19|20)\d{2}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])$")
_MODALITY_OF_KIND = {
    "mr": "MR",
    "enhanced_mr": "MR",
    "legacy_enhanced_mr": "MR",
    "ct": "CT",
    "enhanced_ct": "CT",
    "legacy_enhanced_ct": "CT",
    "pet": "PT",
    "enhanced_pet": "PT",
    "legacy_enhanced_pet": "PT",
}


@dataclass(frozen=True, slots=True)
class Exclusion:
    series_instance_uid: str
    stack_key: str
    reason: str


@dataclass(frozen=True, slots=True)
class RecoveredDate:
    series_instance_uid: str
    study_date: str
    source: str  # the attribute it came from


@dataclass(slots=True)
class CheckupResult:
    accepted: list[StackSummary] = field(default_factory=list)  # to classify (dates filled)
    skipped: list[StackSummary] = field(default_factory=list)  # already classified at this version
    excluded: list[Exclusion] = field(default_factory=list)
    recovered_dates: list[RecoveredDate] = field(default_factory=list)
    missing_dates: list[str] = field(default_factory=list)  # series whose date could not be found


def object_kind(stack: StackSummary) -> str:
    """The kind of object (mr, enhanced_mr, ct, pet, presentation_state, ...) from SOP class/modality."""
    vocab = vocabulary()
    return vocab.sop_kinds.get(stack.sop_class_uid) or vocab.modality_kinds.get(
        stack.modality.upper(), "unknown"
    )


def recover_study_date(stack: StackSummary) -> tuple[str, str] | None:
    """(date, source attribute) from the stack's own dates, or None. Never from UIDs."""
    flat = flatten_header(stack.header)
    for name, key in _DATE_SOURCES:
        value = first_str(flat, key)[:8]
        if _DA.match(value):
            return value, name
    return None


def is_unselected(reason: str | None) -> bool:
    """True for the exclusion reason of a stack left out by `selectedModalities`."""
    return reason is not None and _UNSELECTED.match(reason) is not None


def stored_classified_keys(
    rows: Iterable[tuple[str, str, str, str | None]],
) -> frozenset[tuple[str, str, str]]:
    """(series, stack_key, rule_version) of stored rows that really were classified.

    `rows` are stored (series, stack_key, rule_version, excluded_reason). A stack excluded only because
    its modality was not selected in that run was never classified: a later run that selects its
    modality must classify it, even under `skipClassified`.
    """
    return frozenset(
        (series, key, version) for series, key, version, reason in rows if not is_unselected(reason)
    )


def checkup(
    stacks: Iterable[StackSummary],
    selected_modalities: Sequence[str] = MODALITIES,
    classified_keys: frozenset[tuple[str, str, str]] = frozenset(),
    rule_version: str = "",
    skip_classified: bool = True,
    force_reprocess: bool = False,
) -> CheckupResult:
    """Sort a cohort's stacks into accepted / skipped / excluded, recovering missing study dates.

    `classified_keys` holds (series_instance_uid, stack_key, rule_version) already stored; with
    `skip_classified` those are skipped unless `force_reprocess` is set.
    """
    selected = {m.upper() for m in selected_modalities}
    result = CheckupResult()
    for stack in stacks:
        kind = object_kind(stack)
        modality = _MODALITY_OF_KIND.get(kind)
        if stack.n_instances <= 0:
            result.excluded.append(
                Exclusion(stack.series_instance_uid, stack.stack_key, "series without instances")
            )
            continue
        if modality is None:
            result.excluded.append(
                Exclusion(
                    stack.series_instance_uid, stack.stack_key, f"not an image acquisition: {kind}"
                )
            )
            continue
        if modality not in selected:
            result.excluded.append(
                Exclusion(
                    stack.series_instance_uid,
                    stack.stack_key,
                    UNSELECTED_REASON.format(modality=modality),
                )
            )
            continue
        if not stack.study_date or not _DA.match(stack.study_date):
            recovered = recover_study_date(stack)
            if recovered is None:
                result.missing_dates.append(stack.series_instance_uid)
            else:
                date, source = recovered
                stack = stack.model_copy(update={"study_date": date})
                result.recovered_dates.append(
                    RecoveredDate(stack.series_instance_uid, date, source)
                )
        key = (stack.series_instance_uid, stack.stack_key, rule_version)
        if skip_classified and not force_reprocess and key in classified_keys:
            result.skipped.append(stack)
            continue
        result.accepted.append(stack)
    return result
