"""The user's public vocabulary that more than one service checks: the gateway validates requests
with it, the stage services act on it. One definition, so the two can never disagree."""

from __future__ import annotations

from typing import Literal, get_args

# `anonymize_categories`: which groups of identifying attributes a run de-identifies (ADR 0003)
AnonymizeCategory = Literal[
    "patient",
    "clinical_trial",
    "healthcare_provider",
    "institution",
    "time_and_date",
    "descriptors",
    "device",
    "private",
]
ANONYMIZE_CATEGORIES: tuple[AnonymizeCategory, ...] = get_args(AnonymizeCategory)

# `patient_id.strategy`
PatientIdStrategy = Literal["folder", "hash", "sequential", "csv", "none"]
PATIENT_ID_STRATEGIES: tuple[PatientIdStrategy, ...] = get_args(PatientIdStrategy)
