"""Table-driven classifier tests, one table per axis/branch, with real header values.

Sources of the values (cited per row):
- [shared] ../shared/data/dicom (dcm2niix QA sets) headers, read with pydicom;
- [ref]    dcm2niix reference sidecars in ../shared/data/dicom/*/Ref (Canon DTI, Philips T1TFE,
           Philips resting state: the DICOM values dcm2niix copied, TR/TE converted back to ms);
- [pkg]    files shipped in pydicom / nibabel test data;
- [dcm2niix-docs] value conventions documented in dcm2niix's Siemens/GE/Philips notes and issues
           (Siemens ImageType ADC/FA/TRACEW, MP2RAGE UNI, *swi3d1r, GE EPI_GEMS on DWI/perfusion);
- [protocol] representative product-protocol values (not from a specific file) where no public file
           carries the case; marked so.
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
CANON = {"Manufacturer": "Canon", "Modality": "MR"}
ORIG_M = ["ORIGINAL", "PRIMARY", "M", "ND"]


def run(**attrs: Any) -> Classification:
    return classify(fingerprint(make_stack(**attrs)), RULES)


CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # ---- base / technique: anatomy
    (
        "siemens mprage [protocol]",
        {
            **SIEMENS,
            "SequenceName": "*tfl3d1_16ns",
            "ScanningSequence": ["GR", "IR"],
            "SequenceVariant": ["SK", "SP", "MP"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 2300,
            "EchoTime": 2.98,
            "InversionTime": 900,
            "FlipAngle": 9,
            "ImageType": ORIG_M,
            "SeriesDescription": "t1_mprage_sag_p2_iso",
        },
        {"base": "T1w", "technique": "MPRAGE", "suffix": "T1w", "review": False},
    ),
    (
        "ge ir-spgr [shared dcm_qa_deident]",
        {
            **GE,
            "ScanningSequence": "GR",
            "SequenceVariant": ["SS", "SP", "SK"],
            "ScanOptions": ["FAST_GEMS", "EDR_GEMS", "ACC_GEMS"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 6.964,
            "EchoTime": 2.832,
            "InversionTime": 400,
            "FlipAngle": 11,
            "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
            "SeriesDescription": "Accelerated SAG IR-SPGR",
        },
        {
            "base": "T1w",
            "technique": "MPRAGE",
            "suffix": "T1w",
            "acceleration": {"ParallelImaging"},
        },
    ),
    (
        "philips t1tfe [ref Philips_WIP_AnatBrain_T1W3D_301.json]",
        {
            **PHILIPS,
            "ScanningSequence": "GR",
            "SequenceVariant": "MP",
            "ScanOptions": "SP",
            "SequenceName": "T1TFE",
            "MRAcquisitionType": "3D",
            "RepetitionTime": 8.0286,
            "EchoTime": 4.605,
            "FlipAngle": 8,
            "EchoTrainLength": 32,
            "ImageType": ["ORIGINAL", "PRIMARY", "T1", "MIXED"],
            "SeriesDescription": "AnatBrain_T1W3D",
        },
        {"base": "T1w", "suffix": "T1w"},
    ),
    (
        "philips t1tfe phase [ref ..._T1W3D_301_ph.json]",
        {
            **PHILIPS,
            "ScanningSequence": "GR",
            "SequenceVariant": "MP",
            "SequenceName": "T1TFE",
            "MRAcquisitionType": "3D",
            "RepetitionTime": 8.0286,
            "EchoTime": 4.605,
            "FlipAngle": 8,
            "ImageType": ["ORIGINAL", "PRIMARY", "T1", "MIXED", "PHASE"],
            "SeriesDescription": "AnatBrain_T1W3D",
        },
        {"base": "T1w", "suffix": "T1w", "entities": {"part": "phase"}},
    ),
    (
        "siemens pd echo of pd+t2 [shared dcm_qa_pdt2]",
        {
            **SIEMENS,
            "SequenceName": "*tse2d2_5",
            "ScanningSequence": "SE",
            "SequenceVariant": ["SK", "SP", "OSP"],
            "RepetitionTime": 4320,
            "EchoTime": 11,
            "FlipAngle": 160,
            "ImageType": ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"],
            "SeriesDescription": "pd+t2_tse_sag_ISO_1.8mm",
            "echo_times": [11.0, 92.0],
        },
        {"base": "PDw", "technique": "TSE", "suffix": "PDw"},
    ),
    (
        "siemens t2 echo of pd+t2 [shared dcm_qa_pdt2]",
        {
            **SIEMENS,
            "SequenceName": "*tse2d2_5",
            "ScanningSequence": "SE",
            "SequenceVariant": ["SK", "SP", "OSP"],
            "RepetitionTime": 4320,
            "EchoTime": 92,
            "FlipAngle": 160,
            "ImageType": ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"],
            "SeriesDescription": "pd+t2_tse_sag_ISO_1.8mm",
            "echo_times": [11.0, 92.0],
        },
        {"base": "T2w", "suffix": "T2w"},
    ),
    (
        "siemens space flair [protocol]",
        {
            **SIEMENS,
            "SequenceName": "*spcir_278",
            "ScanningSequence": ["SE", "IR"],
            "SequenceVariant": ["SK", "SP", "MP"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 5000,
            "EchoTime": 387,
            "InversionTime": 1800,
            "FlipAngle": 120,
            "ImageType": ORIG_M,
            "SeriesDescription": "t2_space_dark-fluid_sag",
        },
        {"base": "T2w", "technique": "SPACE", "modifiers": {"FLAIR", "IR"}, "suffix": "FLAIR"},
    ),
    (
        "ge t1 flair [protocol]: T1w acq-flair",
        {
            **GE,
            "ScanningSequence": ["SE", "IR"],
            "ScanOptions": ["FAST_GEMS", "IR_GEMS"],
            "MRAcquisitionType": "2D",
            "RepetitionTime": 2200,
            "EchoTime": 24,
            "InversionTime": 2000,
            "FlipAngle": 111,
            "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
            "SeriesDescription": "Ax T1 FLAIR",
        },
        {"modifiers": {"FLAIR"}, "suffix": "T1w", "entities": {"acq": "flair"}},
    ),
    (
        "ge t1 flair at 3T, TI in the T1 range [protocol]",
        {
            **GE,
            "ScanningSequence": ["SE", "IR"],
            "ScanOptions": ["FAST_GEMS", "IR_GEMS"],
            "MRAcquisitionType": "2D",
            "RepetitionTime": 2200,
            "EchoTime": 10,
            "InversionTime": 920,
            "FlipAngle": 111,
            "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
            "SeriesDescription": "Sag T1 FLAIR",
        },
        {"base": "T1w", "suffix": "T1w", "entities": {"acq": "flair"}, "review": False},
    ),
    (
        "siemens stir [protocol]",
        {
            **SIEMENS,
            "SequenceName": "*tir2d1_13",
            "ScanningSequence": ["SE", "IR"],
            "SequenceVariant": ["SK", "SP", "MP"],
            "RepetitionTime": 4000,
            "EchoTime": 70,
            "InversionTime": 150,
            "FlipAngle": 150,
            "ImageType": ORIG_M,
            "SeriesDescription": "t2_tirm_cor_stir",
        },
        {"modifiers": {"STIR"}, "technique": "TIRM", "suffix": "T2w", "entities": {"acq": "stir"}},
    ),
    (
        "text trap: '64dir' is not DIR [protocol]",
        {
            **SIEMENS,
            "SequenceName": "*ep_b1000#1",
            "ScanningSequence": "EP",
            "SequenceVariant": ["SK", "SP"],
            "RepetitionTime": 8000,
            "EchoTime": 90,
            "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND", "MOSAIC"],
            "SeriesDescription": "DTI_64dir_flair_free",
            "b_values": [0, 1000],
            "n_diffusion_directions": 64,
            "n_volumes": 65,
        },
        {"base": "DWI", "suffix": "dwi", "modifiers_absent": {"DIR"}},
    ),
    # ---- diffusion
    (
        "canon dti [ref Canon_DTI_PA-ortho_9000.json + .bval]",
        {
            **CANON,
            "SeriesDescription": "DTI_PA-ortho",
            "SequenceName": "DTI_PA-ortho",
            "MRAcquisitionType": "2D",
            "ImageType": ["ORIGINAL", "PRIMARY", "GDC", "NONE", "MAGNITUDE"],
            "EchoTime": 79,
            "RepetitionTime": 10000,
            "FlipAngle": 90,
            "EchoTrainLength": 30,
            "b_values": [0, 1500],
            "n_diffusion_directions": 12,
            "n_volumes": 13,
        },
        {"base": "DWI", "suffix": "dwi", "intent": "dwi", "entities": {"dir": "PA"}},
    ),
    (
        "philips dti, b0 stored as 0.001 [shared dcm_qa_philips_dwi]",
        {
            **PHILIPS,
            "ScanningSequence": "SE",
            "SequenceVariant": "SK",
            "ScanOptions": "PFP",
            "RepetitionTime": 4175.7,
            "EchoTime": 69.355,
            "ImageType": ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"],
            "SeriesDescription": "DTI_Biobank_2mm_MB3S2_EPI",
            "b_values": [0.001, 0.002, 1000.0],
            "n_diffusion_directions": 13,
            "n_volumes": 17,
        },
        {"base": "DWI", "technique": "DWI-EPI", "suffix": "dwi"},
    ),
    (
        "siemens ADC map [dcm2niix-docs ImageType ADC]",
        {
            **SIEMENS,
            "SequenceName": "*ep_b0_1000",
            "ScanningSequence": "EP",
            "RepetitionTime": 8000,
            "EchoTime": 90,
            "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND", "NORM"],
            "SeriesDescription": "ep2d_diff_3scan_trace_p2_ADC",
        },
        {
            "constructs": {"ADC"},
            "datatype": "derivatives",
            "intent": "dwi",
            "provenance": "DTIRecon",
        },
    ),
    (
        "siemens TRACEW [dcm2niix-docs]",
        {
            **SIEMENS,
            "SequenceName": "*ep_b1000t",
            "ScanningSequence": "EP",
            "RepetitionTime": 8000,
            "EchoTime": 90,
            "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW", "ND", "NORM"],
            "SeriesDescription": "ep2d_diff_3scan_trace_p2_TRACEW",
            "b_values": [0, 1000],
        },
        {"constructs": {"Trace"}, "datatype": "derivatives"},
    ),
    (
        "text trap: 'trace' in a raw DWI name [protocol]",
        {
            **SIEMENS,
            "SequenceName": "*ep_b1000#1",
            "ScanningSequence": "EP",
            "RepetitionTime": 8000,
            "EchoTime": 90,
            "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND", "MOSAIC"],
            "SeriesDescription": "ep2d_diff_3scan_trace_p2",
            "b_values": [0, 1000],
            "n_diffusion_directions": 3,
            "n_volumes": 4,
        },
        {"suffix": "dwi", "datatype": "dwi", "constructs_absent": {"Trace"}},
    ),
    (
        "siemens FA map [dcm2niix-docs]",
        {
            **SIEMENS,
            "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "FA", "ND", "NORM"],
            "SeriesDescription": "DTI_FA",
            "ScanningSequence": "EP",
            "RepetitionTime": 8000,
            "EchoTime": 90,
        },
        {"constructs": {"FA"}, "datatype": "derivatives"},
    ),
    (
        "reverse-PE b0-only EPI -> fmap/epi [protocol]",
        {
            **SIEMENS,
            "SequenceName": "*ep_b0",
            "ScanningSequence": "EP",
            "RepetitionTime": 8000,
            "EchoTime": 90,
            "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND", "MOSAIC"],
            "SeriesDescription": "dMRI_dir98_PA_b0",
            "b_values": [0],
            "n_volumes": 3,
        },
        {"datatype": "fmap", "suffix": "epi", "entities": {"dir": "PA"}},
    ),
    # ---- functional
    (
        "ge bold [shared dcm_qa_nih mr_0004]",
        {
            **GE,
            "ScanningSequence": ["EP", "GR"],
            "SequenceVariant": "SS",
            "ScanOptions": ["EPI_GEMS", "PFF"],
            "RepetitionTime": 5000,
            "EchoTime": 30,
            "FlipAngle": 60,
            "ImageType": ["ORIGINAL", "PRIMARY", "EPI", "NONE"],
            "SeriesDescription": "Axial EPI-FMRI (Interleaved I to S)",
            "n_volumes": 10,
        },
        {"technique": "BOLD", "suffix": "bold", "intent": "func"},
    ),
    (
        "philips resting state, ImageType PROTON DENSITY trap [ref Philips_WIP_resting_state_1001_e1.json]",
        {
            **PHILIPS,
            "ScanningSequence": "GR",
            "SequenceVariant": "SK",
            "ScanOptions": "FS",
            "SequenceName": "FEEPI",
            "MRAcquisitionType": "2D",
            "RepetitionTime": 1500,
            "EchoTime": 8.203,
            "FlipAngle": 72,
            "EchoTrainLength": 62,
            "ImageType": ["ORIGINAL", "PRIMARY", "PROTON", "DENSITY", "NONE"],
            "SeriesDescription": "resting_state",
            "AcquisitionContrast": "PROTON_DENSITY",
            "EchoPlanarPulseSequence": "YES",
            "EchoPulseSequence": "GRADIENT",
            "n_volumes": 200,
            "echo_times": [8.203, 35.0],
        },
        {"suffix": "bold", "intent": "func", "entities": {"task": "rest", "echo": "1"}},
    ),
    (
        "siemens sbref [protocol]",
        {
            **SIEMENS,
            "SequenceName": "epfid2d1_104",
            "ScanningSequence": "EP",
            "SequenceVariant": ["SK", "SS"],
            "RepetitionTime": 800,
            "EchoTime": 37,
            "FlipAngle": 52,
            "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"],
            "SeriesDescription": "rfMRI_REST_AP_SBRef",
            "n_volumes": 1,
        },
        {"suffix": "sbref", "intent": "func", "entities": {"task": "rest", "dir": "AP"}},
    ),
    # ---- perfusion
    (
        "DSC trap: 'susceptibility' in a perfusion name is not SWI [protocol]",
        {
            **SIEMENS,
            "SequenceName": "*epfid2d1_128",
            "ScanningSequence": "EP",
            "RepetitionTime": 1500,
            "EchoTime": 30,
            "FlipAngle": 90,
            "ImageType": ["ORIGINAL", "PRIMARY", "PERFUSION", "NONE", "ND", "MOSAIC"],
            "SeriesDescription": "ep2d_perf dynamic susceptibility",
            "ContrastBolusAgent": "Gadovist",
            "n_volumes": 50,
        },
        {"base": "PWI", "technique": "DSC", "intent": "perf", "suffix": "dsc"},
    ),
    (
        "siemens pcasl [protocol]",
        {
            **SIEMENS,
            "SequenceName": "*tgse_pcasl3d1",
            "ScanningSequence": ["SE", "EP"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 4000,
            "EchoTime": 16,
            "ImageType": ["ORIGINAL", "PRIMARY", "ASL", "NONE"],
            "SeriesDescription": "tgse_pcasl_PLD1800",
            "n_volumes": 11,
        },
        {"technique": "ASL", "intent": "perf", "suffix": "asl"},
    ),
    (
        "m0 calibration [protocol]",
        {
            **SIEMENS,
            "SequenceName": "*tgse_pcasl3d1",
            "ScanningSequence": ["SE", "EP"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 4000,
            "EchoTime": 16,
            "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
            "SeriesDescription": "tgse_pcasl_M0",
            "n_volumes": 1,
        },
        {"intent": "perf", "suffix": "m0scan"},
    ),
    (
        "cbf map -> derivatives [protocol]",
        {
            **SIEMENS,
            "ImageType": ["DERIVED", "PRIMARY", "ASL", "CBF", "ND"],
            "SeriesDescription": "pcasl_CBF",
            "ScanningSequence": "EP",
            "RepetitionTime": 4000,
            "EchoTime": 16,
        },
        {"constructs": {"CBF"}, "datatype": "derivatives", "intent": "perf"},
    ),
    # ---- SWI, multi-echo, MP2RAGE
    (
        "siemens swi magnitude [dcm2niix-docs *swi3d1r]",
        {
            **SIEMENS,
            "SequenceName": "*swi3d1r",
            "ScanningSequence": "GR",
            "SequenceVariant": ["SP", "OSP"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 27,
            "EchoTime": 20,
            "FlipAngle": 15,
            "ImageType": ORIG_M,
            "SeriesDescription": "SWI_Images_mag",
        },
        {"base": "SWI", "suffix": "swi", "entities": {"part": "mag"}},
    ),
    (
        "siemens swi phase [dcm2niix-docs]",
        {
            **SIEMENS,
            "SequenceName": "*swi3d1r",
            "ScanningSequence": "GR",
            "MRAcquisitionType": "3D",
            "RepetitionTime": 27,
            "EchoTime": 20,
            "FlipAngle": 15,
            "ImageType": ["ORIGINAL", "PRIMARY", "P", "ND"],
            "SeriesDescription": "SWI_Images_Pha",
        },
        {"base": "SWI", "suffix": "swi", "entities": {"part": "phase"}},
    ),
    (
        "siemens swi mIP -> derivatives [dcm2niix-docs]",
        {
            **SIEMENS,
            "SequenceName": "*swi3d1r",
            "ScanningSequence": "GR",
            "MRAcquisitionType": "3D",
            "RepetitionTime": 27,
            "EchoTime": 20,
            "FlipAngle": 15,
            "ImageType": ["DERIVED", "PRIMARY", "MNIP", "ND"],
            "SeriesDescription": "mIP_Images(SW)",
        },
        {"constructs": {"MinIP"}, "datatype": "derivatives", "provenance": "SWIRecon"},
    ),
    (
        "ge swan [protocol]",
        {
            **GE,
            "ScanningSequence": "GR",
            "MRAcquisitionType": "3D",
            "RepetitionTime": 40,
            "EchoTime": 24,
            "FlipAngle": 15,
            "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
            "SeriesDescription": "Ax SWAN",
            "echo_times": [24.0],
        },
        {"base": "SWI", "suffix": "swi"},
    ),
    (
        "siemens megre, 5 echoes [protocol]",
        {
            **SIEMENS,
            "SequenceName": "*fl3d5",
            "ScanningSequence": "GR",
            "SequenceVariant": ["SP"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 40,
            "EchoTime": 12.5,
            "FlipAngle": 15,
            "ImageType": ORIG_M,
            "SeriesDescription": "gre_me_5echo",
            "echo_times": [5.0, 12.5, 20.0, 27.5, 35.0],
        },
        {"technique": "MEGRE", "suffix": "MEGRE", "entities": {"echo": "2", "part": "mag"}},
    ),
    (
        "mp2rage inv1 [protocol]",
        {
            **SIEMENS,
            "SequenceName": "*tfl3d1_16",
            "ScanningSequence": ["GR", "IR"],
            "SequenceVariant": ["SK", "SP", "MP"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 5000,
            "EchoTime": 2.9,
            "InversionTime": 700,
            "FlipAngle": 4,
            "ImageType": ORIG_M,
            "SeriesDescription": "mp2rage_INV1",
            "inversion_times": [700, 2500],
        },
        {"technique": "MP2RAGE", "suffix": "MP2RAGE", "entities": {"inv": "1"}},
    ),
    (
        "mp2rage uni [dcm2niix-docs ImageType UNI]",
        {
            **SIEMENS,
            "SequenceName": "*tfl3d1_16",
            "ScanningSequence": ["GR", "IR"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 5000,
            "EchoTime": 2.9,
            "InversionTime": 700,
            "FlipAngle": 4,
            "ImageType": ["DERIVED", "PRIMARY", "M", "ND", "UNI"],
            "SeriesDescription": "mp2rage_UNI_Images",
        },
        {"constructs": {"UNI"}, "suffix": "UNIT1"},
    ),
    # ---- SyMRI / EPIMix
    (
        "SyMRI MDME source [protocol]",
        {
            **GE,
            "ScanningSequence": "SE",
            "ScanOptions": ["FAST_GEMS"],
            "MRAcquisitionType": "2D",
            "RepetitionTime": 4000,
            "EchoTime": 22,
            "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
            "SeriesDescription": "MAGiC",
            "echo_times": [22.0, 100.0],
            "inversion_times": [150, 580, 1850, 3800],
        },
        {"technique": "MDME", "provenance": "SyMRI", "suffix": "MDME"},
    ),
    (
        "SyMRI synthetic T2 -> derivatives (standard) [protocol]",
        {
            **SIEMENS,
            "ImageType": ["DERIVED", "PRIMARY", "SYNTHETIC", "T2"],
            "SeriesDescription": "SyMRI T2W",
            "ScanningSequence": "SE",
            "RepetitionTime": 4500,
            "EchoTime": 100,
        },
        {"provenance": "SyMRI", "datatype": "derivatives"},
    ),
    (
        "EPIMix output [protocol]",
        {
            **GE,
            "ScanningSequence": ["EP", "SE"],
            "ScanOptions": ["EPI_GEMS"],
            "RepetitionTime": 3000,
            "EchoTime": 80,
            "ImageType": ["DERIVED", "PRIMARY", "OTHER"],
            "SeriesDescription": "EPIMix T2-FLAIR",
        },
        {"provenance": "EPIMix"},
    ),
    # ---- flags
    (
        "post contrast from ContrastBolusAgent [pkg examples_overlay.dcm]",
        {
            **SIEMENS,
            "SequenceName": "*fl3d1",
            "ScanningSequence": "GR",
            "SequenceVariant": "SP",
            "ScanOptions": ["SAT2", "FS"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": 5.53,
            "EchoTime": 2.81,
            "FlipAngle": 10,
            "ImageType": ORIG_M,
            "SeriesDescription": "t1_vibe_fs_tra_bh",
            "ContrastBolusAgent": "11 ml Omniscan",
        },
        {"post_contrast": True, "entities": {"ce": "omniscan"}, "modifiers": {"FatSat"}},
    ),
    (
        "post contrast from '+C' text [protocol]",
        {
            **GE,
            "ScanningSequence": "SE",
            "RepetitionTime": 500,
            "EchoTime": 10,
            "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
            "SeriesDescription": "AX T1 SE +C",
        },
        {"post_contrast": True, "base": "T1w", "entities": {"ce": "gadolinium"}},
    ),
    (
        "pre contrast from '-K' text [protocol]",
        {
            **SIEMENS,
            "SequenceName": "*se2d1",
            "ScanningSequence": "SE",
            "RepetitionTime": 500,
            "EchoTime": 10,
            "ImageType": ORIG_M,
            "SeriesDescription": "T1_SE_tra -K",
        },
        {"post_contrast": False, "base": "T1w"},
    ),
    (
        "spinal cord -> review by policy [protocol]",
        {
            **SIEMENS,
            "SequenceName": "*tse2d1_15",
            "ScanningSequence": "SE",
            "SequenceVariant": ["SK", "SP"],
            "RepetitionTime": 3500,
            "EchoTime": 95,
            "ImageType": ORIG_M,
            "SeriesDescription": "t2_tse_sag_C-spine",
            "BodyPartExamined": "CSPINE",
        },
        {"spinal_cord": True, "review": True, "suffix": "T2w"},
    ),
    (
        "mr localizer [protocol, ImageType of Siemens localizers]",
        {
            **SIEMENS,
            "SequenceName": "*fl2d1",
            "ScanningSequence": "GR",
            "RepetitionTime": 8.6,
            "EchoTime": 4,
            "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM", "LOCALIZER"]
            if False
            else ["ORIGINAL", "PRIMARY", "LOCALIZER"],
            "SeriesDescription": "localizer",
            "n_slices": 3,
        },
        {"localizer": True, "intent": "localizer", "suffix": ""},
    ),
    # ---- CT / PET
    (
        "ct with contrast [pkg CT_small.dcm]",
        {
            "Manufacturer": "GE MEDICAL SYSTEMS",
            "Modality": "CT",
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
            "KVP": 120,
            "ConvolutionKernel": "STANDARD",
            "ContrastBolusAgent": "ISOVUE300/100",
            "ScanOptions": "HELICAL MODE",
        },
        {
            "datatype": "ct",
            "post_contrast": True,
            "kernel": "standard",
            "entities": {"ce": "isovue300", "rec": "standard"},
        },
    ),
    (
        "ct topogram [protocol, Siemens CT localizer]",
        {
            "Manufacturer": "SIEMENS",
            "Modality": "CT",
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
            "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER", "CT_SOM5 TOP"],
            "KVP": 120,
            "SeriesDescription": "Topogram 0.6 T20f",
        },
        {"intent": "localizer", "localizer": True},
    ),
    (
        "ct bone kernel [protocol, Siemens kernel B70f]",
        {
            "Manufacturer": "SIEMENS",
            "Modality": "CT",
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
            "KVP": 120,
            "ConvolutionKernel": "B70f",
            "SeriesDescription": "Head 1.0 B70f",
        },
        {"kernel": "bone", "entities": {"rec": "bone"}},
    ),
    (
        "pet attenuation corrected [protocol]",
        {
            "Manufacturer": "SIEMENS",
            "Modality": "PT",
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.128",
            "ImageType": ["ORIGINAL", "PRIMARY"],
            "CorrectedImage": ["NORM", "DTIM", "ATTN", "SCAT", "DECY"],
            "Units": "BQML",
            "SeriesDescription": "PET AC Brain",
            "n_volumes": 1,
        },
        {
            "intent": "pet",
            "datatype": "pet",
            "suffix": "pet",
            "pet_recon": "AC",
            "entities": {"rec": "acstat"},
        },
    ),
    (
        "pet not attenuation corrected [protocol]",
        {
            "Manufacturer": "SIEMENS",
            "Modality": "PT",
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.128",
            "ImageType": ["ORIGINAL", "PRIMARY"],
            "CorrectedImage": ["NORM", "DTIM", "DECY"],
            "Units": "BQML",
            "SeriesDescription": "PET NAC Brain",
            "n_volumes": 4,
        },
        {"pet_recon": "NAC", "entities": {"rec": "nacdyn"}},
    ),
]


@pytest.mark.parametrize(("name", "attrs", "expected"), CASES, ids=[c[0] for c in CASES])
def test_axes(name: str, attrs: dict[str, Any], expected: dict[str, Any]) -> None:
    result = run(**attrs)
    why = f"{name}: {result.as_dict()}"
    for key, value in expected.items():
        if key == "suffix":
            assert result.bids_suffix == value, why
        elif key == "datatype":
            assert result.bids_datatype == value, why
        elif key == "review":
            assert result.review_required is value, why
        elif key in ("modifiers", "constructs", "acceleration"):
            assert value <= getattr(result, key), why
        elif key.endswith("_absent"):
            assert not (value & getattr(result, key.removesuffix("_absent"))), why
        elif key == "entities":
            for entity, label in value.items():
                assert result.entities.get(entity) == label, why
        else:
            assert getattr(result, key) == value, why


def test_evidence_records_every_vote_with_its_source() -> None:
    result = run(**CASES[0][1])
    sources = {e.source for e in result.evidence}
    assert {"coded", "vendor", "physics", "text"} <= sources
    assert any(
        e.rule == "si_tfl3d" and e.axis == "technique" and e.value == "MPRAGE"
        for e in result.evidence
    )


def test_text_only_decision_is_uncertain_and_reviewed() -> None:
    result = run(Manufacturer="Unknown", Modality="MR", SeriesDescription="T2 axial")
    assert result.base == "T2w" and result.bids_suffix == "T2w"
    assert result.confidence < RULES.policy.review_below and result.review_required


def test_coded_evidence_outranks_contradicting_text() -> None:
    # Siemens MPRAGE whose description says "T2" (a typing error): coded+vendor+physics win, no review
    result = run(**{**CASES[0][1], "SeriesDescription": "T2_sag"})
    assert result.base == "T1w" and not result.review_required


def test_no_evidence_gives_unknown_not_a_guess() -> None:
    result = run(Manufacturer="Unknown", Modality="MR")
    assert result.base == "unknown" and result.bids_suffix == "" and result.review_required


def test_research_profile_names_symri_synthetic_as_anat() -> None:
    # synthetic T2 FLAIR from SyMRI: derivatives in the standard profile, anat rec-synthetic in research
    attrs = {
        **SIEMENS,
        "ImageType": ["DERIVED", "PRIMARY", "SYNTHETIC", "T2"],
        "ScanningSequence": "SE",
        "RepetitionTime": 15000,
        "EchoTime": 100,
        "InversionTime": 3000,
        "SeriesDescription": "SyMRI T2 FLAIR",
    }
    stack = make_stack(**attrs)
    standard = classify(fingerprint(stack), RULES)
    research = classify(fingerprint(stack), load_rules("research"))
    assert standard.bids_datatype == "derivatives" and standard.entities.get("rec") == "synthetic"
    assert (research.bids_datatype, research.bids_suffix) == ("anat", "FLAIR")
    assert (
        research.entities["rec"] == "synthetic" and research.rule_version != standard.rule_version
    )


def test_as_dict_is_json_ready() -> None:
    import json

    row = run(**CASES[0][1]).as_dict()
    assert json.loads(json.dumps(row))["evidence"][0].keys() == {
        "rule",
        "source",
        "axis",
        "value",
        "weight",
    }
    assert isinstance(row["modifiers"], list)


@pytest.mark.parametrize(
    ("part", "datatype", "suffix"),
    [
        (
            "B0MAP",
            "fmap",
            "fieldmap",
        ),  # extractor splits GE B0map series by (0043,1030): 0 -> B0MAP
        ("M", "fmap", "magnitude"),  # ... and 2 -> M
    ],
)
def test_extractor_part_constant_is_understood(part: str, datatype: str, suffix: str) -> None:
    # [shared] dcm_qa_fmap/In/GE/2_3db0maps header values, PART as the real extractor writes it
    stack = make_stack(
        **{
            **GE,
            "ScanningSequence": "RM",
            "SequenceVariant": "NONE",
            "ScanOptions": "VB_GEMS",
            "MRAcquisitionType": "2D",
            "RepetitionTime": 800,
            "EchoTime": 4.94,
            "FlipAngle": 10,
            "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
            "SeriesDescription": "B0Map (GRE)",
            "ProtocolName": "3db0maps_patient",
        },
        constants={"TE": 4.94, "PART": part},
    )
    result = classify(fingerprint(stack), RULES)
    assert (result.bids_datatype, result.bids_suffix) == (datatype, suffix)


def test_extractor_part_adc() -> None:
    stack = make_stack(
        **{
            **PHILIPS,
            "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION"],
            "ScanningSequence": "SE",
            "RepetitionTime": 4000,
            "EchoTime": 70,
            "SeriesDescription": "dADC",
        },
        constants={"PART": "ADC"},
    )
    result = classify(fingerprint(stack), RULES)
    assert "ADC" in result.constructs and result.bids_datatype == "derivatives"


@pytest.mark.parametrize(
    ("image_type", "te", "echo_times", "suffix"),
    [
        (
            ["ORIGINAL", "PRIMARY", "P", "ND"],
            7.38,
            [7.38],
            "phasediff",
        ),  # [pkg] heudiconv 01-fmap_acq-3mm
        (
            ["ORIGINAL", "PRIMARY", "P", "ND"],
            4.92,
            [4.92, 7.38],
            "phase1",
        ),  # [protocol] two phase images
        (["ORIGINAL", "PRIMARY", "P", "ND"], 7.38, [4.92, 7.38], "phase2"),
        (["ORIGINAL", "PRIMARY", "M", "ND"], 4.92, [4.92, 7.38], "magnitude1"),
        (["ORIGINAL", "PRIMARY", "M", "ND"], 7.38, [4.92, 7.38], "magnitude2"),
    ],
)
def test_siemens_fieldmap_numbering(
    image_type: list[str], te: float, echo_times: list[float], suffix: str
) -> None:
    result = run(
        **{
            **SIEMENS,
            "SequenceName": "*fm2d2r",
            "ScanningSequence": "GR",
            "SequenceVariant": "SP",
            "RepetitionTime": 9.7,
            "EchoTime": te,
            "FlipAngle": 60,
            "ImageType": image_type,
            "SeriesDescription": "fmap_acq-3mm",
            "echo_times": echo_times,
        }
    )
    assert (result.bids_datatype, result.bids_suffix) == ("fmap", suffix)


def test_pet_tracer_entity() -> None:
    result = run(
        Manufacturer="SIEMENS",
        Modality="PT",
        SOPClassUID="1.2.840.10008.5.1.4.1.1.128",
        ImageType=["ORIGINAL", "PRIMARY"],
        CorrectedImage=["NORM", "ATTN", "DECY"],
        Units="BQML",
        Radiopharmaceutical="Fluorodeoxyglucose",
        SeriesDescription="PET Brain",
    )
    assert result.entities["trc"] == "fluorodeoxyglucose" and result.pet_recon == "AC"


def test_vendor_word_traps() -> None:
    # SENSE is parallel imaging, not GRAPPA-specific; Canon FASE is fast TSE, not RESOLVE;
    # a plain Siemens DWI EPI is not multishot
    sense = run(
        **{
            **PHILIPS,
            "ScanningSequence": "SE",
            "SequenceVariant": "SK",
            "RepetitionTime": 3000,
            "EchoTime": 80,
            "ImageType": ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"],
            "ParallelAcquisitionTechnique": "SENSE",
            "SeriesDescription": "T2W_TSE SENSE",
        }
    )
    assert sense.acceleration == {"ParallelImaging"}
    fase = run(
        **{
            **CANON,
            "ScanningSequence": "SE",
            "RepetitionTime": 4000,
            "EchoTime": 90,
            "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
            "SeriesDescription": "T2 FASE3D",
        }
    )
    assert fase.technique == "TSE" and fase.base == "T2w"
    siemens_dwi = run(
        **CASES[[c[0] for c in CASES].index("text trap: '64dir' is not DIR [protocol]")][1]
    )
    assert siemens_dwi.technique == "DWI-EPI"


def test_processed_swi_goes_to_derivatives_and_epimix_is_marked() -> None:
    # [dcm2niix-docs] Siemens processed SWI images: DERIVED ImageType with SWI
    processed = run(
        **{
            **SIEMENS,
            "SequenceName": "*swi3d1r",
            "ScanningSequence": "GR",
            "MRAcquisitionType": "3D",
            "RepetitionTime": 27,
            "EchoTime": 20,
            "FlipAngle": 15,
            "ImageType": ["DERIVED", "PRIMARY", "SWI", "NORM"],
            "SeriesDescription": "SWI_Images",
        }
    )
    assert (processed.bids_datatype, processed.bids_suffix) == ("derivatives", "swi")
    assert processed.provenance == "SWIRecon"
    epimix = run(
        **{
            **GE,
            "ScanningSequence": ["EP", "SE"],
            "ScanOptions": ["EPI_GEMS"],
            "RepetitionTime": 3000,
            "EchoTime": 80,
            "ImageType": ["DERIVED", "PRIMARY", "OTHER"],
            "SeriesDescription": "EPIMix T2-FLAIR",
        }
    )
    assert epimix.provenance == "EPIMix" and epimix.entities.get("rec") == "epimix"
