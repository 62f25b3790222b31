"""One file's bytes -> an `InstanceRecord`, or a `Rejection` that says why it is not catalogued.

The header is read once, up to (not into) the pixel data, straight into the DICOM JSON model: by the
one-pass `reader` for Part 10 little-endian content (nearly every file), otherwise by pydicom's reader
followed by `header_json`. Reading always goes to the end of the header (never `specific_tags`), because
classic Siemens XA "interoperability" files keep key attributes far into it. Record fields are then
filled from that JSON through the attribute table.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .ascconv import siemens_ascconv
from .attributes import PER_FRAME_FUNCTIONAL_GROUPS, HeaderView
from .diffusion import read_diffusion
from .frames import enhanced_frames
from .header_json import MAX_VALUE_BYTES, dataset_to_json
from .image_part import VendorImageHints, image_part
from .private_tags import PrivateTags, private_elements
from .reader import HeaderRead, ReaderDeclined, read_header
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

# files up to this size are read in one call and parsed from memory; of larger ones only the header is
# read, so that gigabyte multi-frame objects never sit in memory
READ_WHOLE_LIMIT = 16 * 1024 * 1024
# larger files: the header is read from a prefix that doubles up to this limit, pydicom beyond it
HEADER_PREFIX = 1024 * 1024
HEADER_PREFIX_LIMIT = 256 * 1024 * 1024
# a header value claiming more than this (and far more than the content) is a broken length, not a cut
IMPLAUSIBLE_HEADER_VALUE = 16 * 1024 * 1024
PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00009, 0x7FE00008)
DIRECTORY_RECORD_SEQUENCE = "00041220"
DEFLATED_TRANSFER_SYNTAXES = frozenset({"1.2.840.10008.1.2.1.99"})
TRANSFER_SYNTAX_BY_ENCODING = {
    (True, True): "1.2.840.10008.1.2",
    (False, True): "1.2.840.10008.1.2.1",
    (False, False): "1.2.840.10008.1.2.2",
}
_TRUNCATION_MARKERS = ("No tag to read", "unpack requires", "end of file", "EOF", "buffer of")
_READ_ERRORS = (
    InvalidDicomError,
    OSError,
    EOFError,
    struct.error,
    ValueError,
    KeyError,
    TypeError,
    IndexError,
)


def parse_instance(
    data: bytes | str | os.PathLike[str],
    source_key: str,
    *,
    max_value_bytes: int = MAX_VALUE_BYTES,
) -> InstanceRecord | Rejection:
    """Parse one file's content (bytes, or a path to read) into catalog records.

    `source_key` names the content in the catalog (object key or path); it is never used to decide
    whether the content is DICOM. Values longer than `max_value_bytes` are left out of the stored header.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        return _parse_content(bytes(data), source_key, max_value_bytes)
    size = os.path.getsize(data)
    if size <= READ_WHOLE_LIMIT:
        with open(data, "rb") as fh:
            return _parse_content(fh.read(), source_key, max_value_bytes)
    with open(data, "rb") as fh:
        return _parse_large(fh, size, source_key, max_value_bytes)


def _parse_large(
    fh: BinaryIO, size: int, source_key: str, max_value_bytes: int
) -> InstanceRecord | Rejection:
    """A big file (multi-frame, usually): read a growing prefix until the whole header is in it."""
    prefix = fh.read(HEADER_PREFIX)
    while sniff(prefix[:SNIFF_BYTES]).kind == "part10":
        try:
            header = read_header(prefix, max_value_bytes=max_value_bytes)
        except ReaderDeclined:
            header = None
        if header is not None and header.pixel_offset is not None:
            return _catalogue_safely(header, fh, size, source_key)
        if len(prefix) >= min(size, HEADER_PREFIX_LIMIT):
            break
        prefix += fh.read(
            len(prefix)
        )  # the header goes on past the prefix (or the reader declined)
    fh.seek(0)
    return _parse_stream(fh, size, source_key, max_value_bytes)


def _parse_content(
    content: bytes, source_key: str, max_value_bytes: int
) -> InstanceRecord | Rejection:
    verdict = sniff(content[:SNIFF_BYTES])
    if not verdict.is_dicom:
        return Rejection(source_key, verdict.reason, len(content))
    if verdict.kind == "part10":
        try:
            header = read_header(content, max_value_bytes=max_value_bytes)
        except ReaderDeclined:
            pass
        else:
            return _catalogue_safely(header, io.BytesIO(content), len(content), source_key)
    return _parse_stream(io.BytesIO(content), len(content), source_key, max_value_bytes)


