"""Build `StackSummary` records from attribute values (keywords), through a real pydicom Dataset,
so the header is genuine DICOM JSON. Used by the table-driven tests with values copied from real
headers (shared data, dcm2niix reference sidecars, public issue trackers)."""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from shared.catalog import StackSummary

_AGGREGATES = {
    "echo_times",
    "inversion_times",
    "b_values",
    "n_diffusion_directions",
    "n_volumes",
    "n_slices",
    "image_types",
    "constants",
    "study_date",
    "n_instances",
    "series_instance_uid",
    "stack_key",
}


def make_stack(**attrs: Any) -> StackSummary:
    """`make_stack(Manufacturer="SIEMENS", ImageType=["ORIGINAL", ...], echo_times=[...])`."""
    aggregates = {k: attrs.pop(k) for k in list(attrs) if k in _AGGREGATES}
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    te = attrs.get("EchoTime")
    aggregates.setdefault("echo_times", [float(te)] if te is not None else [])
    aggregates.setdefault("n_instances", 1)
    aggregates.setdefault("series_instance_uid", "1.2.3")
    aggregates.setdefault("stack_key", f"{attrs.get('Modality', 'MR')}|TE={te}")
    return StackSummary(
        subject_id="sub",
        study_instance_uid="1.2",
        modality=str(attrs.get("Modality", "MR")),
        sop_class_uid=str(attrs.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.4")),
        header=ds.to_json_dict(),
        **aggregates,
    )
