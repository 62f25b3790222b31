"""Writing a de-identified data set: what was not changed is copied as the bytes it was read as.

De-identification touches a few dozen of a file's hundreds of elements; the rest are still pydicom
raw elements (bytes as read). pydicom's writer handles each element through a per-element buffer and
its value writers, which made writing the largest single cost of the anonymizer. Here a raw element
of a data set written in its own encoding (little endian, explicit or implicit VR, same character
set) is emitted as tag + VR + length + its bytes, sequences are walked the same way, and every other
element (changed, created, or needing re-encoding) goes through pydicom's own `write_data_element`.
A data set in another encoding (big endian, deflated, or read in another one) is written by pydicom
entirely. The file meta group is pydicom's, with the checks of `dcmwrite(enforce_file_format=True)`.

`write_file` also tells where in the file the top-level Pixel Data element went, so verification
can leave the pixel values (no text) out of its search of the written bytes.
"""

from __future__ import annotations

import struct
from copy import copy
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import (
    dcmwrite,
    validate_file_meta,
    write_data_element,
    write_dataset,
    write_file_meta_info,
)
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

UNDEFINED = 0xFFFFFFFF
LONG_LENGTH_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_IMPLICIT = struct.Struct("<HHL")
_EXPLICIT_SHORT = struct.Struct("<HH2sH")
_EXPLICIT_LONG = struct.Struct("<HH2sHL")
_ITEM = struct.Struct("<HHL")
ITEM_UNDEFINED = _ITEM.pack(0xFFFE, 0xE000, UNDEFINED)
ITEM_DELIMITER = _ITEM.pack(0xFFFE, 0xE00D, 0)
SEQUENCE_DELIMITER = _ITEM.pack(0xFFFE, 0xE0DD, 0)
PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True)
class WrittenFile:
    """A DICOM Part 10 file as written, and the byte range (start, end) of its top-level Pixel Data
    element, header and value (None when the file has none or pydicom wrote it)."""

    data: bytes
    pixel_data: tuple[int, int] | None = None


def dicom_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file, in its own transfer syntax."""
    return write_file(ds).data


def write_file(ds: Dataset) -> WrittenFile:
    """The dataset as a DICOM Part 10 file, in its own transfer syntax, and where its pixels are."""
    meta = getattr(ds, "file_meta", None)
    syntax: UID | None = meta.get("TransferSyntaxUID") if meta is not None else None
    encoding = _encoding_of(syntax)
    if (
        encoding is None
        or syntax == DeflatedExplicitVRLittleEndian
        or tuple(ds.original_encoding) != encoding
        or ds.original_character_set != ds._character_set
        or any(tag >> 16 in (0, 2) for tag in ds._dict)
    ):
        return WrittenFile(_pydicom_bytes(ds))
    assert meta is not None and syntax is not None
    implicit = encoding[0]
    file_meta = _meta_copy(meta)  # as dcmwrite(enforce_file_format=True) completes and checks it
    for meta_key, ds_key in (
        ("MediaStorageSOPClassUID", "SOPClassUID"),
        ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
    ):
        value = ds.get(ds_key)
        if file_meta.get(meta_key) is None or (value and value != file_meta.get(meta_key)):
            setattr(file_meta, meta_key, value)
    validate_file_meta(file_meta, enforce_standard=True)
    preamble = getattr(ds, "preamble", None) or b"\x00" * 128
    if len(preamble) != 128:
        return WrittenFile(_pydicom_bytes(ds))
    if "PixelData" in ds and not syntax.is_private:
        ds["PixelData"].is_undefined_length = syntax.is_compressed
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, True
    fp.write(preamble)
    fp.write(b"DICM")
    write_file_meta_info(fp, file_meta, enforce_standard=True)  # explicit VR, its own buffer
    pixels: list[tuple[int, int]] = []
    _write(fp, ds, implicit, "iso8859", pixels)
    return WrittenFile(bytes(fp.getvalue()), pixels[0] if pixels else None)


def _meta_copy(meta: FileMetaDataset) -> FileMetaDataset:
    """A copy of a file meta group that writing may complete without touching `meta`: its own
    elements (values are shared: writing replaces them, never changes one in place) and its read
    encoding. A deep copy gave the same, several times slower."""
    copied = FileMetaDataset({tag: copy(elem) for tag, elem in meta._dict.items()})
    implicit, little = meta.original_encoding
    copied.set_original_encoding(implicit, little, meta.original_character_set)
    return copied


def _pydicom_bytes(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    dcmwrite(fp, ds, enforce_file_format=True)
    return bytes(fp.getvalue())


def _encoding_of(syntax: UID | None) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) of a transfer syntax this writer handles, else None."""
    if syntax is None or not syntax.is_transfer_syntax or not syntax.is_little_endian:
        return None
    return (bool(syntax.is_implicit_VR), True)


