"""Anonymized series convert like the originals: the safe private list keeps what dcm2niix needs and
the cleaning of vendor blocks (CSA, ASCCONV, GE protocol block) leaves them readable.

dcm2niix must write the same NIfTI (shape, affine, voxels) and the same sidecar, field for field,
except the fields de-identification changes on purpose; a vendor text may differ only where an
identifying value was overwritten with X (the institution "NIH" in `nih_ep2d_bold`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from .conftest import dicom_files, run

pytestmark = pytest.mark.needs_dcm2niix

DCM2NIIX = Path(sys.executable).parent / "dcm2niix"
# sidecar fields that name the institution or device, descriptions cleaned of identifying words,
# and the de-identification markers
DEIDENTIFIED = frozenset(
    {
        "DeidentificationMethod",
        "DeidentificationMethodCodeSequence",
        "DeviceSerialNumber",
        "InstitutionAddress",
        "InstitutionName",
        "InstitutionalDepartmentName",
        "StationName",
        "StudyDescription",
        "ProcedureStepDescription",
        "SeriesDescription",
        "ProtocolName",
        "PatientID",
    }
)


def convert(folder: Path, out: Path) -> list[tuple[Path, dict[str, object]]]:
    """dcm2niix's NIfTI files with their sidecars (and bval/bvec text), ordered by what they hold
    (output names get collision suffixes in the order dcm2niix meets the input files)."""
    out.mkdir()
    subprocess.run(
        [str(DCM2NIIX), "-b", "y", "-z", "n", "-f", "%s_%e", "-o", str(out), str(folder)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    found = []
    for nii in sorted(out.glob("*.nii")):
        sidecar: dict[str, object] = json.loads(nii.with_suffix(".json").read_text())
        for ext in ("bval", "bvec"):
            extra = nii.with_suffix(f".{ext}")
            sidecar[f"({ext})"] = extra.read_text().split() if extra.exists() else None
        found.append((nii, sidecar))
    assert found, "dcm2niix wrote nothing"
    return sorted(found, key=lambda pair: _identity(*pair))


def _identity(nii: Path, sidecar: dict[str, object]) -> str:
    shape = nib.Nifti1Image.from_filename(nii).shape
    return json.dumps([shape, *(sidecar.get(k) for k in ORDER_KEYS)], default=str)


ORDER_KEYS = ("SeriesNumber", "AcquisitionTime", "EchoNumber", "ImageType", "ReconMatrixPE")


def masked_only(original: object, anonymized: object) -> bool:
    """True when `anonymized` is `original` with some characters overwritten by X."""
    a, b = json.dumps(original), json.dumps(anonymized)
    return len(a) == len(b) and all(x == y or y == "X" for x, y in zip(a, b, strict=True))


def anonymize_folder(source: Path, out: Path) -> None:
    out.mkdir()
    for i, path in enumerate(dicom_files(source)):
        result, data = run(path)
        assert result.released
        (out / f"{i:05d}.dcm").write_bytes(data)


SERIES = [
    ("dicom", "dcm_qa_nih/In/20180918Si/mr_0003"),  # Siemens mosaic EPI: CSA slice times
    ("dicom", "dcm_qa_philips_dwi/In/cl/DICOM"),  # Philips classic DTI: b-values and vectors
    ("dicom", "dcm_qa_enh/In/Siemens/XA10"),  # Siemens XA enhanced SMS BOLD
    ("dicom", "dcm_qa_nih/In/20180918GE/mr_0005"),  # GE BOLD: slice timing from GE private tags
    ("dicom", "dcm_qa_fmap/In/GE/2_3db0maps"),  # GE field map
    ("dicom", "dcm_qa_pdt2/In/Siemens/VE11"),  # Siemens PD/T2 (two echoes)
    # held-out scanners
    ("dev", "dicom_parser/rsfmri"),  # Siemens VE11 mosaic BOLD: the date in the ASCCONV
    ("dev", "dcm_qa_me/4_me_fMRI"),  # Siemens multi-echo BOLD: the date in the ASCCONV
    ("dev", "heudiconv/b0dwiForFmap"),  # Siemens diffusion: bval/bvec from the CSA header
    ("dev", "dcm_qa_polar/6_FM_cv12_2_3mm"),  # GE spin-echo EPI: polarity from the GE blocks
    ("dev", "dcm_qa_table/GE_Exam1486_02_Ax_fMRI_FF_I11.1_S15.9"),  # GE fMRI: shim, slice order
    ("dev", "dcm_qa_table/Ph_1301_Dual-echo_iso"),  # Philips magnitude and phase, two echoes
    ("dev", "heudiconv/xa_4d_interrupted"),  # Siemens XA classic
    ("dev", "nibabel/CBU_DTI_64D_1A"),  # Siemens VB DTI: a name word in the XProtocol text
]


@pytest.mark.parametrize(("root", "folder"), SERIES)
def test_anonymized_series_convert_like_the_original(
    dicom_root: Path, dev_corpus_root: Path, tmp_path: Path, root: str, folder: str
) -> None:
    source = (dicom_root if root == "dicom" else dev_corpus_root) / folder
    anonymize_folder(source, tmp_path / "anon")
    original = convert(source, tmp_path / "orig_nii")
    converted = convert(tmp_path / "anon", tmp_path / "anon_nii")
    assert len(original) == len(converted)
    for (a_nii, a), (b_nii, b) in zip(original, converted, strict=True):
        x, y = nib.Nifti1Image.from_filename(a_nii), nib.Nifti1Image.from_filename(b_nii)
        assert x.shape == y.shape
        assert np.array_equal(x.affine, y.affine)
        assert np.array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj))
        for key in sorted((set(a) | set(b)) - DEIDENTIFIED):
            assert masked_only(a.get(key), b.get(key)), f"{key} differs after anonymization"
        assert "PatientName" not in b and b.get("PatientID") in (None, "subTEST01")
