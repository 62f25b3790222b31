"""Rule packs are data with a schema: loading, extension, validation errors."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from services.sorter.rules import load_rules
from services.sorter.rules.pack import PackFile, compile_pack


def _pack(**rule: Any) -> dict[str, Any]:
    return {
        "version": "t1",
        "profile": "t",
        "sources": {"coded": 3.0, "text": 1.0},
        "policy": {},
        "rules": [
            {
                "id": "r",
                "source": "coded",
                "all": ["it:x"],
                "vote": {"base": "T1w"},
                "note": "t",
                **rule,
            }
        ],
        "bids": [{"id": "any", "when": {}, "datatype": "", "suffix": ""}],
    }


def test_profiles_load_and_research_extends_standard() -> None:
    standard = load_rules("standard")
    research = load_rules("research")
    assert standard.version and research.version.startswith(standard.version + "+research")
    assert len(research.rules) == len(standard.rules)
    assert (
        research.policy.synthetic_as == "anat"
        and research.policy.review_below > standard.policy.review_below
    )
    assert standard.index and not standard.unanchored  # every rule is reached through a token


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="no rule pack"):
        load_rules("nonexistent")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vote": {"colour": "red"}}, "unknown axis"),
        ({"vote": {"modifiers": "FLAIR"}}, "is a set"),
        ({"all": ["flair"]}, "needs a namespace"),
        ({"range": {"nonsense": [1, 2]}}, "unknown field"),
        ({"source": "rumour"}, "source"),
    ],
)
def test_schema_rejects_bad_rules(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PackFile.model_validate(_pack(**change))


def test_source_without_weight_is_refused() -> None:
    data = _pack(source="text")
    data["sources"] = {"coded": 3.0}
    with pytest.raises(ValueError, match="no weight"):
        compile_pack(PackFile.model_validate(data))


def test_compiled_weights_multiply_source_weight() -> None:
    pack = compile_pack(PackFile.model_validate(_pack(weight=0.5)))
    assert pack.rules[0].weight == 1.5 and pack.index["it:x"] == (pack.rules[0],)


def test_a_rule_must_say_why_it_holds() -> None:
    """A note on the rule, or a `basis` entry for its id prefix; otherwise the pack does not load."""
    with pytest.raises(ValueError, match="says nothing about why"):
        compile_pack(PackFile.model_validate(_pack(note="")))
    data = _pack(id="it_x", note="")
    data["basis"] = {"it_": "ImageType values, PS3.3 C.7.6.1.1.2"}
    assert compile_pack(PackFile.model_validate(data)).rules[0].id == "it_x"
