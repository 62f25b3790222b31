"""Real vendor files that ship inside nibabel: Siemens DWI mosaics (b-values in private tags and in the
CSA header) and a Philips Enhanced MR MPRAGE."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel
import pydicom
import pytest

from services.extractor.catalog import InstanceRecord, build_stacks, parse_instance

NICOM_DATA = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"


def _content(name: str) -> bytes:
    path = NICOM_DATA / name
    assert path.exists(), f"nibabel test file {name} not installed (nibabel ships it)"
    raw = path.read_bytes()
    return gzip.decompress(raw) if name.endswith(".gz") else raw


@pytest.mark.parametrize(
    ("name", "b_value", "gradient"),
    [
        ("siemens_dwi_0.dcm.gz", 0.0, []),
        ("siemens_dwi_1000.dcm.gz", 1000.0, [0.99997449, 0.00505012, -0.00505012]),
    ],
)
def test_siemens_b_value_from_private_header(
    name: str, b_value: float, gradient: list[float]
) -> None:
    record = parse_instance(_content(name), name)
    assert isinstance(record, InstanceRecord) and record.mr is not None
    assert record.mr.b_value == b_value
    assert record.mr.gradient_direction == pytest.approx(gradient)
    assert record.mosaic_slices == 48  # (0019,100A) NumberOfImagesInMosaic


def test_siemens_b_value_from_csa_when_the_private_tags_are_gone() -> None:
    # newer Siemens software writes b only inside the CSA image header (0029,1010)
    ds = pydicom.dcmread(io.BytesIO(_content("siemens_dwi_1000.dcm.gz")))
    del ds[0x0019100C]
    del ds[0x0019100E]
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    record = parse_instance(out.getvalue(), "csa-only.dcm")
    assert isinstance(record, InstanceRecord) and record.mr is not None
    assert record.mr.b_value == 1000.0
    assert record.mr.gradient_direction == pytest.approx([0.99997449, 0.00505012, -0.00505012])


def test_siemens_dwi_b0_and_b1000_form_one_stack_with_both_b_values() -> None:
    # two volumes of one DWI series: b never splits a raw diffusion acquisition
    records = [
        parse_instance(_content(n), n) for n in ("siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz")
    ]
    (stack,) = build_stacks(r for r in records if isinstance(r, InstanceRecord))
    assert stack.stack_key == "MR|TE=93|FA=90|ECHO=1|PART=M|ORIENT=AX"
    assert stack.b_values == [0.0, 1000.0]
    assert (stack.n_volumes, stack.n_slices, stack.n_diffusion_directions) == (2, 48, 1)


def test_philips_enhanced_mprage_is_one_sagittal_stack() -> None:
    record = parse_instance(_content("philips_mprage.dcm.gz"), "philips_mprage.dcm")
    assert isinstance(record, InstanceRecord)
    assert record.sop_class_name == "Enhanced MR Image Storage"
    assert record.number_of_frames == len(record.frames) == 176
    (stack,) = build_stacks([record])
    assert stack.stack_key == "MR|TE=3.51|FA=7|PART=M|ORIENT=SAG"
    assert (stack.n_frames, stack.n_slices, stack.n_volumes) == (176, 176, 1)
