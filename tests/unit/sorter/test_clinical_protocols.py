"""A sweep of routine clinical protocols per vendor: the everyday series a cohort is made of.

Values are representative product-protocol settings (TR/TE/TI/flip angle, ScanningSequence,
SequenceVariant, ScanOptions, ImageType conventions of each vendor as seen in the shared data and in
dcm2niix's vendor notes); they are not copied from one specific file. The test also bounds how many
routine series are sent to review: review must stay meaningful.
"""

from __future__ import annotations

from typing import Any

import pytest

from services.sorter.rules import classify, fingerprint, load_rules
from tests.unit.sorter.headers import make_stack

R = load_rules("standard")
S: dict[str, Any] = {"Manufacturer": "SIEMENS", "Modality": "MR"}
G: dict[str, Any] = {"Manufacturer": "GE MEDICAL SYSTEMS", "Modality": "MR"}
P: dict[str, Any] = {"Manufacturer": "Philips Medical Systems", "Modality": "MR"}
ORIG = ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]

CASES = [
    (
        "si t2 tse tra",
        dict(
            S,
            SequenceName="*tse2d1_17",
            ScanningSequence="SE",
            SequenceVariant=["SK", "SP", "OSP"],
            RepetitionTime=6000,
            EchoTime=99,
            FlipAngle=150,
            ImageType=ORIG,
            SeriesDescription="t2_tse_tra_p2",
        ),
        "anat/T2w",
    ),
    (
        "si t2 flair 2d",
        dict(
            S,
            SequenceName="*tir2d1_21",
            ScanningSequence=["SE", "IR"],
            SequenceVariant=["SK", "SP", "MP"],
            RepetitionTime=9000,
            EchoTime=81,
            InversionTime=2500,
            ImageType=ORIG,
            SeriesDescription="t2_tirm_tra_dark-fluid",
        ),
        "anat/FLAIR",
    ),
    (
        "si t1 fl2d",
        dict(
            S,
            SequenceName="*fl2d1",
            ScanningSequence="GR",
            SequenceVariant=["SP"],
            RepetitionTime=250,
            EchoTime=2.5,
            FlipAngle=70,
            ImageType=ORIG,
            SeriesDescription="t1_fl2d_tra",
        ),
        "anat/T1w",
    ),
    (
        "si t1 se",
        dict(
            S,
            SequenceName="*se2d1",
            ScanningSequence="SE",
            SequenceVariant=["SP"],
            RepetitionTime=550,
            EchoTime=9,
            FlipAngle=90,
            ImageType=ORIG,
            SeriesDescription="t1_se_sag",
        ),
        "anat/T1w",
    ),
    (
        "si t2* hemo",
        dict(
            S,
            SequenceName="*fl2d1",
            ScanningSequence="GR",
            SequenceVariant=["SP"],
            RepetitionTime=650,
            EchoTime=20,
            FlipAngle=20,
            ImageType=ORIG,
            SeriesDescription="t2_fl2d_tra_hemo",
        ),
        "anat/T2starw",
    ),
    (
        "si tof",
        dict(
            S,
            SequenceName="*fl3d1r_t70",
            ScanningSequence="GR",
            SequenceVariant=["SP", "OSP"],
            MRAcquisitionType="3D",
            RepetitionTime=21,
            EchoTime=3.4,
            FlipAngle=18,
            ImageType=ORIG,
            SeriesDescription="tof_3d_multi-slab",
            AngioFlag="Y",
        ),
        "anat/angio",
    ),
    (
        "si tof mip",
        dict(
            S,
            SequenceName="*fl3d1r_t70",
            ScanningSequence="GR",
            RepetitionTime=21,
            EchoTime=3.4,
            FlipAngle=18,
            ImageType=["DERIVED", "SECONDARY", "PROJECTION IMAGE", "CSA MIP"],
            SeriesDescription="tof_3d_multi-slab_MIP_SAG",
        ),
        "derivatives/MIP",
    ),
    (
        "si mprage post",
        dict(
            S,
            SequenceName="*tfl3d1_16ns",
            ScanningSequence=["GR", "IR"],
            SequenceVariant=["SK", "SP", "MP"],
            MRAcquisitionType="3D",
            RepetitionTime=2300,
            EchoTime=2.3,
            InversionTime=900,
            FlipAngle=8,
            ImageType=ORIG,
            SeriesDescription="t1_mprage_sag_KM",
        ),
        "anat/T1w",
    ),
    (
        "si dwi",
        dict(
            S,
            SequenceName="*ep_b1000t",
            ScanningSequence="EP",
            SequenceVariant=["SK", "SP"],
            RepetitionTime=5000,
            EchoTime=80,
            ImageType=["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND", "NORM"],
            SeriesDescription="ep2d_diff_3scan_trace_p2",
            b_values=[0, 1000],
            n_diffusion_directions=3,
            n_volumes=4,
        ),
        "dwi/dwi",
    ),
    (
        "si vibe",
        dict(
            S,
            SequenceName="*fl3d1",
            ScanningSequence="GR",
            SequenceVariant=["SP"],
            ScanOptions=["FS"],
            MRAcquisitionType="3D",
            RepetitionTime=4.2,
            EchoTime=1.9,
            FlipAngle=9,
            ImageType=ORIG,
            SeriesDescription="t1_vibe_fs_tra",
        ),
        "anat/T1w",
    ),
    (
        "si haste",
        dict(
            S,
            SequenceName="*h2d1_256",
            ScanningSequence="SE",
            SequenceVariant=["SK", "SP"],
            RepetitionTime=1400,
            EchoTime=90,
            ImageType=ORIG,
            SeriesDescription="t2_haste_cor",
        ),
        "anat/T2w",
    ),
    (
        "si localizer",
        dict(
            S,
            SequenceName="*fl2d1",
            ScanningSequence="GR",
            RepetitionTime=8.6,
            EchoTime=4,
            FlipAngle=20,
            ImageType=ORIG,
            SeriesDescription="localizer",
            n_slices=3,
        ),
        "",
    ),
    (
        "ge t2 fse",
        dict(
            G,
            ScanningSequence="SE",
            SequenceVariant=["SK", "OSP"],
            ScanOptions=["FAST_GEMS", "FC"],
            RepetitionTime=4500,
            EchoTime=102,
            ImageType=["ORIGINAL", "PRIMARY", "OTHER"],
            SeriesDescription="Ax T2 FSE",
        ),
        "anat/T2w",
    ),
    (
        "ge t2 flair",
        dict(
            G,
            ScanningSequence=["SE", "IR"],
            SequenceVariant=["SK", "SS", "OSP"],
            ScanOptions=["FAST_GEMS", "IR_GEMS"],
            RepetitionTime=9000,
            EchoTime=120,
            InversionTime=2250,
            ImageType=["ORIGINAL", "PRIMARY", "OTHER"],
            SeriesDescription="Ax T2 FLAIR",
        ),
        "anat/FLAIR",
    ),
    (
        "ge dwi",
        dict(
            G,
            ScanningSequence=["EP", "SE"],
            ScanOptions=["EPI_GEMS"],
            RepetitionTime=6000,
            EchoTime=80,
            ImageType=["ORIGINAL", "PRIMARY", "OTHER"],
            SeriesDescription="Ax DWI",
            b_values=[0, 1000],
            n_volumes=2,
        ),
        "dwi/dwi",
    ),
    (
        "ge adc",
        dict(
            G,
            ScanningSequence=["EP", "SE"],
            ScanOptions=["EPI_GEMS"],
            RepetitionTime=6000,
            EchoTime=80,
            ImageType=["DERIVED", "PRIMARY", "ADC"],
            SeriesDescription="Apparent Diffusion Coefficient (mm2/s)",
        ),
        "derivatives/dwimap",
    ),
    (
        "ge 3plane",
        dict(
            G,
            ScanningSequence=["SE"],
            ScanOptions=["FAST_GEMS"],
            RepetitionTime=1200,
            EchoTime=80,
            ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
            SeriesDescription="3Plane Loc SSFSE",
        ),
        "",
    ),
    (
        "ge swan",
        dict(
            G,
            ScanningSequence="GR",
            MRAcquisitionType="3D",
            RepetitionTime=40,
            EchoTime=25,
            FlipAngle=15,
            ImageType=["ORIGINAL", "PRIMARY", "OTHER"],
            SeriesDescription="Ax SWAN",
        ),
        "anat/swi",
    ),
    (
        "ge perfusion dsc",
        dict(
            G,
            ScanningSequence=["EP", "GR"],
            ScanOptions=["EPI_GEMS"],
            RepetitionTime=1500,
            EchoTime=30,
            FlipAngle=60,
            ImageType=["ORIGINAL", "PRIMARY", "OTHER"],
            SeriesDescription="Perfusion",
            n_volumes=60,
            ContrastBolusAgent="Gadavist",
        ),
        "perf/dsc",
    ),
    (
        "ph t2 tse",
        dict(
            P,
            ScanningSequence="SE",
            SequenceVariant="SK",
            RepetitionTime=3000,
            EchoTime=80,
            ImageType=["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"],
            SeriesDescription="T2W_TSE",
        ),
        "anat/T2w",
    ),
    (
        "ph flair",
        dict(
            P,
            ScanningSequence=["SE", "IR"],
            SequenceVariant="SK",
            RepetitionTime=11000,
            EchoTime=125,
            InversionTime=2800,
            ImageType=["ORIGINAL", "PRIMARY", "M_IR", "M", "IR"],
            SeriesDescription="T2W_FLAIR",
        ),
        "anat/FLAIR",
    ),
    (
        "ph t1 3d tfe",
        dict(
            P,
            ScanningSequence="GR",
            SequenceVariant="MP",
            MRAcquisitionType="3D",
            RepetitionTime=8.1,
            EchoTime=3.7,
            FlipAngle=8,
            ImageType=["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"],
            SeriesDescription="sT1W_3D_TFE",
        ),
        "anat/T1w",
    ),
    (
        "ph dwi",
        dict(
            P,
            ScanningSequence="SE",
            SequenceVariant="SK",
            RepetitionTime=3500,
            EchoTime=75,
            ImageType=["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"],
            SeriesDescription="DWI_SENSE",
            b_values=[0, 1000],
            n_volumes=2,
        ),
        "dwi/dwi",
    ),
    (
        "ph adc",
        dict(
            P,
            ScanningSequence="SE",
            SequenceVariant="SK",
            RepetitionTime=3500,
            EchoTime=75,
            ImageType=["DERIVED", "PRIMARY", "ADC", "ADC"],
            SeriesDescription="dADC",
        ),
        "derivatives/dwimap",
    ),
    (
        "ph t2star ffe",
        dict(
            P,
            ScanningSequence="GR",
            SequenceVariant="SP",
            RepetitionTime=700,
            EchoTime=16,
            FlipAngle=18,
            ImageType=["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"],
            SeriesDescription="T2*_FFE",
        ),
        "anat/T2starw",
    ),
    (
        "ph swip",
        dict(
            P,
            ScanningSequence="GR",
            MRAcquisitionType="3D",
            RepetitionTime=31,
            EchoTime=7.2,
            FlipAngle=17,
            ImageType=["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"],
            SeriesDescription="SWIp",
        ),
        "anat/swi",
    ),
    (
        "ph survey",
        dict(
            P,
            ScanningSequence="GR",
            RepetitionTime=11,
            EchoTime=4.6,
            FlipAngle=15,
            ImageType=["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"],
            SeriesDescription="Survey",
        ),
        "",
    ),
    (
        "canon t2",
        dict(
            Manufacturer="TOSHIBA",
            Modality="MR",
            ScanningSequence="SE",
            RepetitionTime=4500,
            EchoTime=105,
            ImageType=["ORIGINAL", "PRIMARY", "OTHER"],
            SeriesDescription="T2WI_FSE",
        ),
        "anat/T2w",
    ),
    (
        "canon flair",
        dict(
            Manufacturer="Canon Medical Systems",
            Modality="MR",
            ScanningSequence=["IR", "SE"],
            RepetitionTime=10000,
            EchoTime=100,
            InversionTime=2600,
            ImageType=["ORIGINAL", "PRIMARY", "OTHER"],
            SeriesDescription="FLAIR",
        ),
        "anat/FLAIR",
    ),
]


def _name(attrs: dict[str, Any]) -> str:
    result = classify(fingerprint(make_stack(**attrs)), R)
    return f"{result.bids_datatype}/{result.bids_suffix}" if result.bids_suffix else ""


@pytest.mark.parametrize(("name", "attrs", "expected"), CASES, ids=[c[0] for c in CASES])
def test_routine_protocol(name: str, attrs: dict[str, Any], expected: str) -> None:
    assert _name(attrs) == expected, name


def test_routine_protocols_rarely_need_review() -> None:
    reviewed = [n for n, a, _ in CASES if classify(fingerprint(make_stack(**a)), R).review_required]
    assert len(reviewed) <= len(CASES) // 5, reviewed
