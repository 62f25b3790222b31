"""Exporting one stack into a dataset folder: convert, name each image, write sidecars, copy DICOM.

One call per work item. It never touches other stacks' files, so items run in parallel and one
failing stack (the caller catches `ConverterError`) fails only its own item.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from services.exporter.bids.asl import asl_sidecar, m0scan_sidecar, repeated_keys
from services.exporter.bids.dataset import ExportedStack
from services.exporter.bids.entities import parse_bids_name
from services.exporter.bids.outputs import OutputName, images_of_stack, name_outputs
from services.exporter.bids.sidecar import build_sidecar, missing_required, needs_time_series
from services.exporter.bids.stack import ExportStack
from services.exporter.convert.asl import read_asl_evidence
from services.exporter.convert.outputs import ConvertedImage
from services.exporter.convert.stack import convert_stack, copy_dicom_stack
from shared.vocabulary import ExportLayout as Layout
from shared.vocabulary import OutputMode, OverwritePolicy


def dicom_folder(base: PurePosixPath, layout: Layout) -> PurePosixPath:
    """Where DICOM copies of a stack go: `sourcedata/dicom/<bids path>/` in BIDS, `<name>/` when flat."""
    return PurePosixPath("sourcedata", "dicom") / base if layout == "bids" else base


def _gunzip_copy(source: Path, target: Path) -> None:
    with gzip.open(source, "rb") as packed, target.open("wb") as sink:
        shutil.copyfileobj(packed, sink, 1 << 20)


def export_stack(
    stack: ExportStack,
    base: PurePosixPath,
    root: Path,
    *,
    output_modes: Sequence[OutputMode] = ("nii.gz",),
    layout: Layout = "bids",
    overwrite: OverwritePolicy = "overwrite",
    timeout_s: float = 600.0,
) -> ExportedStack:
    """Write the stack under `root` at its planned `base` path (from `plan_names`).

    NIfTI modes convert once (`.nii.gz` and `.nii` both requested: one compressed conversion, and
    the `.nii` unpacked from it);
    the DICOM mode copies the instances. With `overwrite="skip"` a stack whose first output already
    exists is left as it is (and reported with no files).
    """
    result = ExportedStack(stack=stack, base=base)
    nifti_modes = [m for m in output_modes if m in ("nii", "nii.gz")]
    if overwrite == "skip":
        probe = (
            root / f"{base}.{nifti_modes[0]}"
            if nifti_modes
            else root / dicom_folder(base, layout) / "00001.dcm"
        )
        if probe.exists():
            result.skipped.append("already exported (overwrite policy: skip)")
            return result
    if nifti_modes:
        _export_nifti(stack, base, root, nifti_modes, timeout_s, result)
    if "dcm" in output_modes:
        folder = dicom_folder(base, layout)
        if (root / folder).exists():
            shutil.rmtree(root / folder)
        for source, path in copy_dicom_stack(stack.files, root / folder):
            relative = PurePosixPath(path.relative_to(root).as_posix())
            result.files.append(relative)
            result.sources[str(relative)] = str(source)
    return result


def _export_nifti(
    stack: ExportStack,
    base: PurePosixPath,
    root: Path,
    modes: Sequence[str],
    timeout_s: float,
    result: ExportedStack,
) -> None:
    compress = "nii.gz" in modes
    target_dir = root / str(base.parent)
    target_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=target_dir))
    try:
        converted = convert_stack(stack.files, scratch, "image", compress, timeout_s)
        result.tool, result.tool_version = converted.tool, converted.tool_version
        result.warnings += converted.warnings
        if converted.fallback_reason:
            result.warnings.append(f"converted with {converted.tool}: {converted.fallback_reason}")
        own = images_of_stack([i.tokens for i in converted.images], stack.summary.constants)
        for image, mine in zip(converted.images, own, strict=True):
            if not mine:
                result.skipped.append(
                    f"image{image.postfix}: belongs to another stack of the same files"
                )
        converted.images = [i for i, mine in zip(converted.images, own, strict=True) if mine]
        names = name_outputs(base, [image.tokens for image in converted.images])
        # dcm2niix writes one sidecar for a resliced CT (_Tilt/_Eq): it stays with the original,
        # which is dropped; the resliced image borrows it
        dropped_sidecars = [
            i.json
            for i, n in zip(converted.images, names, strict=True)
            if n.base is None and i.json
        ]
        _check_time_series(converted.images, names)
        for image, named in zip(converted.images, names, strict=True):
            if named.base is None:
                result.skipped.append(f"image{image.postfix or ' (main)'}: {named.reason}")
                continue
            files = image.files()
            if image.json is None and len(dropped_sidecars) == 1:
                files.append(("json", dropped_sidecars[0]))
            _place_image(stack, files, named.base, root, modes, result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class ExportError(ValueError):
    """The stack converted, but what came out cannot be written under its classification."""


def _check_time_series(images: Sequence[ConvertedImage], names: Sequence[OutputName]) -> None:
    """Refuse a 3D image named as a time series (bold, cbv, asl): the validator rejects it."""
    import nibabel as nib

    for image, named in zip(images, names, strict=True):
        if named.base is None:
            continue
        _, suffix, _ = parse_bids_name(named.base.name)
        if needs_time_series(suffix):
            shape = nib.load(image.nii).shape  # type: ignore[attr-defined]
            if len(shape) < 4 or shape[3] < 2:
                raise ExportError(
                    f"{named.base.name}: a {suffix} series must be 4D, the converted image is "
                    f"{'x'.join(map(str, shape))} (check the classification or the stack's files)"
                )


def _place_image(
    stack: ExportStack,
    files: Sequence[tuple[str, Path]],
    name: PurePosixPath,
    root: Path,
    modes: Sequence[str],
    result: ExportedStack,
) -> None:
    entities, suffix, _ = parse_bids_name(name.name)
    volumes = _volume_count(files[0][1]) if suffix in _PERF_SUFFIXES else 0
    context: list[str] | None = None
    for kind, path in files:
        if kind == "nii":
            produced = "nii.gz" if path.name.endswith(".nii.gz") else "nii"
            # the converter's own format last: it is moved (same file system), not copied
            for mode in sorted(modes, key=lambda m: m == produced):
                target = root / f"{name}.{mode}"
                if mode == produced:
                    os.replace(path, target)
                else:
                    _gunzip_copy(path, target)  # both modes requested: dcm2niix wrote .nii.gz
                relative = PurePosixPath(f"{name}.{mode}")
                result.images.append(relative)
                result.files.append(relative)
        elif kind == "json":
            text = path.read_text("utf-8")
            sidecar = build_sidecar(
                json.loads(text),
                datatype=name.parent.name or stack.datatype,
                suffix=suffix,
                entities=entities,
                task_name=stack.task_name,
            )
            if suffix in _PERF_SUFFIXES:
                sidecar, context = _perf_sidecar(stack, sidecar, text, suffix, volumes, result)
            missing = missing_required(sidecar, suffix)
            if context:  # M0Type Separate/Absent is decided with the dataset files
                missing = [k for k in missing if k != "M0Type"]
            if missing:
                result.warnings.append(f"{name.name}: sidecar lacks required {', '.join(missing)}")
            (root / f"{name}.json").write_text(json.dumps(sidecar, indent=2) + "\n", "utf-8")
            result.files.append(PurePosixPath(f"{name}.json"))
            result.sidecars[f"{name}.json"] = sidecar
        else:
            shutil.copyfile(path, root / f"{name}.{kind}")
            result.files.append(PurePosixPath(f"{name}.{kind}"))
    if suffix == "asl":
        _write_aslcontext(context, name, root, result)


_PERF_SUFFIXES = frozenset({"asl", "m0scan"})


def _volume_count(nii: Path) -> int:
    import nibabel as nib

    shape = nib.load(nii).shape  # type: ignore[attr-defined]
    return int(shape[3]) if len(shape) > 3 else 1


def _perf_sidecar(
    stack: ExportStack,
    sidecar: dict[str, Any],
    text: str,
    suffix: str,
    volumes: int,
    result: ExportedStack,
) -> tuple[dict[str, Any], list[str] | None]:
    """The asl/m0scan sidecar corrected and completed from the stack's DICOM (`bids.asl`)."""
    if suffix == "m0scan":
        made = m0scan_sidecar(sidecar)
    else:
        evidence = read_asl_evidence(stack.files, volumes)
        made = asl_sidecar(sidecar, repeated_keys(text), evidence, volumes)
    result.warnings += [f"{suffix}: {n}" for n in made.notes]
    return made.sidecar, made.aslcontext


def _write_aslcontext(
    context: list[str] | None, name: PurePosixPath, root: Path, result: ExportedStack
) -> None:
    """`<base>_aslcontext.tsv`: one `volume_type` per volume (control, label, m0scan, deltam, cbf)."""
    if not context:
        result.warnings.append(f"{name.name}: volume types unknown, aslcontext.tsv not written")
        return
    target = name.with_name(name.name.removesuffix("_asl") + "_aslcontext.tsv")
    (root / str(target)).write_text("volume_type\n" + "".join(f"{v}\n" for v in context), "utf-8")
    result.files.append(target)
