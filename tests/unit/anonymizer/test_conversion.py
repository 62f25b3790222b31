"""Anonymized series still convert: the safe private list keeps what dcm2niix needs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import dicom_files, run

DCM2NIIX = Path(sys.executable).parent / "dcm2niix"
# sidecar fields that come from private vendor tags or need them (slice timing, diffusion, EPI)
COMPARED = (
    "SliceTiming",
    "PhaseEncodingDirection",
    "EffectiveEchoSpacing",
    "TotalReadoutTime",
    "MultibandAccelerationFactor",
    "RepetitionTime",
    "EchoTime",
    "ImageType",
    "PulseSequenceName",
    "SequenceName",
    "ParallelReductionFactorInPlane",
)


def convert(folder: Path, out: Path) -> dict[str, object]:
    out.mkdir()
    subprocess.run(
        [str(DCM2NIIX), "-b", "y", "-z", "n", "-f", "%s", "-o", str(out), str(folder)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    sidecars = sorted(out.glob("*.json"))
    assert sidecars, "dcm2niix wrote nothing"
    found: dict[str, object] = {"json": json.loads(sidecars[0].read_text())}
    for ext in ("bval", "bvec"):
        files = sorted(out.glob(f"*.{ext}"))
        found[ext] = files[0].read_text().split() if files else None
    return found


@pytest.mark.parametrize(
    "folder",
    [
        "dcm_qa_nih/In/20180918Si/mr_0003",  # Siemens mosaic EPI: CSA slice times, polarity
        "dcm_qa_philips_dwi/In/cl/DICOM",  # Philips classic DTI: b-values and vectors
        "dcm_qa_enh/In/Siemens/XA10",  # Siemens XA enhanced SMS BOLD
        "dcm_qa_nih/In/20180918GE/mr_0005",  # GE BOLD: slice timing from GE private tags
    ],
)
def test_anonymized_series_convert_like_the_original(
    dicom_root: Path, tmp_path: Path, folder: str
) -> None:
    source = dicom_root / folder
    anon = tmp_path / "anon"
    anon.mkdir()
    for i, path in enumerate(dicom_files(source)):
        result, data = run(path)
        assert result.released
        (anon / f"{i:05d}.dcm").write_bytes(data)
    original = convert(source, tmp_path / "orig_nii")
    converted = convert(anon, tmp_path / "anon_nii")
    a, b = original["json"], converted["json"]
    assert isinstance(a, dict) and isinstance(b, dict)
    for key in COMPARED:
        assert a.get(key) == b.get(key), f"{key} differs after anonymization"
    assert original["bval"] == converted["bval"]
    assert original["bvec"] == converted["bvec"]
    assert "PatientName" not in b and b.get("PatientID") in (None, "subTEST01")
