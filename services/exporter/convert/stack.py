"""Converting one stack: dcm2niix in an isolated subprocess, dicom2nifti as the fallback.

dcm2niix converts folders, so the stack's exact files are linked into a scratch folder first (hard
links, else symlinks, else copies), unless they already are a folder's only files (the exporter's
own scratch folder): other series that sit next to them on disk never leak in. Every
call has its own scratch folder and its own process group, so calls can run in parallel, and a
timeout kills the converter and everything it started.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.exporter.convert.dcm2niix import (
    ConverterError,
    dcm2niix_version,
    run_dcm2niix,
    run_isolated,
)
from services.exporter.convert.fallback import FALLBACK_TOOL, fallback_version
from services.exporter.convert.outputs import (
    ConvertedImage,
    FileKind,
    collect_images,
    split_extension,
)

DCM2NIIX_TOOL = "dcm2niix"
_SCRATCH_BASE = "stack"
# dcm2niix exit code 8: some but not all files were converted; the images it wrote are valid
_DCM2NIIX_PARTIAL = 8


@dataclass(frozen=True)
class OutputFile:
    """One produced file, its kind, and the converter post-fix of its image (`""`, `_e2`, ...)."""

    path: Path
    kind: FileKind
    postfix: str


@dataclass
class ConversionResult:
    """What `convert_stack` produced and how."""

    tool: str  # "dcm2niix" or "dicom2nifti": which tool made the files
    tool_version: str
    images: list[ConvertedImage]
    dcm2niix_version: str
    duration_s: float
    log: str = ""
    fallback_reason: str | None = (
        None  # why dcm2niix was not used, when the fallback made the files
    )
    warnings: list[str] = field(default_factory=list)
    strays: list[Path] = field(default_factory=list)  # converter files that belong to no image

    def files(self) -> list[OutputFile]:
        return [OutputFile(p, k, img.postfix) for img in self.images for k, p in img.files()]


def link_inputs(files: Sequence[Path], folder: Path) -> None:
    """Place the stack's files in `folder` as `000000.dcm`, ... (hard link, symlink, or copy)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, source in enumerate(files):
        target = folder / f"{index:06d}.dcm"
        try:
            os.link(source, target)
        except OSError:  # another file system, or links not allowed
            try:
                target.symlink_to(Path(source).resolve())
            except OSError:
                shutil.copyfile(source, target)


def sole_folder(files: Sequence[Path]) -> Path | None:
    """The folder that holds exactly `files` and nothing else, when there is one: it is converted
    as it is, without linking every file into a scratch folder again."""
    folders = {Path(f).parent for f in files}
    if len(folders) != 1:
        return None
    folder = folders.pop()
    try:
        names = [entry.name for entry in os.scandir(folder)]
    except OSError:
        return None
    return folder if sorted(names) == sorted(Path(f).name for f in files) else None


def _run_fallback(
    input_dir: Path, output_dir: Path, *, compress: bool, timeout_s: float
) -> str | None:
    """Run dicom2nifti in a child process; `None` when it worked, else its error text."""
    args = [
        sys.executable,
        "-m",
        "services.exporter.convert.fallback",
        str(input_dir),
        str(output_dir),
        _SCRATCH_BASE,
    ]
    if compress:
        args.append("--compress")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[3]), env.get("PYTHONPATH")])
    )
    outcome = run_isolated(args, timeout_s=timeout_s, cwd=output_dir.parent, env=env)
    if outcome.timed_out:
        return f"dicom2nifti timed out after {timeout_s:.0f} s"
    if outcome.returncode != 0:
        return outcome.output.strip()[-2000:] or f"dicom2nifti exited with {outcome.returncode}"
    return None


def _move_images(
    images: list[ConvertedImage], out_dir: Path, base_name: str
) -> list[ConvertedImage]:
    placed = []
    for image in images:
        moved: dict[str, Path | None] = {}
        for kind, path in image.files():
            _, _, ext = split_extension(path.name)
            target = out_dir / f"{base_name}{image.postfix}{ext}"
            os.replace(path, target)
            moved[kind] = target
        nii = moved["nii"]
        assert nii is not None
        placed.append(
            ConvertedImage(
                postfix=image.postfix,
                nii=nii,
                json=moved.get("json"),
                bval=moved.get("bval"),
                bvec=moved.get("bvec"),
                tokens=image.tokens,
            )
        )
    return placed


