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

# sorting `selectedModalities`
Modality = Literal["MR", "CT", "PT"]
MODALITIES: tuple[Modality, ...] = get_args(Modality)

# export `outputModes`, `layout`, `overwrite`, `includeIntents`, `includeProvenance`
OutputMode = Literal["dcm", "nii", "nii.gz"]
OUTPUT_MODES: tuple[OutputMode, ...] = get_args(OutputMode)
ExportLayout = Literal["bids", "flat"]
OverwritePolicy = Literal["skip", "overwrite"]
ExportIntent = Literal["anat", "dwi", "func", "fmap", "perf"]
EXPORT_INTENTS: tuple[ExportIntent, ...] = get_args(ExportIntent)
ExportProvenance = Literal["SyMRI", "SWIRecon", "EPIMix"]
EXPORT_PROVENANCES: tuple[ExportProvenance, ...] = get_args(ExportProvenance)

# anonymization `audit_export.format`
AuditFormat = Literal["encrypted_excel", "csv"]
AUDIT_FORMATS: tuple[AuditFormat, ...] = get_args(AuditFormat)
