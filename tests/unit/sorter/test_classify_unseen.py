"""Table-driven cases for what the rules had never seen: ASL and M0 of three vendors, derived
perfusion maps, FLAIR/PD/SWI outside the tuned vendors, SE-EPI field maps, diffusion and BOLD without
names. Header values are realistic product values (marked [protocol]) or the vendor conventions named
per row: [dcm2niix] dcm2niix's nii_dicom_batch.cpp / GE and Philips notes, [ExploreASL] its GE tag
table, [ps3.3] the DICOM standard's MR Arterial Spin Labeling macro (C.8.13.5.14).
"""

from __future__ import annotations

from typing import Any

import pytest

from services.sorter.rules import Classification, classify, fingerprint, load_rules
from tests.unit.sorter.headers import make_stack

RULES = load_rules("standard")
SIEMENS = {"Manufacturer": "SIEMENS", "Modality": "MR"}
GE = {"Manufacturer": "GE MEDICAL SYSTEMS", "Modality": "MR"}
PHILIPS = {"Manufacturer": "Philips Medical Systems", "Modality": "MR"}
UIH = {"Manufacturer": "UIH", "Modality": "MR"}
CANON = {"Manufacturer": "Canon Medical Systems", "Modality": "MR"}
ORIG = ["ORIGINAL", "PRIMARY", "M", "ND"]
SIEMENS_EPI = {
    **SIEMENS,
    "SequenceName": "*epfid2d1_64",
    "ScanningSequence": "EP",
    "SequenceVariant": ["SK", "SS"],
    "MRAcquisitionType": "2D",
    "ImageType": [*ORIG, "MOSAIC"],
}


def run(private: dict[str, Any] | None = None, **attrs: Any) -> Classification:
    """Classify a stack; `private` adds raw JSON elements (vendor private tags, the Ascconv member)."""
    stack = make_stack(**attrs)
    stack.header.update(private or {})
    return classify(fingerprint(stack), RULES)


def ascconv(sequence_file: str, repetitions: int) -> dict[str, Any]:
    return {
        "00290010": {"vr": "LO", "Value": ["SIEMENS CSA HEADER"]},
        "00291020": {
            "vr": "OB",
            "Ascconv": {"tSequenceFileName": sequence_file, "lRepetitions": str(repetitions)},
        },
    }


