"""The JSON schema of every stage's config: one source for the API's validation, the docs and the
web page's stage forms (which draw each key with its allowed values, default and help line)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from shared.stage_config import config_json_schemas

router = APIRouter(tags=["config"])


@router.get("/config-schema")
async def config_schema() -> dict[str, Any]:
    """`{stage: JSON schema}` of the configs `POST .../stages/{stage}/run` and `.../pipeline`
    accept; secrets are `"format": "password"`, `"writeOnly": true`."""
    return config_json_schemas()
