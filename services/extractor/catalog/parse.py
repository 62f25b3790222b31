"""One file's bytes -> an `InstanceRecord`, or a `Rejection` that says why it is not catalogued.

The header is read once, up to (not into) the pixel data, with pydicom's raw reader; every element is
then decoded once into the DICOM JSON model (`header_json`), and the record fields are filled from that
JSON through the attribute table. Reading goes to the end of the header (never `specific_tags`), because
classic Siemens XA "interoperability" files keep key attributes far into it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError

from .attributes import PER_FRAME_FUNCTIONAL_GROUPS, HeaderView
from .diffusion import read_diffusion
from .frames import enhanced_frames
from .header_json import MAX_VALUE_BYTES, dataset_to_json
from .image_part import VendorImageHints, image_part
from .private_tags import private_creators, read_private
from .records import (
    CTDetail,
    FrameRecord,
    InstanceRecord,
    MRDetail,
    PETDetail,
    Rejection,
    SeriesRecord,
    StudyRecord,
    SubjectRecord,
)
from .sniff import SNIFF_BYTES, pixel_data_truncation, sniff
from .sop_class import DICOMDIR_SOP_CLASS, sop_class_table

# files up to this size are read in one call (faster than pydicom's many small reads); larger ones are
# streamed so that gigabyte multi-frame objects never sit in memory for a header
READ_WHOLE_LIMIT = 16 * 1024 * 1024
# a header value claiming more than this (and far more than the content) is a broken length, not a cut file
IMPLAUSIBLE_HEADER_VALUE = 16 * 1024 * 1024
PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00009, 0x7FE00008)
DIRECTORY_RECORD_SEQUENCE = 0x00041220
DEFLATED_TRANSFER_SYNTAXES = frozenset({"1.2.840.10008.1.2.1.99"})
TRANSFER_SYNTAX_BY_ENCODING = {
    (True, True): "1.2.840.10008.1.2",
    (False, True): "1.2.840.10008.1.2.1",
    (False, False): "1.2.840.10008.1.2.2",
}
_TRUNCATION_MARKERS = ("No tag to read", "unpack requires", "end of file", "EOF", "buffer of")


def parse_instance(
    data: bytes | str | os.PathLike[str], source_key: str, *, max_value_bytes: int = MAX_VALUE_BYTES
) -> InstanceRecord | Rejection:
    """Parse one file's content (bytes, or a path to read) into catalog records.

    `source_key` names the content in the catalog (object key or path); it is never used to decide
    whether the content is DICOM. Values longer than `max_value_bytes` are left out of the stored header.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        content = bytes(data)
        return _parse(io.BytesIO(content), len(content), source_key, max_value_bytes)
    size = os.path.getsize(data)
    if size <= READ_WHOLE_LIMIT:
        with open(data, "rb") as fh:
            content = fh.read()
        return _parse(io.BytesIO(content), len(content), source_key, max_value_bytes)
    with open(data, "rb") as fh:
        return _parse(fh, size, source_key, max_value_bytes)


def _parse(
    fp: BinaryIO, size: int, source_key: str, max_value_bytes: int
) -> InstanceRecord | Rejection:
    verdict = sniff(fp.read(SNIFF_BYTES))
    if not verdict.is_dicom:
        return Rejection(source_key, verdict.reason, size)
    fp.seek(0)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=verdict.kind == "stream")
    except (
        InvalidDicomError,
        OSError,
        EOFError,
        struct.error,
        ValueError,
        KeyError,
        TypeError,
    ) as exc:
        return Rejection(source_key, _read_error_reason(exc), size)
    stop = fp.tell()
    try:
        return _catalogue(ds, fp, stop, size, source_key, max_value_bytes)
    except (OSError, EOFError, struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
        return Rejection(source_key, _read_error_reason(exc), size)


def _read_error_reason(exc: BaseException) -> str:
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, EOFError) or any(marker in str(exc) for marker in _TRUNCATION_MARKERS):
        return f"truncated: {message}"
    return f"corrupt: {message}"