def convert_stack(
    files: Sequence[Path],
    out_dir: Path,
    base_name: str,
    compress: bool,
    timeout_s: float = 600.0,
    *,
    allow_fallback: bool = True,
) -> ConversionResult:
    """Convert exactly `files` (one stack) to NIfTI in `out_dir` as `<base_name><postfix>.<ext>`.

    dcm2niix first; when it fails, times out or writes no image, dicom2nifti (if `allow_fallback`).
    `timeout_s` applies to each converter. Raises `ConverterError` when no converter made an image.
    Existing files with the same names are replaced.
    """
    if not files:
        raise ConverterError("the stack has no files")
    if "/" in base_name or not base_name:
        raise ConverterError(f"base name must be a plain file name, got {base_name!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    version = dcm2niix_version()
    scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir))
    try:
        inputs, produced = sole_folder(files), scratch / "out"
        if inputs is None:
            inputs = scratch / "in"
            link_inputs(files, inputs)
        produced.mkdir()
        outcome = run_dcm2niix(
            inputs, produced, _SCRATCH_BASE, compress=compress, timeout_s=timeout_s
        )
        images, strays = collect_images(produced, _SCRATCH_BASE)
        usable = not outcome.timed_out and outcome.returncode in (0, _DCM2NIIX_PARTIAL) and images
        if usable:
            warnings = (
                ["dcm2niix converted only some of the files"]
                if outcome.returncode == _DCM2NIIX_PARTIAL
                else []
            )
            return ConversionResult(
                tool=DCM2NIIX_TOOL,
                tool_version=version,
                images=_move_images(images, out_dir, base_name),
                dcm2niix_version=version,
                duration_s=time.perf_counter() - started,
                log=outcome.output,
                warnings=warnings,
                strays=strays,
            )
        if outcome.timed_out:
            reason = f"dcm2niix timed out after {timeout_s:.0f} s"
        elif not images:
            reason = f"dcm2niix wrote no image (exit {outcome.returncode}): {outcome.output.strip()[-1000:]}"
        else:
            reason = f"dcm2niix exited with {outcome.returncode}: {outcome.output.strip()[-1000:]}"
        if not allow_fallback:
            raise ConverterError(reason)
        shutil.rmtree(produced)
        produced.mkdir()
        failure = _run_fallback(inputs, produced, compress=compress, timeout_s=timeout_s)
        images, strays = collect_images(produced, _SCRATCH_BASE)
        if failure is not None or not images:
            raise ConverterError(f"{reason}; fallback: {failure or 'no image written'}")
        return ConversionResult(
            tool=FALLBACK_TOOL,
            tool_version=fallback_version(),
            images=_move_images(images, out_dir, base_name),
            dcm2niix_version=version,
            duration_s=time.perf_counter() - started,
            log=outcome.output,
            fallback_reason=reason,
            strays=strays,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def copy_dicom_stack(files: Sequence[Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """DICOM output mode: copy the stack's instances to `out_dir/00001.dcm`, `00002.dcm`, ...

    Returns `(source, copy)` pairs, for the export's file manifest.

    Order is InstanceNumber (0020,0013), then SOPInstanceUID (0008,0018), then the source path, so
    the same stack always gets the same numbering.
    """
    import pydicom

    def order(path: Path) -> tuple[int, str, str]:
        header = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            force=True,
            specific_tags=["InstanceNumber", "SOPInstanceUID"],
        )
        number = header.get("InstanceNumber")
        return (
            int(number) if number not in (None, "") else 1 << 30,
            str(header.get("SOPInstanceUID", "")),
            str(path),
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, source in enumerate(sorted(files, key=order), start=1):
        target = out_dir / f"{index:05d}.dcm"
        shutil.copyfile(source, target)
        written.append((Path(source), target))
    return written
