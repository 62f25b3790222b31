"""A data set as the DICOM JSON model (PS3.18 F.2), built straight from the raw elements.

pydicom reads a header into raw elements (tag, VR, undecoded bytes) and converts a value only when it is
accessed. `Dataset.to_json_dict` converts every element through pydicom's full value machinery and stops
at the first malformed value (a DS holding "ApTx:" aborts the whole header). This module decodes each raw
element once, by VR, and keeps a malformed number as its text instead of failing. The result is the
catalog's copy of the header, kept so that features can be re-derived later without re-reading files.

What is left out:
- bulk data: a value longer than `max_value_bytes` (pixel data, Siemens CSA blobs, embedded PDFs) keeps
  its VR but no value;
- group 0002 (file meta information) and group lengths (gggg,0000): encoding artefacts;
- the Per-frame Functional Groups Sequence (5200,9230) is cut to its first item unless asked otherwise;
  the per-frame values that matter are summarised on the frame records (see `frames.py`).
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

PER_FRAME_FUNCTIONAL_GROUPS = 0x52009230
MAX_VALUE_BYTES = 4096

TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
# text VRs restricted to the default repertoire: decoded without the character-set machinery
ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI"})
# VRs that hold one value: a backslash in them is text, not a separator (PS3.5 6.2)
SINGLE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})
NUMBER_FORMATS = {
    "US": "H",
    "SS": "h",
    "UL": "L",
    "SL": "l",
    "FL": "f",
    "FD": "d",
    "UV": "Q",
    "SV": "q",
}
NUMBER_SIZES = {vr: struct.calcsize("<" + fmt) for vr, fmt in NUMBER_FORMATS.items()}
_BACKSLASH = {0x5C}
_TAG_KEYS: dict[int, str] = {}
_DICTIONARY_VRS: dict[int, str | None] = {}


def tag_key(tag: int) -> str:
    """The DICOM JSON key of a tag: eight upper-case hex digits, "00180081" for (0018,0081)."""
    key = _TAG_KEYS.get(tag)
    if key is None:
        key = _TAG_KEYS[tag] = f"{tag:08X}"
    return key


def dataset_encodings(ds: Dataset) -> list[str]:
    """Python codecs for the data set's Specific Character Set (0008,0005)."""
    charset = ds.get_item(0x00080005)
    value = charset.value if charset is not None else None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace").strip(" \x00").split("\\")
    if not value:
        return [default_encoding]
    return convert_encodings(value)


def dataset_to_json(
    ds: Dataset,
    *,
    max_value_bytes: int = MAX_VALUE_BYTES,
    keep_all_frames: bool = False,
    encodings: list[str] | None = None,
) -> dict[str, Any]:
    """Return `ds` as a DICOM JSON object (keys "GGGGEEEE", values {"vr", "Value"|"InlineBinary"}).

    `keep_all_frames` keeps every item of the Per-frame Functional Groups Sequence (the parser needs
    them once; the stored header does not).
    """
    if encodings is None:
        encodings = dataset_encodings(ds)
    pixel_rep = _pixel_representation(ds)
    out: dict[str, Any] = {}
    # Dataset.items() yields the stored (possibly still raw) elements without converting them
    for base_tag, elem in ds.items():
        tag = int(base_tag)  # a plain int: BaseTag comparisons run in Python
        if tag & 0xFFFF == 0 or tag >> 16 == 0x0002 or tag > 0xFFFC0000:
            continue
        key = tag_key(tag)
        vr = elem.VR
        if vr is None or vr == "UN" or len(vr) > 2:
            vr = _resolve_vr(tag, elem, pixel_rep)
        if vr == "SQ":
            value = ds[tag].value  # pydicom parses the items of a defined-length sequence on access
            items: list[Dataset] = list(value) if isinstance(value, Sequence) else []
            if tag == PER_FRAME_FUNCTIONAL_GROUPS and not keep_all_frames:
                items = items[:1]
            out[key] = {
                "vr": "SQ",
                "Value": [
                    dataset_to_json(
                        item,
                        max_value_bytes=max_value_bytes,
                        keep_all_frames=keep_all_frames,
                        encodings=encodings,
                    )
                    for item in items
                ],
            }
        elif isinstance(elem, RawDataElement):
            out[key] = _raw_json(elem, vr, encodings, max_value_bytes)
        else:
            out[key] = _converted_json(elem, vr, max_value_bytes)
    return out


def _pixel_representation(ds: Dataset) -> int:
    elem = ds.get_item(0x00280103)
    if elem is None or not elem.value:
        return 0
    value = elem.value
    if isinstance(value, bytes):
        return int.from_bytes(value[:2], "little")
    return int(value)


def _resolve_vr(tag: int, elem: RawDataElement | DataElement, pixel_rep: int) -> str:
    return resolve_vr(tag, elem.VR, pixel_rep)


