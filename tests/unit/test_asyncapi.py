"""The AsyncAPI document: valid AsyncAPI 3.0 (the official JSON schema, from the `@asyncapi/specs`
6.11.1 npm package, Apache-2.0, kept in tests/data), every topic of the registry described, and
every message's payload resolvable."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import jsonschema

from shared.asyncapi import asyncapi_document
from shared.topics import all_topics

SCHEMA = Path(__file__).parents[1] / "data" / "asyncapi-3.0.0.schema.json.gz"


def document() -> dict[str, Any]:
    return json.loads(json.dumps(asyncapi_document("kafka:9092")))


def test_the_document_is_valid_asyncapi_3() -> None:
    schema = json.loads(gzip.decompress(SCHEMA.read_bytes()))
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(document()))
    assert not errors, [(list(e.path), e.message[:200]) for e in errors[:5]]


def test_every_topic_is_described_and_every_ref_resolves() -> None:
    doc = document()
    assert {c["address"] for c in doc["channels"].values()} == set(all_topics())

    def resolve(ref: str) -> Any:
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        assert resolve(ref) is not None, ref
    events = doc["channels"]["events"]["messages"]
    names = {resolve(m["$ref"])["name"] for m in events.values()}
    assert "org.cohortflow.export.published.v1" in names
    studies = doc["components"]["messages"]
    assert any(m["name"] == "<reverse-dns>.study.available.v1" for m in studies.values())
    assert any(m["name"] == "<reverse-dns>.study.retracted.v1" for m in studies.values())
    dead = doc["operations"]
    assert any(
        op["action"] == "receive" and op["channel"]["$ref"] == "#/channels/sortingDeadLetters"
        for op in dead.values()
    ), "the gateway keeps the dead letters"
