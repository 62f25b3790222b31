"""Converting real stacks through `convert_stack` and comparing with dcm2niix's reference outputs (`Ref/`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from nibabel.nifti1 import Nifti1Image

from services.exporter.convert import ConverterError, convert_stack, copy_dicom_stack
from services.exporter.convert import dcm2niix as dcm2niix_module
from tests.unit.exporter.stacks import dicom_files

pytestmark = pytest.mark.needs_dcm2niix

# sidecar keys whose values must match the reference exactly (floats to 1e-6)
SIDECAR_KEYS = (
    "EchoTime",
    "EchoTime1",
    "EchoTime2",
    "RepetitionTime",
    "FlipAngle",
    "PhaseEncodingDirection",
    "EffectiveEchoSpacing",
    "TotalReadoutTime",
    "SeriesNumber",
    "MagneticFieldStrength",
    "EchoNumber",
)

CASES = [
    # (input folder or file, reference base name per produced post-fix); Ref/ is the set's own
    (
        "dcm_qa_pdt2/In/Siemens/VE11",
        {
            "_e1": "Siemens_pd+t2_tse_sag_ISO_1.8mm_3_e1",
            "_e2": "Siemens_pd+t2_tse_sag_ISO_1.8mm_3_e2",
        },
    ),
    ("dcm_qa_fmap/In/Siemens/3_gre_field_magph", {"_e2_ph": "Si_3_gre_field_magph_e2_ph"}),
    (
        "dcm_qa_fmap/In/GE/2_3db0maps",
        {"": "GE_2_3db0maps_patient", "_fieldmaphz": "GE_2_3db0maps_patient_fieldmaphz"},
    ),
    (
        "dcm_qa_enh/In/Philips/IM_0027_fMAP.dcm",
        {
            "_e1": "Philips_WIP_B0_NS_801_e1",
            "_e2_fieldmaphz": "Philips_WIP_B0_NS_801_e2_fieldmaphz",
        },
    ),
    ("dcm_qa_enh/In/Siemens/XA10", {"": "Siemens_REST1_w_SMS_PF7-8_6"}),
    ("dcm_qa_nih/In/20180918GE/mr_0004", {"": "DCM2NIIX_regression_test_4"}),
    ("dcm_qa_nih/In/20180918Si/mr_0003", {"": "EPI_PE=AP_3"}),
    # one Siemens EPI image in nine transfer syntaxes (JPEG lossless, JPEG-LS, JPEG 2000, RLE, ...)
    *((f"dcm_qa_ts/In/{n}.dcm", {"": str(n)}) for n in range(1, 10)),
]


def load_nifti(path: Path | str) -> Nifti1Image:
    image = nib.load(path)
    assert isinstance(image, Nifti1Image)
    return image


def assert_sidecar_matches(ours: dict[str, Any], reference: dict[str, Any]) -> int:
    compared = 0
    for key in SIDECAR_KEYS:
        if key not in reference:
            continue
        assert key in ours, f"{key} missing from our sidecar"
        expected, actual = reference[key], ours[key]
        if isinstance(expected, list) and expected and isinstance(expected[0], float | int):
            assert np.allclose(actual, expected, atol=1e-6), key
        elif isinstance(expected, float):
            assert actual == pytest.approx(expected, abs=1e-6), key
        else:
            assert actual == expected, key
        compared += 1
    if "SliceTiming" in reference:
        # same times; older dcm2niix releases (some Ref/ files) listed them in the opposite slice order
        same_version = ours.get("ConversionSoftwareVersion") == reference.get(
            "ConversionSoftwareVersion"
        )
        ours_times, ref_times = ours["SliceTiming"], reference["SliceTiming"]
        assert isinstance(ours_times, list) and isinstance(ref_times, list)
        if same_version:
            assert np.allclose(ours_times, ref_times, atol=1e-6)
        else:
            assert np.allclose(sorted(ours_times), sorted(ref_times), atol=1e-6)
        compared += 1
    if "ImageType" in reference:  # newer dcm2niix releases append MAGNITUDE/PHASE
        assert isinstance(ours["ImageType"], list) and isinstance(reference["ImageType"], list)
        assert set(reference["ImageType"]) <= set(ours["ImageType"])
        compared += 1
    return compared


@pytest.mark.parametrize(
    ("folder", "expected"),
    CASES,
    ids=[c[0].split("/")[0].removeprefix("dcm_qa_") + ":" + c[0].split("/")[-1] for c in CASES],
)
def test_conversion_matches_reference(
    dicom_root: Path, tmp_path: Path, folder: str, expected: dict[str, str]
) -> None:
    source = dicom_root / folder
    reference = dicom_root / Path(folder).parts[0] / "Ref"
    files = [source] if source.is_file() else dicom_files(source)
    result = convert_stack(files, tmp_path, "stack", compress=True, timeout_s=120)

    assert result.tool == "dcm2niix"
    assert result.tool_version.startswith("v1.0.")
    assert [image.postfix for image in result.images] == list(expected)
    for image in result.images:
        ref = reference / expected[image.postfix]
        ours_img, ref_img = load_nifti(image.nii), load_nifti(f"{ref}.nii")
        assert image.nii.name == f"stack{image.postfix}.nii.gz"
        assert ours_img.shape == ref_img.shape
        assert np.allclose(ours_img.affine, ref_img.affine, atol=1e-4)
        assert np.array_equal(np.asanyarray(ours_img.dataobj), np.asanyarray(ref_img.dataobj))
        assert image.json is not None
        compared = assert_sidecar_matches(
            json.loads(image.json.read_text()), json.loads(Path(f"{ref}.json").read_text())
        )
        assert compared >= 5
    assert not list(tmp_path.glob(".convert-*")), "scratch folder left behind"


def test_diffusion_bvals_and_bvecs_match_reference(dicom_root: Path, tmp_path: Path) -> None:
    source = dicom_root / "dcm_qa_philips_dwi" / "In" / "cl" / "DICOM"
    ref = dicom_root / "dcm_qa_philips_dwi" / "Ref" / "701_DTI_Biobank_2mm_MB3S2_EPI_cl"
    result = convert_stack(dicom_files(source), tmp_path, "dwi", compress=False, timeout_s=120)

    (image,) = [i for i in result.images if i.bval is not None]
    assert image.postfix == ""
    assert image.bvec is not None and image.json is not None
    assert image.bval is not None
    ours_bval = np.loadtxt(image.bval)
    assert np.allclose(ours_bval, np.loadtxt(f"{ref}.bval"))
    assert np.allclose(np.loadtxt(image.bvec), np.loadtxt(f"{ref}.bvec"), atol=1e-4)
    assert load_nifti(image.nii).shape[3] == ours_bval.size
    assert_sidecar_matches(
        json.loads(image.json.read_text()), json.loads(Path(f"{ref}.json").read_text())
    )


def test_fallback_converts_when_dcm2niix_fails(
    dicom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dcm2niix replaced by a binary that exits 1: dicom2nifti makes the file and says so."""
    dcm2niix_module.dcm2niix_version()  # cache the real version before the binary is swapped
    monkeypatch.setattr(dcm2niix_module, "dcm2niix_binary", lambda: Path("/bin/false"))
    source = dicom_root / "dcm_qa_nih" / "In" / "20180918GE" / "mr_0004"
    result = convert_stack(dicom_files(source), tmp_path, "bold", compress=True, timeout_s=300)

    assert result.tool == "dicom2nifti"
    assert result.fallback_reason and "dcm2niix" in result.fallback_reason
    (image,) = result.images
    ref = load_nifti(dicom_root / "dcm_qa_nih" / "Ref" / "DCM2NIIX_regression_test_4.nii")
    ours = load_nifti(image.nii)
    ours_canon, ref_canon = nib.as_closest_canonical(ours), nib.as_closest_canonical(ref)
    assert ours_canon.shape == ref_canon.shape
    assert np.allclose(ours_canon.affine, ref_canon.affine, atol=1e-3)
    assert np.array_equal(np.asanyarray(ours_canon.dataobj), np.asanyarray(ref_canon.dataobj))
    assert image.json is not None
    sidecar = json.loads(image.json.read_text())
    assert sidecar["ConversionSoftware"] == "dicom2nifti"
    assert sidecar["RepetitionTime"] == pytest.approx(5.0)
    assert sidecar["EchoTime"] == pytest.approx(0.03)