def _catalogue(
    ds: FileDataset, fp: BinaryIO, stop: int, size: int, source_key: str, max_value_bytes: int
) -> InstanceRecord | Rejection:
    meta = getattr(ds, "file_meta", None)
    media_class = _uid(meta.get(0x00020002)) if meta is not None else None
    if media_class == DICOMDIR_SOP_CLASS or DIRECTORY_RECORD_SEQUENCE in ds:
        return Rejection(source_key, "DICOMDIR", size, sop_class_uid=DICOMDIR_SOP_CLASS)
    cut = _cut_header(ds, size)
    if cut is not None:
        return Rejection(source_key, cut, size)
    transfer_syntax = _uid(meta.get(0x00020010)) if meta is not None else None
    deflated = transfer_syntax in DEFLATED_TRANSFER_SYNTAXES
    if deflated:
        # pydicom inflated the data set into a buffer of its own: positions in `fp` mean nothing here
        fp.seek(0)
        has_pixels = any(tag in pydicom.dcmread(fp, defer_size=256) for tag in PIXEL_DATA_TAGS)
        stop = size
    else:
        has_pixels = stop < size and _tag_at(fp, stop, ds) in PIXEL_DATA_TAGS
    if stop < size and not has_pixels:
        return Rejection(
            source_key, f"corrupt: no parseable element at byte {stop} of {size}", size
        )
    sop_class_uid = _uid(ds.get_item(0x00080016)) or media_class
    sop_instance_uid = _uid(ds.get_item(0x00080018)) or (
        _uid(meta.get(0x00020003)) if meta is not None else None
    )
    if not sop_class_uid or not sop_instance_uid:
        return Rejection(
            source_key, "corrupt: no SOP Class UID or SOP Instance UID in the data set", size
        )
    sop_class = sop_class_table().lookup(sop_class_uid)
    unlisted_image = (
        sop_class_uid not in sop_class_table().non_image_names and has_pixels and 0x00280010 in ds
    )
    if not sop_class.is_image and not (unlisted_image and sop_class.name == sop_class_uid):
        return _rejection(
            ds, source_key, f"non-image SOP class: {sop_class.name}", size, sop_class_uid
        )
    if not has_pixels:
        return _rejection(
            ds, source_key, "truncated: image without Pixel Data (7FE0,0010)", size, sop_class_uid
        )
    implicit, little = ds.original_encoding
    if not deflated:
        truncation = pixel_data_truncation(fp, stop, size, little is not False)
        if truncation is not None:
            return _rejection(ds, source_key, truncation, size, sop_class_uid)

    full = dataset_to_json(
        ds, max_value_bytes=max_value_bytes, keep_all_frames=sop_class.functional_groups
    )
    header = full
    if PER_FRAME_FUNCTIONAL_GROUPS in full:
        header = dict(full)
        header[PER_FRAME_FUNCTIONAL_GROUPS] = {
            "vr": "SQ",
            "Value": full[PER_FRAME_FUNCTIONAL_GROUPS]["Value"][:1],
        }
    view = HeaderView(full)
    series = view.fill(SeriesRecord, "series")
    instance_values = view.values("instance")
    modality = series.modality
    creators = private_creators(ds)
    hints = _vendor_hints(ds, creators)
    mr = (
        _mr_detail(view, ds, creators, instance_values.get("image_type", []), series)
        if modality == "MR"
        else None
    )
    ct = view.fill(CTDetail, "ct") if modality == "CT" else None
    pet = view.fill(PETDetail, "pet") if modality == "PT" else None
    if sop_class.functional_groups and PER_FRAME_FUNCTIONAL_GROUPS in full:
        frames = enhanced_frames(full, modality, hints)
    else:
        # a classic multi-frame object (US/NM/XA cine, multi-frame secondary capture) repeats its one
        # set of values for every frame
        first = _classic_frame(instance_values, mr, pet, hints, modality)
        count = max(int(instance_values.get("number_of_frames") or 1), 1)
        frames = [first] + [dataclasses.replace(first, frame=n) for n in range(2, count + 1)]
    if transfer_syntax is None:
        transfer_syntax = TRANSFER_SYNTAX_BY_ENCODING.get((bool(implicit), little is not False))
    instance_values.pop("sop_instance_uid", None)
    instance_values.pop("sop_class_uid", None)
    instance_values.setdefault("number_of_frames", max(len(frames), 1))
    if "MOSAIC" in instance_values.get("image_type", []) and creators:
        instance_values["mosaic_slices"] = _int(
            read_private(ds, "siemens_images_in_mosaic", creators)
        )
    return InstanceRecord(
        source_key=source_key,
        size=size,
        transfer_syntax_uid=transfer_syntax,
        sop_class_name=sop_class.name,
        subject=view.fill(SubjectRecord, "subject"),
        study=view.fill(StudyRecord, "study"),
        series=series,
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid,
        mr=mr,
        ct=ct,
        pet=pet,
        frames=frames,
        header=header,
        **instance_values,
    )


def _uid(elem: Any) -> str | None:
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = str(value).strip(" \x00") if value is not None else ""
    return text or None