def _write(
    fp: DicomBytesIO,
    ds: Dataset,
    implicit: bool,
    parent_encoding: Any,
    pixels: list[tuple[int, int]] | None = None,
) -> None:
    """Write the elements of `ds`; `pixels` (top level only) gets the Pixel Data element's range."""
    if tuple(ds.original_encoding) != (implicit, True) or (
        ds.original_character_set != ds._character_set
    ):
        # a data set built in memory (a new code item) or one that needs re-encoding
        write_dataset(fp, ds, parent_encoding)
        return
    encoding = ds.get("SpecificCharacterSet", parent_encoding)
    # the elements in tag order, the tags as plain ints (pydicom's tags compare in Python)
    for tag, elem in sorted(zip(map(int, ds._dict), ds._dict.values(), strict=True)):
        group, element = tag >> 16, tag & 0xFFFF
        if element == 0 and group > 6:
            continue  # retired group lengths are not written (PS3.5 7.2), as pydicom does
        if isinstance(elem, RawDataElement) and elem.value is None:
            elem = ds.get_item(tag)  # a deferred value, read as `get_item` reads it
        start = fp.tell()
        if isinstance(elem, RawDataElement) and _raw_written(fp, elem, group, element, implicit):
            pass
        elif isinstance(elem, DataElement) and elem.VR == "SQ":
            _sequence(fp, elem, group, element, implicit, encoding)
        else:
            write_data_element(fp, elem, encoding)
        if tag == PIXEL_DATA and pixels is not None:
            pixels.append((start, fp.tell()))


def _raw_written(
    fp: DicomBytesIO, elem: RawDataElement, group: int, element: int, implicit: bool
) -> bool:
    """Write a raw element as its bytes; False when it needs pydicom (undefined length, unknown or
    ambiguous VR, a value too long for a 16-bit length)."""
    if elem.length == UNDEFINED:
        return False
    value = elem.value or b""
    size = len(value)
    if implicit:
        fp.write(_IMPLICIT.pack(group, element, size))
    else:
        vr = elem.VR
        if not vr or len(vr) != 2:
            return False
        if vr in LONG_LENGTH_VRS:
            fp.write(_EXPLICIT_LONG.pack(group, element, vr.encode("ascii"), 0, size))
        elif size <= 0xFFFF:
            fp.write(_EXPLICIT_SHORT.pack(group, element, vr.encode("ascii"), size))
        else:
            return False
    fp.write(value)
    return True


def _sequence(
    fp: DicomBytesIO, elem: DataElement, group: int, element: int, implicit: bool, encoding: Any
) -> None:
    """A sequence written as pydicom writes it (its items with defined lengths unless an item was
    read with an undefined one; the sequence's length defined unless it was undefined), each
    item's elements by `_write`."""
    if implicit:
        fp.write(_IMPLICIT.pack(group, element, UNDEFINED))
    else:
        fp.write(_EXPLICIT_LONG.pack(group, element, b"SQ", 0, UNDEFINED))
    start = fp.tell()
    for item in elem.value or []:
        fp.write(ITEM_UNDEFINED)
        length_at = fp.tell() - 4
        _write(fp, item, implicit, encoding)
        if getattr(item, "is_undefined_length_sequence_item", False):
            fp.write(ITEM_DELIMITER)
        else:
            end = fp.tell()
            fp.seek(length_at)
            fp.write(struct.pack("<L", end - length_at - 4))
            fp.seek(end)
    if elem.is_undefined_length:
        fp.write(SEQUENCE_DELIMITER)
    else:
        end = fp.tell()
        fp.seek(start - 4)
        fp.write(struct.pack("<L", end - start))
        fp.seek(end)
