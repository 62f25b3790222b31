"""Fingerprints from real headers: vendor names, text tokens, sequence names, enhanced objects."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.sorter.rules import fingerprint, fingerprint_batch, fingerprint_version
from services.sorter.rules.fingerprint import orientation_label
from services.sorter.rules.text import tokenize
from services.sorter.rules.vocabulary import vocabulary
from tests.unit.sorter.headers import make_stack
from tests.unit.sorter.stack_builder import build_stacks


@pytest.mark.parametrize(
    ("manufacturer", "vendor"),
    [
        ("SIEMENS", "siemens"),  # [shared] dcm_qa_fmap Siemens
        ("Siemens HealthCare GmbH", "siemens"),  # [shared] dcm_qa_enh XA10
        ("Siemens Healthineers", "siemens"),  # spec
        ("GE MEDICAL SYSTEMS", "ge"),  # [shared] dcm_qa_nih GE
        ("G.E. Medical Systems", "ge"),  # [pkg] pydicom ExplVR_BigEnd.dcm
        ("Philips Medical Systems", "philips"),  # [shared] dcm_qa_fmap Philips
        ("Philips", "philips"),  # [shared] dcm_qa_philips_dwi
        ("Philips Healthcare", "philips"),
        ("TOSHIBA_MEC", "canon"),  # [pkg] pydicom MR_small.dcm
        ("Canon", "canon"),  # [ref] Canon_DTI_PA-ortho_9000.json
        ("Canon Medical Systems", "canon"),
        ("Generic Electronics", "unknown"),  # 'ge' inside a word never matches
        ("Imaging Siemensstadt Lab", "unknown"),  # nor 'siemens' inside a word
        ("", "unknown"),
    ],
)
def test_vendor_whole_name_matching(manufacturer: str, vendor: str) -> None:
    assert vocabulary().vendor(manufacturer) == vendor


@pytest.mark.parametrize(
    ("text", "present", "absent"),
    [
        ("T1 MPRAGE +C", {"t1", "mprage", "postcontrast"}, {"c"}),
        ("Ax T1 SE -K", {"t1", "precontrast"}, {"k"}),
        ("T1_KM+", {"postcontrast"}, set()),
        ("t1-cor", {"t1", "cor", "t1cor"}, {"precontrast"}),  # '-c' inside a word is not '-C'
        ("DTI_64dir", {"dti", "64dir"}, {"dir"}),  # trap: not double inversion recovery
        ("pd+t2_tse_sag", {"pd", "t2", "tse"}, set()),
        ("T2*_GRE", {"t2star", "gre"}, set()),
        ("Accelerated SAG IR-SPGR", {"ir", "spgr", "irspgr"}, set()),  # [shared] dcm_qa_deident
        ("REST1 w SMS PF7-8", {"rest", "rest1", "sms"}, set()),  # [shared] dcm_qa_enh XA10
        ("B0Map (GRE)", {"b0map", "gre"}, set()),  # [shared] dcm_qa_fmap GE
        ("t2_tse_sag_C-spine", {"cspine"}, set()),
        ("Scout", {"localizer"}, set()),
    ],
)
def test_tokenize_keeps_keywords(text: str, present: set[str], absent: set[str]) -> None:
    tokens = tokenize(text)
    assert present <= tokens, tokens
    assert not (absent & tokens), tokens


@pytest.mark.parametrize(
    ("iop", "label"),
    [
        ([1, 0, 0, 0, 1, 0], "AX"),
        ([0, 1, 0, 0, 0, -1], "SAG"),
        ([1, 0, 0, 0, 0, -1], "COR"),
        ([1, 0, 0, 0, 0.7071, 0.7071], "OBL"),
        ([], ""),
    ],
)
def test_orientation(iop: list[float], label: str) -> None:
    assert orientation_label(iop) == label


def test_siemens_sequence_name_tokens() -> None:
    # [shared] dcm_qa_fmap Siemens *fm2d2r; [pkg] nibabel slicethickness_empty_string *fl3d1r_t70
    fm = fingerprint(make_stack(Manufacturer="SIEMENS", SequenceName="*fm2d2r"))
    assert {"seq:fm", "seqdim:2d"} <= fm.features
    tof = fingerprint(make_stack(Manufacturer="SIEMENS", SequenceName="*fl3d1r_t70"))
    assert {"seq:fl", "seqdim:3d", "seqsfx:t"} <= tof.features
    dwi = fingerprint(make_stack(Manufacturer="SIEMENS", SequenceName="*ep_b1000#12"))
    assert "seq:ep_b" in dwi.features


def test_private_b_value_only_trusted_for_its_vendor() -> None:
    # (2001,1003) is Philips' b-factor; the same element number from another vendor is ignored
    from pydicom.dataset import Dataset

    from shared.catalog import StackSummary

    def stack(manufacturer: str) -> StackSummary:
        ds = Dataset()
        ds.Manufacturer = manufacturer
        ds.Modality = "MR"
        ds.add_new((0x2001, 0x0010), "LO", "Philips Imaging DD 001")
        ds.add_new((0x2001, 0x1003), "FL", 1000.0)
        return StackSummary(
            subject_id="s",
            study_instance_uid="1",
            series_instance_uid="2",
            stack_key="MR",
            modality="MR",
            header=ds.to_json_dict(),
        )

    assert fingerprint(stack("Philips Medical Systems")).b_values == (1000.0,)
    assert fingerprint(stack("SIEMENS")).b_values == ()


def test_real_headers_classic_and_enhanced(dicom_root: Path) -> None:
    philips_dwi = build_stacks((dicom_root / "dcm_qa_philips_dwi/In/cl/DICOM").iterdir())
    dwi = next(fingerprint(s) for s in philips_dwi if s.stack_key.startswith("MR|TE=69"))
    assert dwi.vendor == "philips" and max(dwi.b_values) == 1000.0
    assert min(dwi.b_values) < 0.01  # trap: b0 stored as 0.001..0.004
    assert {"phys:b_high", "phys:dti_dirs"} <= dwi.features

    enhanced = [
        fingerprint(s) for s in build_stacks((dicom_root / "dcm_qa_fmap/In/Philips/fmap").iterdir())
    ]
    kinds = {fp.complex_component: fp for fp in enhanced}
    assert "it:field_map" in kinds["REAL"].features  # per-frame FrameType of the B0 frames
    assert kinds["MAGNITUDE"].acquisition_contrast == "T1"
    assert kinds["MAGNITUDE"].echo_pulse_sequence == "GRADIENT"

    xa = fingerprint(build_stacks((dicom_root / "dcm_qa_enh/In/Siemens/XA10").iterdir())[0])
    assert xa.parallel_technique == "SMS" and xa.vendor == "siemens"
    assert "seq:epfid" in xa.features  # PulseSequenceName (0018,9005) '*epfid2d1_64'

    ge = [
        fingerprint(s)
        for s in build_stacks((dicom_root / "dcm_qa_fmap/In/GE/6_CV_Neuro").iterdir())
    ]
    signed = [fp for fp in ge if "phys:signed_values" in fp.features]
    assert len(signed) == 1 and "gevas:0" in signed[0].features  # the field map in Hz


def test_batch_equals_single_and_version_names_vocabulary() -> None:
    stacks = [
        make_stack(Manufacturer="SIEMENS", SeriesDescription=f"t1_mprage {i % 3}")
        for i in range(10)
    ]
    batch = fingerprint_batch(stacks)
    assert [fp.features for fp in batch] == [fingerprint(s).features for s in stacks]
    assert fingerprint_version().startswith("fp2.m1.")
    row = batch[0].as_dict()
    assert isinstance(row["features"], list) and row["vendor"] == "siemens"
