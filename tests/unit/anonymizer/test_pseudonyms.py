"""Patient-ID strategies: stable, collision-free, never a silent pass-through."""

from __future__ import annotations

import pytest

from services.anonymizer.profile import (
    MemoryPseudonymStore,
    PatientIdOptions,
    PseudonymCollision,
    PseudonymError,
    date_offset_days,
    pseudonymize_patient_id,
    read_mapping,
)
from services.anonymizer.profile.dates import age_string, shift_da, shift_dt, timepoint_label

SECRET = b"unit-test project secret"


async def test_hash_is_stable_long_and_prefixed() -> None:
    store = MemoryPseudonymStore()
    opts = PatientIdOptions(strategy="hash", prefix="sub")
    a = await pseudonymize_patient_id("MRN123", opts=opts, secret=SECRET, store=store)
    b = await pseudonymize_patient_id("MRN123", opts=opts, secret=SECRET, store=store)
    c = await pseudonymize_patient_id("MRN124", opts=opts, secret=SECRET, store=store)
    assert a == b != c and a.startswith("sub") and len(a) - 3 >= 64 // 5
    assert "MRN123" not in "".join(store.by_subject)  # the store never sees the original


async def test_hash_collision_is_refused() -> None:
    store = MemoryPseudonymStore()
    opts = PatientIdOptions(strategy="hash")
    taken = await pseudonymize_patient_id("A1", opts=opts, secret=SECRET, store=store)
    store.by_pseudonym[taken] = "someone-else"
    store.by_subject.clear()
    with pytest.raises(PseudonymCollision):
        await pseudonymize_patient_id("A1", opts=opts, secret=SECRET, store=store)


async def test_sequential_allocates_once() -> None:
    store = MemoryPseudonymStore()
    opts = PatientIdOptions(strategy="sequential", prefix="S", digits=3)
    first = await pseudonymize_patient_id("P1", opts=opts, secret=SECRET, store=store)
    second = await pseudonymize_patient_id("P2", opts=opts, secret=SECRET, store=store)
    again = await pseudonymize_patient_id("P1", opts=opts, secret=SECRET, store=store)
    assert (first, second, again) == ("S001", "S002", "S001")


async def test_folder_regex_fallback_and_refusals() -> None:
    store = MemoryPseudonymStore()
    opts = PatientIdOptions(strategy="folder", prefix="", folder_regex=r"subj-(\d+)")
    got = await pseudonymize_patient_id(
        "MRN9", opts=opts, secret=SECRET, store=store, relative_path="subj-042/ses1/a.dcm"
    )
    assert got == "042"
    with pytest.raises(PseudonymError):  # no match and no fallback
        await pseudonymize_patient_id(
            "MRN8", opts=opts, secret=SECRET, store=store, relative_path="x/a.dcm"
        )
    fallback = PatientIdOptions(strategy="folder", prefix="p", folder_fallback="{folder}")
    got = await pseudonymize_patient_id(
        "MRN7", opts=fallback, secret=SECRET, store=store, relative_path="Site_A 7/a.dcm"
    )
    assert got == "pSiteA7"
    with pytest.raises(PseudonymError):  # same patient, another folder
        await pseudonymize_patient_id(
            "MRN7", opts=fallback, secret=SECRET, store=store, relative_path="Site_B/a.dcm"
        )
    with pytest.raises(PseudonymError):  # the folder is the PatientID: a pass-through
        await pseudonymize_patient_id(
            "MRN5",
            opts=PatientIdOptions(strategy="folder", prefix=""),
            secret=SECRET,
            store=store,
            relative_path="MRN5/a.dcm",
        )


async def test_csv_mapping_and_unmapped_policy() -> None:
    text = "original,pseudonym\nMRN1,sub01\nMRN2,sub02\n"
    store = MemoryPseudonymStore()
    opts = PatientIdOptions(strategy="csv", csv_text=text)
    assert await pseudonymize_patient_id("MRN2", opts=opts, secret=SECRET, store=store) == "sub02"
    with pytest.raises(PseudonymError):
        await pseudonymize_patient_id("MRN3", opts=opts, secret=SECRET, store=store)
    lenient = PatientIdOptions(strategy="csv", csv_text=text, unmapped="hash", prefix="h")
    got = await pseudonymize_patient_id("MRN3", opts=lenient, secret=SECRET, store=store)
    assert got.startswith("h") and got != "MRN3"
    with pytest.raises(PseudonymCollision):
        read_mapping("A,sub1\nB,sub1\n")


async def test_none_keeps_the_id() -> None:
    opts = PatientIdOptions(strategy="none")
    store = MemoryPseudonymStore()
    assert await pseudonymize_patient_id("MRN1", opts=opts, secret=SECRET, store=store) == "MRN1"