CASES: list[tuple[str, dict[str, Any], dict[str, Any], tuple[str, str], bool | None]] = [
    (
        "siemens 2D pCASL, named only 'perfusion' [dcm2niix tSequenceFileName]",
        {
            **SIEMENS_EPI,
            "RepetitionTime": 4000,
            "EchoTime": 12,
            "FlipAngle": 90,
            "SeriesDescription": "perfusion",
            "n_volumes": 80,
        },
        ascconv("%CustomerSeq%\\ep2d_pcasl", 79),
        ("perf", "asl"),
        False,
    ),
    (
        "siemens 2D PASL named 'ASL' [dcm2niix ep2d_pasl]",
        {
            **SIEMENS_EPI,
            "RepetitionTime": 2500,
            "EchoTime": 13,
            "FlipAngle": 90,
            "SeriesDescription": "ep2d_tra_pasl",
            "n_volumes": 91,
        },
        ascconv("%SiemensSeq%\\ep2d_pasl", 90),
        ("perf", "asl"),
        False,
    ),
    (
        "siemens 3D pCASL M0 (one volume of tgse_pcasl) [dcm2niix tgse_pcasl]",
        {
            **SIEMENS,
            "SequenceName": "*tgse3d1_2496",
            "ScanningSequence": ["SE", "EP"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 5000,
            "EchoTime": 16,
            "ImageType": ORIG,
            "SeriesDescription": "tgse_pcasl_M0",
            "n_volumes": 1,
        },
        ascconv("%SiemensSeq%\\tgse_pcasl", 0),
        ("perf", "m0scan"),
        None,
    ),
    (
        "GE 3D pCASL perfusion pass [ExploreASL (0043,10A3) PSEUDOCONTINUOUS]",
        {
            **GE,
            "ScanningSequence": ["SE"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 4852,
            "EchoTime": 10.5,
            "ImageType": ["ORIGINAL", "PRIMARY", "ASL"],
            "SeriesDescription": "3D ASL (non-contrast)",
        },
        {"004310A3": {"vr": "CS", "Value": ["PSEUDOCONTINUOUS"]}},
        ("perf", "asl"),
        False,
    ),
    (
        "GE 3D ASL proton-density pass = M0 [ExploreASL (0043,10A3) CONTINUOUS]",
        {
            **GE,
            "ScanningSequence": ["SE"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 4852,
            "EchoTime": 10.5,
            "ImageType": ["ORIGINAL", "PRIMARY", "ASL"],
            "SeriesDescription": "3D ASL (non-contrast)",
        },
        {"004310A3": {"vr": "CS", "Value": ["CONTINUOUS"]}},
        ("perf", "m0scan"),
        None,
    ),
    (
        "GE 3D ASL without private tags: DERIVED PERFUSION images are the raw deltam [ExploreASL 421]",
        {
            **GE,
            "ScanningSequence": ["SE"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 4852,
            "EchoTime": 10.5,
            "ImageType": ["DERIVED", "PRIMARY", "ASL", "PERFUSION", "ASL"],
            "SeriesDescription": "Ax 3D pCASL",
        },
        {},
        ("perf", "asl"),
        None,
    ),
    (
        "GE 3D ASL without private tags: ORIGINAL ASL images are the M0 [ExploreASL 421]",
        {
            **GE,
            "ScanningSequence": ["SE"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 4852,
            "EchoTime": 10.5,
            "ImageType": ["ORIGINAL", "PRIMARY", "ASL"],
            "SeriesDescription": "Ax 3D pCASL",
        },
        {},
        ("perf", "m0scan"),
        None,
    ),
    (
        "GE CBF map DERIVED\\PRIMARY\\CBF\\CBF -> derivatives [ExploreASL 421]",
        {
            **GE,
            "ScanningSequence": ["SE"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 4852,
            "EchoTime": 10.5,
            "ImageType": ["DERIVED", "PRIMARY", "CBF", "CBF"],
            "SeriesDescription": "Cerebral Blood Flow",
        },
        {},
        ("derivatives", "perfmap"),
        None,
    ),
    (
        "Philips pCASL label/control frames [dcm2niix (2005,1429)]",
        {
            **PHILIPS,
            "ScanningSequence": "GR",
            "MRAcquisitionType": "2D",
            "RepetitionTime": 4000,
            "EchoTime": 14,
            "FlipAngle": 90,
            "ImageType": ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"],
            "SeriesDescription": "SOURCE - pCASL",
            "n_volumes": 60,
        },
        {"20051429": {"vr": "CS", "Value": ["LABEL"]}},
        ("perf", "asl"),
        None,
    ),
    (
        "Philips separate M0 for pCASL, named 'M0 pCASL' [protocol]",
        {
            **PHILIPS,
            "ScanningSequence": "GR",
            "MRAcquisitionType": "2D",
            "RepetitionTime": 10000,
            "EchoTime": 14,
            "FlipAngle": 90,
            "ImageType": ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"],
            "SeriesDescription": "M0 pCASL",
            "n_volumes": 1,
        },
        {},
        ("perf", "m0scan"),
        None,
    ),
    (
        "enhanced MR ASL M0 frames [ps3.3 ASLContext M_ZERO_SCAN]",
        {
            **SIEMENS,
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4.1",
            "ScanningSequence": "EP",
            "RepetitionTime": 6000,
            "EchoTime": 13,
            "ASLContext": "M_ZERO_SCAN",
            "ImageType": ["ORIGINAL", "PRIMARY", "ASL", "NONE"],
            "SeriesDescription": "pcasl",
        },
        {},
        ("perf", "m0scan"),
        None,
    ),
    (
        "siemens ASL perfusion-weighted (DERIVED ... SUBTRACTION) -> derivatives [dcm2niix]",
        {
            **SIEMENS_EPI,
            "RepetitionTime": 2500,
            "EchoTime": 13,
            "ImageType": ["DERIVED", "PRIMARY", "ASL", "PERFUSION", "SUBTRACTION", "MOSAIC"],
            "SeriesDescription": "ep2d_tra_pasl_PWI",
        },
        ascconv("%SiemensSeq%\\ep2d_pasl", 0),
        ("derivatives", "perfmap"),
        None,
    ),
    (
        "siemens relCBF map -> derivatives [dcm2niix ImageType RELCBF]",
        {
            **SIEMENS_EPI,
            "RepetitionTime": 2500,
            "EchoTime": 13,
            "ImageType": ["DERIVED", "PRIMARY", "ASL", "RELCBF", "MOSAIC"],
            "SeriesDescription": "relCBF",
        },
        {},
        ("derivatives", "perfmap"),
        None,
    ),
    (
        "plain EPI time series, blank names, 200 volumes [protocol]",
        {**SIEMENS_EPI, "RepetitionTime": 2000, "EchoTime": 30, "FlipAngle": 77, "n_volumes": 200},
        {},
        ("func", "bold"),
        False,
    ),
    (
        "Philips FEEPI resting state without bold/fmri words [protocol]",
        {
            **PHILIPS,
            "ScanningSequence": "GR",
            "SequenceVariant": "SK",
            "MRAcquisitionType": "2D",
            "RepetitionTime": 2000,
            "EchoTime": 30,
            "FlipAngle": 90,
            "ImageType": ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"],
            "SeriesDescription": "rs",
            "EchoPlanarPulseSequence": "YES",
            "n_volumes": 240,
        },
        {"20011020": {"vr": "LO", "Value": ["FEEPI"]}},
        ("func", "bold"),
        False,
    ),
    (
        "GE 2D FLAIR, FSE-IR [protocol]",
        {
            **GE,
            "ScanningSequence": ["SE", "IR"],
            "SequenceVariant": ["SK", "SS", "MP"],
            "ScanOptions": ["FAST_GEMS", "IR_GEMS"],
            "MRAcquisitionType": "2D",
            "RepetitionTime": 9000,
            "EchoTime": 120,
            "InversionTime": 2500,
            "FlipAngle": 90,
            "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
            "SeriesDescription": "Ax T2 FLAIR",
            "AngioFlag": "Y",
        },
        {},
        ("anat", "FLAIR"),
        False,
    ),
    (
        "Canon 3D FLAIR, no FLAIR word [protocol]",
        {
            **CANON,
            "ScanningSequence": ["SE", "IR"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 6000,
            "EchoTime": 390,
            "InversionTime": 1800,
            "FlipAngle": 90,
            "ImageType": ["ORIGINAL", "PRIMARY"],
            "SeriesDescription": "3D_ax_iso",
        },
        {},
        ("anat", "FLAIR"),
        None,
    ),
    (
        "2D fast spin echo PD, ORIGINAL with an MPR token [protocol]",
        {
            **SIEMENS,
            "SequenceName": "*tse2d1_9",
            "ScanningSequence": "SE",
            "SequenceVariant": ["SK", "SP"],
            "MRAcquisitionType": "2D",
            "RepetitionTime": 3000,
            "EchoTime": 12,
            "FlipAngle": 150,
            "ImageType": ["ORIGINAL", "PRIMARY", "M", "MPR"],
            "SeriesDescription": "cor 2mm",
        },
        {},
        ("anat", "PDw"),
        None,
    ),
    (
        "vendor SWI, 3D GRE long TE low flip, no SWI word [protocol]",
        {
            **PHILIPS,
            "ScanningSequence": "GR",
            "SequenceVariant": ["SP"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 31,
            "EchoTime": 20,
            "FlipAngle": 17,
            "ImageType": ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"],
            "SeriesDescription": "VEN_BOLD",
        },
        {},
        ("anat", "swi"),
        None,
    ),
    (
        "UIH diffusion, b-values in (0065,1009) only [dcm2niix UIH]",
        {
            **UIH,
            "ScanningSequence": "EP",
            "MRAcquisitionType": "2D",
            "RepetitionTime": 5000,
            "EchoTime": 80,
            "FlipAngle": 90,
            "ImageType": ORIG,
            "SeriesDescription": "ax 30 dir",
            "n_volumes": 31,
        },
        {"00651009": {"vr": "FD", "Value": [1000.0]}},
        ("dwi", "dwi"),
        None,
    ),
    (
        "spin-echo EPI field map, reversed PE, 3 volumes [protocol]",
        {
            **SIEMENS,
            "SequenceName": "*epse2d1_90",
            "ScanningSequence": ["EP", "SE"],
            "MRAcquisitionType": "2D",
            "RepetitionTime": 8000,
            "EchoTime": 66,
            "FlipAngle": 90,
            "ImageType": ORIG,
            "SeriesDescription": "SpinEchoFieldMap_PA",
            "n_volumes": 3,
        },
        {},
        ("fmap", "epi"),
        None,
    ),
    (
        "perfusion-named GRE-EPI series without contrast agent is not DSC [ps3.3 ImageType]",
        {
            **SIEMENS_EPI,
            "RepetitionTime": 1500,
            "EchoTime": 30,
            "ImageType": ["ORIGINAL", "PRIMARY", "PERFUSION", "NONE"],
            "SeriesDescription": "perf",
            "n_volumes": 4,
        },
        {},
        ("func", "bold"),
        None,
    ),
]


@pytest.mark.parametrize(
    ("name", "attrs", "private", "bids", "review"), CASES, ids=[c[0] for c in CASES]
)
def test_unseen_cases(
    name: str,
    attrs: dict[str, Any],
    private: dict[str, Any],
    bids: tuple[str, str],
    review: bool | None,
) -> None:
    result = run(private, **attrs)
    why = f"{name}: {result.as_dict()}"
    assert (result.bids_datatype, result.bids_suffix) == bids, why
    assert result.bids_suffix != "dsc", why
    if review is not None:
        assert result.review_required is review, why


def test_diffusion_without_readable_b_values_and_short_te_is_reviewed_not_bold() -> None:
    """An unseen vendor's DWI: 40 EPI volumes, TE 55 ms, b-values only in tags we do not read."""
    result = run(
        None,
        **{
            **UIH,
            "Manufacturer": "Hyperfine",
            "ScanningSequence": "EP",
            "RepetitionTime": 4000,
            "EchoTime": 55,
            "FlipAngle": 90,
            "ImageType": ORIG,
            "SeriesDescription": "DWI ax",
            "n_volumes": 40,
        },
    )
    assert result.bids_suffix != "bold"
    assert result.review_required or result.bids_suffix == "dwi"


def test_perfusion_without_a_technique_is_unknown_and_reviewed() -> None:
    """ImageType PERFUSION and a 'perfusion' name, nothing else: never guessed as DSC."""
    result = run(
        None,
        **{
            **SIEMENS,
            "ScanningSequence": "GR",
            "ImageType": ["ORIGINAL", "PRIMARY", "PERFUSION"],
            "SeriesDescription": "perfusion",
            "RepetitionTime": 1500,
            "EchoTime": 30,
        },
    )
    assert result.bids_suffix != "dsc" and result.review_required


def test_bidsguess_disagreement_lowers_confidence_and_says_why() -> None:
    """MESE source images: the rules say anat/MESE, the BidsGuess-style opinion T2w."""
    result = run(
        None,
        **{
            **SIEMENS,
            "SequenceName": "se2d16",
            "ScanningSequence": "SE",
            "MRAcquisitionType": "2D",
            "RepetitionTime": 3000,
            "EchoTime": 80,
            "FlipAngle": 180,
            "ImageType": ORIG,
            "echo_times": [20.0, 40.0, 60.0, 80.0, 100.0],
        },
    )
    assert result.bids_suffix == "MESE" and result.review_required
    assert any("BidsGuess-style check says anat/T2w" in r for r in result.review_reasons)
