"""A retraction names the original StudyInstanceUID, sealed by the gateway; the anonymizer maps it
to the UID its de-identified copy carries, which is what the catalog, and so the exporter, knows
(ADR 0025)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pydicom
from pydantic import SecretStr

from services.anonymizer.plugin import AnonymizerPlugin, deidentified_study_uid
from services.anonymizer.profile import (
    AnonymizationContext,
    ProfileOptions,
    anonymize,
    load_profile,
)
from services.anonymizer.repository import Vault
from shared.events import CohortRef, StageRequested, StudyRetraction
from shared.secrets import seal
from shared.settings import Settings
from shared.topics import Stage

SETTINGS = Settings(project_secret=SecretStr("unit-test project secret for retractions"))


def test_a_sealed_original_uid_maps_to_the_de_identified_study(deident_files: list[Path]) -> None:
    path = deident_files[0]
    original = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    sealed = seal(original, SETTINGS)  # what the gateway puts on the bus
    assert original not in sealed

    retraction = StudyRetraction(study_instance_uid=sealed, retracted=True, reason="r")
    mapped = deidentified_study_uid(SETTINGS, retraction)

    # the same file through the core, keyed as the service keys it (Vault.core_secret)
    context = AnonymizationContext(
        load_profile(ProfileOptions()), Vault(SETTINGS).core_secret, "subTEST01"
    )
    result = anonymize(pydicom.dcmread(path), context)
    assert result.dataset.StudyInstanceUID == mapped != original


def test_the_same_study_of_another_notice_maps_to_the_same_uid() -> None:
    uid = "1.2.840.113619.2.1.1.322987881.621.736170080.681"

    def mapped(value: str) -> str:
        return deidentified_study_uid(
            SETTINGS,
            StudyRetraction(study_instance_uid=seal(value, SETTINGS), retracted=False, reason=""),
        )

    assert mapped(uid) == mapped(f" {uid} ")  # senders pad; the core strips too
    assert mapped(uid) != mapped(uid + "1")


def test_a_new_studys_run_stays_scoped_past_anonymization_without_its_original_uid() -> None:
    """Sorting and export of a new study's run work on the de-identified copy's UID (so their
    cost is the study's, not the cohort's); the original UID does not travel past the stage."""
    original = "1.2.840.113619.2.1.1.322987881.621.736170080.681"
    plugin = AnonymizerPlugin(SETTINGS)

    def after(config: dict[str, object]) -> list[str]:
        request = StageRequested(
            stage=Stage.anonymization,
            cohort=CohortRef(id=uuid.uuid4(), name="c", source_path="/data/c"),
            config=config,
            study_instance_uids=[original],
        )
        return plugin.scope_after(request)

    retraction = StudyRetraction(
        study_instance_uid=seal(original, SETTINGS), retracted=True, reason=""
    )
    assert after({}) == [deidentified_study_uid(SETTINGS, retraction)] != [original]
    assert after({"retain_uids": True}) == [original]  # the copy keeps its UID
    whole = StageRequested(
        stage=Stage.anonymization, cohort=CohortRef(id=uuid.uuid4(), name="c", source_path="/d")
    )
    assert plugin.scope_after(whole) == []