def test_date_offsets_and_labels() -> None:
    offset = date_offset_days(SECRET, "sub01", (-100, -10))
    assert offset == date_offset_days(SECRET, "sub01", (-100, -10))
    assert -100 <= offset <= -10
    assert len({date_offset_days(SECRET, f"s{i}") for i in range(50)}) > 30
    assert shift_da("20240301", -1) == "20240229"
    assert shift_dt("20240301101010.5+0100", -1) == "20240229101010.5+0100"
    assert age_string("19800615", "20240614") == "043Y"
    assert timepoint_label("20240101", "20240705") == "M06"
    assert timepoint_label("20240101", "20240101") == "M00"


async def test_a_patient_keeps_an_earlier_pseudonym_under_a_deriving_strategy() -> None:
    store = MemoryPseudonymStore()
    mapped = await pseudonymize_patient_id(
        "MRN9", opts=PatientIdOptions(strategy="csv"), secret=SECRET, store=store,
        mapping={"MRN9": "SUBJ-A"},
    )  # fmt: skip
    later = await pseudonymize_patient_id(
        "MRN9", opts=PatientIdOptions(strategy="hash"), secret=SECRET, store=store
    )
    assert mapped == later == "SUBJ-A"
    # a mapping file that now says otherwise is a conflict, never a silent change
    with pytest.raises(PseudonymError):
        await pseudonymize_patient_id(
            "MRN9", opts=PatientIdOptions(strategy="csv"), secret=SECRET, store=store,
            mapping={"MRN9": "SUBJ-B"},
        )  # fmt: skip


# --- a PatientID that names nobody ------------------------------------------------------------


@pytest.mark.parametrize("missing", ["", "   ", "***", "-", "ANONYMOUS", "anonymized", "N/A"])
@pytest.mark.parametrize("strategy", ["hash", "sequential"])
async def test_missing_patient_id_falls_back_to_the_study(missing: str, strategy: str) -> None:
    """hash and sequential key an unnamed patient by the study: stable across runs (same store)
    and across stores (hash), and two unnamed studies never share a subject."""
    store = MemoryPseudonymStore()
    opts = PatientIdOptions(strategy=strategy)  # type: ignore[arg-type]

    async def name(study: str, s: MemoryPseudonymStore = store) -> str:
        return await pseudonymize_patient_id(
            missing, opts=opts, secret=SECRET, store=s, study_ref=study
        )

    a1, b, a2 = await name("study-a"), await name("study-b"), await name("study-a")
    assert a1 == a2 != b and a1 and b
    if strategy == "hash":  # derived, so the same in another cohort's (empty) store too
        assert await name("study-a", MemoryPseudonymStore()) == a1
    assert missing.strip() == "" or missing.upper() not in {a1.upper(), b.upper()}


async def test_missing_patient_id_under_csv_is_refused_with_the_reason() -> None:
    opts = PatientIdOptions(strategy="csv", csv_text="original,pseudonym\nP1,S1\n")
    with pytest.raises(PseudonymError, match=r"PatientID empty or absent.*csv strategy"):
        await pseudonymize_patient_id(
            "", opts=opts, secret=SECRET, store=MemoryPseudonymStore(), study_ref="s"
        )


async def test_missing_patient_id_under_folder_is_one_subject_per_folder() -> None:
    store = MemoryPseudonymStore()
    opts = PatientIdOptions(strategy="folder", folder_depth=0)
    names = [
        await pseudonymize_patient_id(
            "", opts=opts, secret=SECRET, store=store, relative_path=path, study_ref=study
        )
        for path, study in [("p01/s1/a.dcm", "1"), ("p01/s2/b.dcm", "2"), ("p02/c.dcm", "3")]
    ]
    assert names == ["p01", "p01", "p02"]


def test_identity_basis_says_where_a_pseudonym_came_from() -> None:
    from services.anonymizer.profile import identity_of

    opts = PatientIdOptions(strategy="hash")
    assert identity_of("MRN1", "", opts=opts, study_ref="s").basis == "PatientID"
    fallback = identity_of("***", "", opts=opts, study_ref="s")
    assert fallback.basis == "StudyInstanceUID (PatientID has no letters or digits)"
    assert fallback.text == "study:s"


async def test_default_hash_pseudonym_has_no_sub_prefix() -> None:
    """The exporter writes `sub-<pseudonym>`: a default `sub` prefix made `sub-sub...` labels."""
    name = await pseudonymize_patient_id(
        "MRN9", opts=PatientIdOptions(), secret=SECRET, store=MemoryPseudonymStore()
    )
    assert not name.lower().startswith("sub")