def _parse_stream(
    fp: BinaryIO, size: int, source_key: str, max_value_bytes: int
) -> InstanceRecord | Rejection:
    """The pydicom route: any encoding, streamed content, and the verdicts on damaged files."""
    verdict = sniff(fp.read(SNIFF_BYTES))
    if not verdict.is_dicom:
        return Rejection(source_key, verdict.reason, size)
    fp.seek(0)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=verdict.kind == "stream")
        header_or_rejection = _pydicom_header(ds, fp, fp.tell(), size, source_key, max_value_bytes)
    except (
        Exception
    ) as exc:  # pydicom raises many types on damaged input; each is this file's verdict
        return Rejection(source_key, _read_error_reason(exc), size)
    if isinstance(header_or_rejection, Rejection):
        return header_or_rejection
    return _catalogue_safely(header_or_rejection, fp, size, source_key)


def _read_error_reason(exc: BaseException) -> str:
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, EOFError) or any(marker in str(exc) for marker in _TRUNCATION_MARKERS):
        return f"truncated: {message}"
    return f"corrupt: {message}"


def _pydicom_header(
    ds: Dataset, fp: BinaryIO, stop: int, size: int, source_key: str, max_value_bytes: int
) -> HeaderRead | Rejection:
    meta = getattr(ds, "file_meta", None)
    syntax = _uid(meta.get(0x00020010)) if meta is not None else None
    media_class = _uid(meta.get(0x00020002)) if meta is not None else None
    if media_class == DICOMDIR_SOP_CLASS or 0x00041220 in ds:
        return Rejection(source_key, "DICOMDIR", size, sop_class_uid=DICOMDIR_SOP_CLASS)
    cut = _cut_header(ds, size)
    if cut is not None:
        return Rejection(source_key, cut, size)
    if syntax in DEFLATED_TRANSFER_SYNTAXES:
        # pydicom inflated the data set into a buffer of its own: positions in `fp` mean nothing here
        fp.seek(0)
        inflated = pydicom.dcmread(fp, defer_size=256)
        pixel_offset = 0 if any(tag in inflated for tag in PIXEL_DATA_TAGS) else None
    elif stop < size:
        if _tag_at(fp, stop, ds) not in PIXEL_DATA_TAGS:
            return Rejection(
                source_key, f"corrupt: no parseable element at byte {stop} of {size}", size
            )
        pixel_offset = stop
    else:
        pixel_offset = None
    implicit, little = ds.original_encoding
    little_endian = little is not False
    private = private_elements(ds)  # before the JSON pass, which makes pydicom convert some of them
    return HeaderRead(
        json=dataset_to_json(ds, max_value_bytes=max_value_bytes, keep_all_frames=True),
        transfer_syntax_uid=syntax
        or TRANSFER_SYNTAX_BY_ENCODING.get((bool(implicit), little_endian)),
        media_sop_class_uid=media_class,
        media_sop_instance_uid=_uid(meta.get(0x00020003)) if meta is not None else None,
        little_endian=little_endian,
        implicit_vr=bool(implicit),
        pixel_offset=pixel_offset,
        private=private,
    )


def _catalogue_safely(
    header: HeaderRead, fp: BinaryIO, size: int, source_key: str
) -> InstanceRecord | Rejection:
    try:
        return _catalogue(header, fp, size, source_key)
    except _READ_ERRORS as exc:
        return Rejection(source_key, _read_error_reason(exc), size)


