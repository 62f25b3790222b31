"""The JSON schema of every stage's config: one source for the API's validation, the docs and the
web page's stage forms (which draw each key with its allowed values, default and help line)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from services.gateway.cohorts.stage_config import (
    AnonymizationConfig,
    ExportConfig,
    ExtractionConfig,
    SortingConfig,
)
from shared.topics import Stage

router = APIRouter(tags=["config"])

_MODELS: dict[Stage, type[BaseModel]] = {
    Stage.anonymization: AnonymizationConfig,
    Stage.extraction: ExtractionConfig,
    Stage.sorting: SortingConfig,
    Stage.export: ExportConfig,
}


@router.get("/config-schema")
async def config_schema() -> dict[str, Any]:
    """`{stage: JSON schema}` of the configs `POST .../stages/{stage}/run` and `.../pipeline`
    accept; secrets are `"format": "password"`, `"writeOnly": true`."""
    return {stage.value: model.model_json_schema() for stage, model in _MODELS.items()}
