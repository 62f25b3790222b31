"""A small real BIDS dataset built from the shared DICOM and checked by the BIDS validator."""

from __future__ import annotations

import json
from pathlib import Path

from services.exporter.bids import plan_names, write_dataset_files
from services.exporter.convert.dcm2niix import dcm2niix_version
from services.exporter.convert.export import export_stack
from services.exporter.validate import run_bids_validator
from tests.unit.exporter.conftest import StackFactory


def test_real_dataset_is_validator_clean(
    dicom_root: Path, make_stack: StackFactory, tmp_path: Path
) -> None:
    pdt2 = dicom_root / "dcm_qa_pdt2" / "In" / "Siemens" / "VE11"
    fmap = dicom_root / "dcm_qa_fmap" / "In" / "Siemens"
    stacks = [
        make_stack(pdt2, "anat", "PDw", echo=1),
        make_stack(pdt2, "anat", "T2w", echo=2),
        make_stack(fmap / "2_gre_field_magph", "fmap", "magnitude1", echo=1),
        make_stack(fmap / "2_gre_field_magph", "fmap", "magnitude2", echo=2),
        make_stack(fmap / "3_gre_field_magph", "fmap", "phasediff"),
        make_stack(
            dicom_root / "dcm_qa_nih" / "In" / "20180918GE" / "mr_0004",
            "func",
            "bold",
            entities={"task": "rest"},
        ),
        make_stack(
            dicom_root / "dcm_qa_nih" / "In" / "20180918GE" / "mr_0005",
            "func",
            "bold",
            entities={"task": "rest"},
        ),
    ]
    plan = plan_names(stacks)
    exports = [export_stack(s, plan[s.key], tmp_path) for s in stacks]
    write_dataset_files(
        tmp_path, exports, name="Cohortflow test", dcm2niix_version=dcm2niix_version()
    )
    for e in exports:
        print(e.base, e.images, e.skipped, e.warnings)
    report = run_bids_validator(tmp_path)
    print(json.dumps(report.as_json(), indent=1)[:6000])
    assert report.errors == 0, report.error_codes