def resolve_vr(tag: int, vr: str | None, pixel_rep: int) -> str:
    """The VR to decode with: the dictionary's when the file gave none (implicit VR) or UN, with the
    ambiguous ones ("US or SS") settled by Pixel Representation (0028,0103); "UN" when unknown."""
    if vr is None or vr == "UN":
        known = _DICTIONARY_VRS.get(tag, "")
        if known == "":
            try:
                known = _DICTIONARY_VRS[tag] = dictionary_VR(tag)
            except KeyError:
                known = _DICTIONARY_VRS[tag] = None
        if known is None:
            return "UN"  # private or unknown attribute in an implicit-VR file
        vr = known
    if " or " in vr:
        # ambiguous dictionary VRs: pixel-value attributes follow Pixel Representation (0028,0103)
        if vr in ("US or SS", "US or SS or OW"):
            return "SS" if pixel_rep == 1 else "US"
        if vr == "US or OW":
            return "US"
        return "OW" if "OW" in vr else vr.split(" or ")[0]
    return vr


def _raw_json(
    elem: RawDataElement, vr: str, encodings: list[str], max_value_bytes: int
) -> dict[str, Any]:
    return value_json(elem.value or b"", vr, elem.is_little_endian, encodings, max_value_bytes)


def value_json(
    raw: bytes, vr: str, little_endian: bool, encodings: list[str], max_value_bytes: int
) -> dict[str, Any]:
    """One non-sequence element value (raw bytes of VR `vr`) as a DICOM JSON attribute object."""
    if not raw or len(raw) > max_value_bytes:
        return {"vr": vr}
    if vr in TEXT_VRS:
        values = _text_values(raw, vr, encodings)
        return {"vr": vr, "Value": values} if values else {"vr": vr}
    if vr == "DS" or vr == "IS":
        numbers = [_number(part.strip("\x00 "), vr) for part in raw.decode("latin-1").split("\\")]
        return {"vr": vr, "Value": numbers} if any(n is not None for n in numbers) else {"vr": vr}
    fmt = NUMBER_FORMATS.get(vr)
    if fmt is not None:
        count = len(raw) // NUMBER_SIZES[vr]
        endian = "<" if little_endian else ">"
        return {
            "vr": vr,
            "Value": list(struct.unpack(f"{endian}{count}{fmt}", raw[: count * NUMBER_SIZES[vr]])),
        }
    if vr == "PN":
        names = [_person_name(v) for v in _decode(raw, encodings).split("\\")]
        return {"vr": vr, "Value": names} if any(names) else {"vr": vr}
    if vr == "AT":
        endian = "<" if little_endian else ">"
        count = len(raw) // 4
        pairs = struct.unpack(f"{endian}{count * 2}H", raw[: count * 4])
        return {
            "vr": vr,
            "Value": [f"{pairs[i]:04X}{pairs[i + 1]:04X}" for i in range(0, len(pairs), 2)],
        }
    return {"vr": vr, "InlineBinary": base64.b64encode(raw).decode("ascii")}


def _decode(raw: bytes, encodings: list[str]) -> str:
    if len(encodings) == 1:
        return raw.decode(encodings[0], "replace")
    return decode_bytes(raw, encodings, _BACKSLASH)


def _text_values(raw: bytes, vr: str, encodings: list[str]) -> list[str | None]:
    text = raw.decode("latin-1") if vr in ASCII_VRS else _decode(raw, encodings)
    if vr in SINGLE_TEXT_VRS:
        text = text.rstrip("\x00 ")
        return [text] if text else []
    if "\\" not in text:
        text = text.strip("\x00 ")
        return [text] if text else []
    values: list[str | None] = [p.strip("\x00 ") or None for p in text.split("\\")]
    return values if any(v is not None for v in values) else []


def _number(text: str, vr: str) -> float | int | str | None:
    """A DS/IS string as a JSON number; a malformed one stays text rather than losing the header."""
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    if number != number or number in (float("inf"), float("-inf")):
        return text
    if vr == "IS" or (
        number.is_integer() and "." not in text and "e" not in text and "E" not in text
    ):
        return int(number)
    return number


def _person_name(text: str) -> dict[str, str] | None:
    text = text.rstrip(" \x00")
    if not text:
        return None
    name = {
        label: group
        for label, group in zip(
            ("Alphabetic", "Ideographic", "Phonetic"), text.split("=")[:3], strict=False
        )
        if group
    }
    return name or None


def _converted_json(elem: DataElement, vr: str, max_value_bytes: int) -> dict[str, Any]:
    """An element pydicom already converted (read as a sequence, or accessed before us)."""
    value = elem.value
    if value is None or value == "" or value == b"":
        return {"vr": vr}
    if isinstance(value, bytes | bytearray):
        if len(value) > max_value_bytes:
            return {"vr": vr}
        return {"vr": vr, "InlineBinary": base64.b64encode(bytes(value)).decode("ascii")}
    values = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    out: list[Any] = []
    for v in values:
        try:
            if vr == "PN":
                out.append(_person_name(str(v)))
            elif vr in ("DS", "FL", "FD", "OF", "OD"):
                out.append(float(v))
            elif vr in ("IS", "US", "SS", "UL", "SL", "UV", "SV"):
                out.append(int(v))
            else:
                out.append(str(v))
        except (TypeError, ValueError):
            out.append(str(v))
    return {"vr": vr, "Value": out}
