"""Real DICOM stacks from the team's data, described as the export service would describe them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom

from services.exporter.bids.stack import ExportStack
from shared.catalog import StackSummary


def dicom_files(folder: Path, echo: int | None = None) -> list[Path]:
    """The DICOM files of a folder (recursively), optionally only those of one EchoNumbers value."""
    return list(_dicom_files(folder, echo))


@functools.cache
def _dicom_files(folder: Path, echo: int | None) -> tuple[Path, ...]:
    # read once per folder and echo: many tests export the same real series
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix.lower() in (".txt", ".md", ".json"):
            continue
        header = pydicom.dcmread(
            path, stop_before_pixels=True, force=True, specific_tags=["SOPClassUID", "EchoNumbers"]
        )
        if "SOPClassUID" not in header:
            continue
        if echo is not None and int(header.get("EchoNumbers", 1)) != echo:
            continue
        found.append(path)
    return tuple(found)


def summary_of(files: list[Path], stack_key: str) -> StackSummary:
    """A `StackSummary` of real files, from the first instance's header (as the extractor keeps it)."""
    header = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)
    return StackSummary(
        subject_id=str(header.get("PatientID", "anon")),
        study_instance_uid=str(header.StudyInstanceUID),
        series_instance_uid=str(header.SeriesInstanceUID),
        stack_key=stack_key,
        # the per-volume constants the extractor puts in stack_key: EchoNumbers (0018,0086),
        # EchoTime (0018,0081), InversionTime (0018,0082)
        constants={
            k: v
            for k, v in {
                "ECHO": header.get("EchoNumbers"),
                "TE": header.get("EchoTime"),
                "TI": header.get("InversionTime"),
            }.items()
            if v not in (None, "")
        },
        modality=str(header.get("Modality", "")),
        manufacturer=str(header.get("Manufacturer", "")),
        series_number=int(header.get("SeriesNumber", 0) or 0),
        series_description=str(header.get("SeriesDescription", "")),
        study_date=str(header.get("StudyDate", "")) or None,
        acquisition_time=str(header.get("AcquisitionTime", "")) or None,
        n_instances=len(files),
        image_orientation=[float(v) for v in header.get("ImageOrientationPatient", [])],
        header=header.to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=lambda _: ""),
    )


StackFactory = Callable[..., ExportStack]


def real_stack(
    folder: Path,
    datatype: str,
    suffix: str,
    *,
    subject: str = "01",
    session: str | None = "1",
    echo: int | None = None,
    **fields: Any,
) -> ExportStack:
    """An `ExportStack` from a real folder with a hand-given classification."""
    files = dicom_files(folder, echo)
    summary = summary_of(files, f"MR|ECHO={echo or 1}|{suffix}")
    return ExportStack(
        subject=subject,
        session=session,
        datatype=datatype,
        suffix=suffix,
        files=files,
        summary=summary,
        **fields,
    )
