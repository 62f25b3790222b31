"""A person's mapping rule on the sorter's classification: renamed, excluded, or left alone."""

from __future__ import annotations

from shared.mapping_rules import EXCLUDED_BY_PERSON, MappingRule, apply_rule

SORTED = {
    "bids_datatype": "anat",
    "bids_suffix": "T2w",
    "entities": {},
    "intent": "anat",
    "review_required": True,
    "localizer": False,
}


def book(rule: MappingRule) -> dict[tuple[str, str], MappingRule]:
    return {rule.match: rule}


def test_a_rule_renames_matching_stacks_of_any_study() -> None:
    rule = MappingRule(
        series_description="AX FLAIR ", stack_key="MR|TE=90", bids_datatype="anat",
        bids_suffix="FLAIR", entities={"acq": "ax"}, version=3, author="dr x",
    )  # fmt: skip
    out = apply_rule(book(rule), "ax flair", "MR|TE=90", SORTED)
    assert out["bids_suffix"] == "FLAIR" and out["entities"] == {"acq": "ax"}
    assert out["set_by"] == "person" and out["rule_version"] == 3
    assert out["review_required"] is False
    assert SORTED["bids_suffix"] == "T2w"  # the input is not changed


def test_other_stacks_stay_as_sorted() -> None:
    rule = MappingRule(series_description="AX FLAIR", stack_key="MR|TE=90", excluded=True)
    out = apply_rule(book(rule), "AX FLAIR", "MR|TE=100", SORTED)
    assert out["bids_suffix"] == "T2w" and out["set_by"] == "sorter"


def test_an_exclusion_leaves_the_stack_out() -> None:
    rule = MappingRule(series_description="scout", stack_key="k", excluded=True)
    out = apply_rule(book(rule), "Scout", "k", SORTED)
    assert out["intent"] == "excluded" and out["excluded_reason"] == EXCLUDED_BY_PERSON


def test_the_sorter_names_a_later_study_as_corrected() -> None:
    from services.sorter.corrections import with_corrections
    from services.sorter.rules.classify import Classification
    from shared.catalog import StackSummary

    stack = StackSummary(
        subject_id="S2", study_instance_uid="2.1", series_instance_uid="2.1.1",
        stack_key="MR|TE=90", series_description="ax flair",
    )  # fmt: skip
    proposed = Classification(
        stack_key="MR|TE=90", rule_version="r", series_instance_uid="2.1.1", intent="anat",
        bids_datatype="anat", bids_suffix="T2w", confidence=0.4, review_required=True,
    )  # fmt: skip
    rule = MappingRule(
        series_description="AX FLAIR", stack_key="MR|TE=90", bids_datatype="anat",
        bids_suffix="FLAIR", version=2,
    )  # fmt: skip
    [named] = with_corrections([proposed], [stack], book(rule))
    assert (named.bids_suffix, named.review_required) == ("FLAIR", False)
    assert with_corrections([proposed], [stack], {}) == [proposed]