def test_timeout_kills_the_converter(dicom_root: Path, tmp_path: Path) -> None:
    source = dicom_root / "dcm_qa_pdt2" / "In" / "Siemens" / "VE11"
    with pytest.raises(ConverterError, match="timed out"):
        convert_stack(
            dicom_files(source),
            tmp_path,
            "dwi",
            compress=True,
            timeout_s=0.01,
            allow_fallback=False,
        )
    assert not list(tmp_path.iterdir()), "nothing may be left after a timeout"


def test_only_the_stacks_files_are_converted(dicom_root: Path, tmp_path: Path) -> None:
    """Echo 2 files alone give one image although echo 1 files sit in the same folder."""
    source = dicom_root / "dcm_qa_pdt2" / "In" / "Siemens" / "VE11"
    result = convert_stack(
        dicom_files(source, echo=2), tmp_path, "t2", compress=True, timeout_s=120
    )
    (image,) = result.images
    ref = load_nifti(
        dicom_root / "dcm_qa_pdt2" / "Ref" / "Siemens_pd+t2_tse_sag_ISO_1.8mm_3_e2.nii"
    )
    assert np.array_equal(np.asanyarray(load_nifti(image.nii).dataobj), np.asanyarray(ref.dataobj))


def test_dicom_copy_is_numbered_by_instance_number(dicom_root: Path, tmp_path: Path) -> None:
    import pydicom

    files = dicom_files(dicom_root / "dcm_qa_fmap" / "In" / "Siemens" / "3_gre_field_magph")
    pairs = copy_dicom_stack(list(reversed(files)), tmp_path / "copy")
    written = [copy for _, copy in pairs]
    assert [p.name for p in written] == [f"{i:05d}.dcm" for i in range(1, len(files) + 1)]
    assert all(source.read_bytes() == copy.read_bytes() for source, copy in pairs)
    numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in written]
    assert numbers == sorted(numbers)


def test_conversion_is_repeatable_byte_for_byte(dicom_root: Path, tmp_path: Path) -> None:
    """Re-running an item (at-least-once delivery) rewrites the same bytes."""
    import time

    files = dicom_files(dicom_root / "dcm_qa_fmap" / "In" / "Siemens" / "3_gre_field_magph")
    first = convert_stack(files, tmp_path / "a", "x", compress=True)
    time.sleep(1.1)  # a time stamp in a header would show up now
    second = convert_stack(files, tmp_path / "b", "x", compress=True)
    assert [f.path.name for f in first.files()] == [f.path.name for f in second.files()]
    for one, two in zip(first.files(), second.files(), strict=True):
        assert one.path.read_bytes() == two.path.read_bytes(), one.path.name