def _catalogue(
    header: HeaderRead, fp: BinaryIO, size: int, source_key: str
) -> InstanceRecord | Rejection:
    full = header.json
    view = HeaderView(full)
    top = view.values("instance")
    series = view.fill(SeriesRecord, "series")
    study = view.fill(StudyRecord, "study")
    subject = view.fill(SubjectRecord, "subject")
    ids = {
        "sop_class_uid": top.pop("sop_class_uid", None) or header.media_sop_class_uid,
        "sop_instance_uid": top.pop("sop_instance_uid", None) or header.media_sop_instance_uid,
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": study.study_instance_uid,
        "patient_id": subject.patient_id,
    }
    if header.media_sop_class_uid == DICOMDIR_SOP_CLASS or DIRECTORY_RECORD_SEQUENCE in full:
        return Rejection(source_key, "DICOMDIR", size, sop_class_uid=DICOMDIR_SOP_CLASS)
    if not ids["sop_class_uid"] or not ids["sop_instance_uid"]:
        return Rejection(
            source_key, "corrupt: no SOP Class UID or SOP Instance UID in the data set", size
        )
    table = sop_class_table()
    sop_class = table.lookup(ids["sop_class_uid"])
    unlisted_image = (
        sop_class.name == ids["sop_class_uid"]
        and header.pixel_offset is not None
        and top.get("rows") is not None
    )
    if not sop_class.is_image and not unlisted_image:
        return Rejection(source_key, f"non-image SOP class: {sop_class.name}", size, **ids)
    if header.pixel_offset is None:
        return Rejection(source_key, "truncated: image without Pixel Data (7FE0,0010)", size, **ids)
    if header.transfer_syntax_uid not in DEFLATED_TRANSFER_SYNTAXES:
        truncation = pixel_data_truncation(fp, header.pixel_offset, size, header.little_endian)
        if truncation is not None:
            return Rejection(source_key, truncation, size, **ids)

    stored = full
    if PER_FRAME_FUNCTIONAL_GROUPS in full:
        stored = dict(full)
        stored[PER_FRAME_FUNCTIONAL_GROUPS] = {
            "vr": "SQ",
            "Value": full[PER_FRAME_FUNCTIONAL_GROUPS]["Value"][:1],
        }
    modality = series.modality
    tags = PrivateTags.of(header.private, little_endian=header.little_endian)
    stored = _with_ascconv(stored, tags)
    hints = _vendor_hints(tags)
    image_type = top.get("image_type", [])
    mr = _mr_detail(view, tags, image_type, series) if modality == "MR" else None
    pet = view.fill(PETDetail, "pet") if modality == "PT" else None
    if sop_class.functional_groups and PER_FRAME_FUNCTIONAL_GROUPS in full:
        frames = enhanced_frames(full, modality, hints)
    else:
        # a classic multi-frame object (US/NM/XA cine, multi-frame secondary capture) repeats its one
        # set of values for every frame
        first = _classic_frame(top, mr, pet, hints, modality)
        count = max(int(top.get("number_of_frames") or 1), 1)
        frames = [first] + [dataclasses.replace(first, frame=n) for n in range(2, count + 1)]
    top.setdefault("number_of_frames", max(len(frames), 1))
    if "MOSAIC" in image_type:
        top["mosaic_slices"] = _int(tags.get("siemens_images_in_mosaic"))
    return InstanceRecord(
        source_key=source_key,
        size=size,
        transfer_syntax_uid=header.transfer_syntax_uid,
        sop_class_name=sop_class.name,
        subject=subject,
        study=study,
        series=series,
        sop_instance_uid=ids["sop_instance_uid"],
        sop_class_uid=ids["sop_class_uid"],
        mr=mr,
        ct=view.fill(CTDetail, "ct") if modality == "CT" else None,
        pet=pet,
        frames=frames,
        header=stored,
        **top,
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
    # the data set keeps elements in the order they were read: the last one is where a cut shows
    elements = list(ds.values())
    last = elements[-1] if elements else None
    if not isinstance(last, RawDataElement):
        return None
    if last.length == 0xFFFFFFFF or last.value_tell + last.length <= size:
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
    tag: int = group << 16 | element
    return tag


def _vendor_hints(tags: PrivateTags) -> VendorImageHints:
    if not tags.creators:
        return VendorImageHints()
    ge_sequence = tags.get("ge_pulse_sequence")
    philips_type = tags.get("philips_image_type_mr")
    return VendorImageHints(
        ge_image_type=_int(tags.get("ge_image_type")),
        ge_pulse_sequence=str(ge_sequence[0])
        if isinstance(ge_sequence, list) and ge_sequence
        else None,
        ge_vas_collapse=_int(tags.get("ge_vas_collapse")),
        philips_image_type=str(philips_type[0])
        if isinstance(philips_type, list) and philips_type
        else None,
    )


ASCCONV_MEMBER = "Ascconv"


def _with_ascconv(stored: dict[str, Any], tags: PrivateTags) -> dict[str, Any]:
    """Keep the few protocol values of a Siemens CSA Series Header that the header JSON cannot hold.

    The element stays in the JSON as it was (its bulk value is dropped for size); the decoded keys go
    into an extra member `Ascconv` of that element, so they travel with the header to the sorter
    without a second read of the file (see `ascconv.py`).
    """
    if not tags.creators:
        return stored
    blob = tags.get("siemens_csa_series")
    key = tags.key("siemens_csa_series")
    if not isinstance(blob, bytes) or key is None:
        return stored
    values = siemens_ascconv(blob)
    if not values:
        return stored
    out = dict(stored)
    out[key] = {**(stored.get(key) or {"vr": "OB"}), ASCCONV_MEMBER: values}
    return out


def _int(values: Any) -> int | None:
    if isinstance(values, list) and values and isinstance(values[0], int | float):
        return int(values[0])
    return None


def _mr_detail(
    view: HeaderView, tags: PrivateTags, image_type: list[str], series: SeriesRecord
) -> MRDetail:
    mr = view.fill(MRDetail, "mr")
    siemens = (series.manufacturer or "").upper().startswith("SIEMENS")
    looks_diffusion = "DIFFUSION" in (t.upper() for t in image_type) or "ep_b" in (
        mr.sequence_name or ""
    )
    diffusion = read_diffusion(
        tags, mr.diffusion_b_value, mr.diffusion_gradient_orientation, siemens and looks_diffusion
    )
    mr.b_value = diffusion.b_value
    mr.gradient_direction = list(diffusion.gradient)
    sequence = tags.get("ge_pulse_sequence")
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
