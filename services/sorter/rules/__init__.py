"""The sorting core: fingerprints, the six-axis classifier, checkup and completion.

Pure: imports no Kafka, Postgres or S3. The sorter service wires it to events and tables:

    result = checkup(stacks, selected_modalities, classified_keys, rules.version, skip, force)
    fps = fingerprint_batch(result.accepted)
    decisions = complete(classify_batch(fps, rules), fps, rules)

Rule packs are versioned data (`packs/<profile>.yaml`); results are keyed by
(series_instance_uid, stack_key, rule version) so unchanged stacks are skipped on re-runs.
"""

from services.sorter.rules.checkup import (
    CheckupResult,
    Exclusion,
    RecoveredDate,
    checkup,
    is_unselected,
    stored_classified_keys,
)
from services.sorter.rules.classify import Classification, classify, classify_batch
from services.sorter.rules.completion import complete
from services.sorter.rules.fingerprint import (
    Fingerprint,
    fingerprint,
    fingerprint_batch,
    fingerprint_version,
)
from services.sorter.rules.pack import Evidence, RulePack, load_rules

__all__ = [
    "CheckupResult",
    "Classification",
    "Evidence",
    "Exclusion",
    "Fingerprint",
    "RecoveredDate",
    "RulePack",
    "checkup",
    "classify",
    "classify_batch",
    "complete",
    "fingerprint",
    "fingerprint_batch",
    "fingerprint_version",
    "is_unselected",
    "load_rules",
    "stored_classified_keys",
]
