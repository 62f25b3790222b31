"""Verification: read the output back and look everywhere for what the input identified.

Every element at every depth is searched, private ones and file meta included, and so is the
object key. Any hit is a `Finding`; a file with findings must not be released.
"""

from __future__ import annotations

import codecs
import io
from dataclasses import dataclass

from pydicom import Dataset, dcmread
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement

from services.anonymizer.profile.identifiers import (
    CREATORS,
    EXPLAINING,
    IdentifierSet,
    Matcher,
    is_private_creator,
)
from services.anonymizer.profile.vendor_headers import unpack_gzip_block

SKIP_BULK = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # pixel data: not text
CODED_VRS = frozenset({"CS", "AS"})
BINARY_VRS = frozenset({"OB", "OW", "UN", "OB or OW", "US or OW"})
TEXT_VRS = frozenset({"PN", "SH", "LO", "ST", "LT", "UT", "UC"})
NUMERIC_VRS = frozenset(
    {"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "OF", "OD", "OL", "OV", "AT"}
)


@dataclass(frozen=True)
class Finding:
    """An original identifier found in the output: where (`location`), what kind, and the tag."""

    location: str
    kind: str  # value | uid | date
    detail: str  # the attribute keyword or tag; never the value itself


def _bytes_text(value: bytes) -> str:
    """A binary value as latin-1 text, plus what a GE gzip protocol block compresses."""
    inner = unpack_gzip_block(value)
    return value.decode("latin-1") + ("\n" + inner.decode("latin-1") if inner else "")


def _text_of(elem: DataElement) -> str | None:
    value = elem.value
    if value is None:
        return None
    if isinstance(value, bytes):
        return _bytes_text(value)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _raw_text(raw: RawDataElement, vr: str, codec: str) -> str | None:
    """The searchable text of a raw element, without pydicom's value conversion (the expensive part
    of reading a header back): text VRs decoded with the data set's one character set, other
    strings as ASCII, binary values (UN, OB, vendor blobs) as latin-1 plus what a GE gzip block
    compresses."""
    value = raw.value
    if not value:
        return None
    if vr in BINARY_VRS:
        return _bytes_text(value)
    if vr in TEXT_VRS:
        return value.decode(codec, "replace").rstrip(" \x00")
    return value.decode("latin-1").rstrip(" \x00")


def _single_codec(ds: Dataset) -> str | None:
    """The Python codec of a data set with one character set and no code extensions, else None."""
    encodings = ds._character_set
    if isinstance(encodings, str):
        encodings = [encodings]
    if not encodings:
        return "latin-1"
    if len(encodings) != 1 or "2022" in encodings[0]:
        return None
    name = "latin-1" if encodings[0] == default_encoding else encodings[0]
    try:
        codecs.lookup(name)
    except LookupError:
        return None
    return name


def _search(
    ds: Dataset,
    matcher: Matcher,
    where: str,
    out: list[Finding],
    originals: IdentifierSet,
    excused: list[Finding] | None = None,
) -> None:
    # text in the default repertoire is searched as stored; other character sets go through pydicom
    codec = _single_codec(ds)
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset converts every element)
        if tag in SKIP_BULK:
            continue
        raw = ds.get_item(tag)
        vr = getattr(raw, "VR", None)
        if vr is None:  # implicit VR: the dictionary's
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "UN"
        if vr in NUMERIC_VRS or vr in CODED_VRS:
            continue  # binary numbers and defined terms (ContentQualification RESEARCH): no free text
        if vr != "SQ" and codec and isinstance(raw, RawDataElement):
            text = _raw_text(raw, vr, codec)
            label = ""  # named only when needed (a UID's keyword, a finding)
        else:
            elem = ds[tag]
            label = elem.keyword or _label(tag)
            if elem.VR == "SQ":
                for i, item in enumerate(elem.value or []):
                    _search(item, matcher, f"{where}{label}[{i}].", out, originals, excused)
                continue
            vr = elem.VR
            text = _text_of(elem)
        if not text:
            continue
        if vr == "UI":
            if any(uid.strip(" \x00") in matcher.uids for uid in text.split("\\")):
                label = label or _label(tag)
                if not label.endswith("ClassUID"):  # kinds of objects, kept by design
                    out.append(Finding(f"{where}{label}", "uid", label))
            continue
        hits = matcher.in_text(text)
        if hits:
            label = label or _label(tag)
            found = [Finding(f"{where}{label}", kind, label) for kind, _ in hits]
            if _explained(tag, text, hits, originals):
                if excused is not None:
                    excused.extend(found)
            else:
                out.extend(found)


def _explained(tag: int, text: str, hits: list[tuple[str, str]], originals: IdentifierSet) -> bool:
    """True when value hits in an element are a coincidence, not a leak: the element is a device
    or technique attribute (or a private creator) that held exactly this text in the source file
    and still does, every hit is a value (never a UID or a date), none is an identifier's value
    (PatientID, AccessionNumber...), only one identifying value matched (a name planted whole,
    `Doe^Jane` in ManufacturerModelName, matches twice and is refused), and the element's text is
    not a person's whole name (`stc_test` as the SequenceName of a patient `stc_test` is a leak;
    `efgre3d` of a phantom named after its `*efgre3d_12` sequence is not). A device or place may
    equal the whole text: InstitutionName SIEMENS, Manufacturer SIEMENS."""
    key = CREATORS if is_private_creator(tag) else tag
    if key != CREATORS and tag not in EXPLAINING:
        return False
    whole = text.strip(" \x00").upper()
    if whole not in originals.kept.get(key, ()):
        return False
    if any(kind != "value" for kind, _ in hits):
        return False
    matched = {" ".join(m.upper().split()) for _, m in hits}
    if len(matched) != 1 or matched & originals.fixed:
        return False
    return " ".join(whole.replace("^", " ").split()) not in originals.names


def _label(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def verify(
    output: bytes | Dataset,
    originals: IdentifierSet,
    object_key: str | None = None,
    excused: list[Finding] | None = None,
) -> list[Finding]:
    """Findings of any original identifying value, UID or date in `output` (file bytes or dataset,
    re-read from bytes so what is checked is what was written) and in `object_key`.

    Hits that are coincidences (`_explained`: a vendor's name that is also the institution's, a
    station named after its model) are no findings; they go to `excused` when it is given."""
    ds = dcmread(io.BytesIO(output), force=True) if isinstance(output, bytes) else output
    matcher = originals.matcher()
    findings: list[Finding] = []
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        _search(meta, matcher, "meta:", findings, originals, excused)
    _search(ds, matcher, "", findings, originals, excused)
    if object_key:
        findings.extend(
            Finding("object key", kind, "key") for kind, _ in matcher.in_text(object_key)
        )
    return findings