def _cut_header(ds: Dataset, size: int) -> str | None:
    """A defined-length element whose value runs past the end of the content means the file was cut."""
    last: RawDataElement | None = None
    for elem in ds.values():
        if isinstance(elem, RawDataElement) and (last is None or elem.value_tell > last.value_tell):
            last = elem
    if last is None or last.length == 0xFFFFFFFF or last.value_tell + last.length <= size:
        return None
    tag = f"({last.tag >> 16:04X},{last.tag & 0xFFFF:04X})"
    if last.length > max(16 * size, IMPLAUSIBLE_HEADER_VALUE):
        return f"corrupt: element {tag} declares {last.length} bytes in {size} bytes of content"
    return f"truncated: element {tag} runs past the end at byte {size}"


def _tag_at(fp: BinaryIO, offset: int, ds: Dataset) -> int:
    fp.seek(offset)
    raw = fp.read(4)
    if len(raw) < 4:
        return 0
    _, little = ds.original_encoding
    group, element = struct.unpack("<HH" if little is not False else ">HH", raw)
    return group << 16 | element


def _rejection(
    ds: Dataset, source_key: str, reason: str, size: int, sop_class_uid: str | None
) -> Rejection:
    return Rejection(
        source_key,
        reason,
        size,
        sop_class_uid=sop_class_uid,
        sop_instance_uid=_uid(ds.get_item(0x00080018)),
        series_instance_uid=_uid(ds.get_item(0x0020000E)),
        study_instance_uid=_uid(ds.get_item(0x0020000D)),
        patient_id=_uid(ds.get_item(0x00100020)),
    )


def _vendor_hints(ds: Dataset, creators: dict[tuple[int, str], int]) -> VendorImageHints:
    if not creators:
        return VendorImageHints()
    ge_type = read_private(ds, "ge_image_type", creators)
    ge_sequence = read_private(ds, "ge_pulse_sequence", creators)
    ge_vas = read_private(ds, "ge_vas_collapse", creators)
    philips_type = read_private(ds, "philips_image_type_mr", creators)
    return VendorImageHints(
        ge_image_type=_int(ge_type),
        ge_pulse_sequence=str(ge_sequence[0])
        if isinstance(ge_sequence, list) and ge_sequence
        else None,
        ge_vas_collapse=_int(ge_vas),
        philips_image_type=str(philips_type[0])
        if isinstance(philips_type, list) and philips_type
        else None,
    )


def _int(values: Any) -> int | None:
    if isinstance(values, list) and values and isinstance(values[0], int | float):
        return int(values[0])
    return None


def _mr_detail(
    view: HeaderView,
    ds: Dataset,
    creators: dict[tuple[int, str], int],
    image_type: list[str],
    series: SeriesRecord,
) -> MRDetail:
    mr = view.fill(MRDetail, "mr")
    siemens = (series.manufacturer or "").upper().startswith("SIEMENS")
    looks_diffusion = "DIFFUSION" in (t.upper() for t in image_type) or "ep_b" in (
        mr.sequence_name or ""
    )
    diffusion = read_diffusion(
        ds,
        creators,
        mr.diffusion_b_value,
        mr.diffusion_gradient_orientation,
        siemens and looks_diffusion,
    )
    mr.b_value = diffusion.b_value
    mr.gradient_direction = list(diffusion.gradient)
    sequence = read_private(ds, "ge_pulse_sequence", creators) if creators else None
    if isinstance(sequence, list) and sequence:
        mr.vendor_pulse_sequence = str(sequence[0])
    return mr


def _classic_frame(
    values: dict[str, Any],
    mr: MRDetail | None,
    pet: PETDetail | None,
    hints: VendorImageHints,
    modality: str | None,
) -> FrameRecord:
    image_type = values.get("image_type", [])
    return FrameRecord(
        frame=1,
        echo_time=mr.echo_time if mr else None,
        echo_number=mr.echo_numbers if mr else None,
        inversion_time=mr.inversion_time if mr else None,
        flip_angle=mr.flip_angle if mr else None,
        image_type=image_type,
        part=image_part(image_type, None, hints, modality),
        b_value=mr.b_value if mr else None,
        gradient=list(mr.gradient_direction) if mr else [],
        position=values.get("image_position", []),
        orientation=values.get("image_orientation", []),
        temporal_position=mr.temporal_position_identifier if mr else None,
        acquisition_time=values.get("acquisition_time") or values.get("content_time"),
        trigger_time=mr.trigger_time if mr else None,
        frame_reference_time=pet.frame_reference_time if pet else None,
    )
