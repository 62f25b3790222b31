"""The pure-Python fallback converter: dicom2nifti + nibabel, run as its own process.

Used when dcm2niix fails on a stack. It writes `<base>.nii[.gz]` (and `.bval`/`.bvec` for
diffusion) plus a sidecar JSON built from the first instance's header (the keys of
`sidecar_fields.json`, times converted from DICOM ms to BIDS seconds). Run as
`python -m services.exporter.convert.fallback IN_DIR OUT_DIR BASE [--compress]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata, resources
from pathlib import Path
from typing import Any

FALLBACK_TOOL = "dicom2nifti"


def fallback_version() -> str:
    return metadata.version("dicom2nifti")


def _json_value(value: Any, scale: float | None) -> Any:
    if value is None or value == "":
        return None
    if hasattr(value, "__iter__") and not isinstance(value, str | bytes):
        return [_json_value(v, scale) for v in value]
    if scale is not None:
        return round(float(value) * scale, 8)
    if isinstance(value, int | float):
        return value
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text else number


def header_sidecar(first_instance: Path) -> dict[str, Any]:
    """BIDS sidecar keys read from one DICOM header (no patient fields are read)."""
    import pydicom

    table = json.loads(
        resources.files(__package__).joinpath("sidecar_fields.json").read_text("utf-8")
    )
    dataset = pydicom.dcmread(first_instance, stop_before_pixels=True, force=True)
    sidecar: dict[str, Any] = {}
    for entry in table["fields"]:
        value = _json_value(dataset.get(entry["keyword"]), entry.get("scale"))
        if value is not None:
            sidecar[entry["bids"]] = value
    sidecar["ConversionSoftware"] = FALLBACK_TOOL
    sidecar["ConversionSoftwareVersion"] = fallback_version()
    return sidecar


def convert_with_dicom2nifti(input_dir: Path, output_dir: Path, base: str, compress: bool) -> None:
    """Convert every DICOM in `input_dir` to `output_dir/<base>.nii[.gz]` with its sidecar."""
    import dicom2nifti

    ext = ".nii.gz" if compress else ".nii"
    output = output_dir / f"{base}{ext}"
    result = dicom2nifti.dicom_series_to_nifti(str(input_dir), str(output), reorient_nifti=False)
    for key, target_ext in (("BVAL_FILE", ".bval"), ("BVEC_FILE", ".bvec")):
        produced = result.get(key) if isinstance(result, dict) else None
        if produced and Path(produced) != output_dir / f"{base}{target_ext}":
            Path(produced).replace(output_dir / f"{base}{target_ext}")
    first = min(input_dir.iterdir())
    sidecar = header_sidecar(first)
    (output_dir / f"{base}.json").write_text(json.dumps(sidecar, indent=2) + "\n", "utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("base")
    parser.add_argument("--compress", action="store_true")
    args = parser.parse_args(argv)
    try:
        convert_with_dicom2nifti(args.input_dir, args.output_dir, args.base, args.compress)
    except Exception as error:  # the parent reads the message; the exit code says it failed
        print(f"dicom2nifti failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
