"""Verification: read the output back and look everywhere for what the input identified.

Every element at every depth is searched, private ones and file meta included, and so is the
object key. Any hit is a `Finding`; a file with findings must not be released.

Most files hold none of the input's identifiers anywhere, and that is proven without parsing: when
the written bytes, read as the one-byte text they are (Latin-1 character sets, a plain little endian
data set), contain none of them at all - not even as part of a longer word - no element can
(`_bytes_name_nobody`). Only a file where one occurs somewhere is read back and searched element by
element, where the hit is placed and a coincidence told from a leak.
"""

from __future__ import annotations

import codecs
import io
import struct
import zlib
from dataclasses import dataclass

from pydicom import Dataset, dcmread
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.uid import UID

from services.anonymizer.profile.identifiers import (
    CREATORS,
    EXPLAINING,
    IdentifierSet,
    Matcher,
    is_private_creator,
)
from services.anonymizer.profile.vendor_headers import GZIP_MAGIC, unpack_gzip_block
from services.anonymizer.profile.writer import LONG_LENGTH_VRS

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
    pixel_data: tuple[int, int] | None = None,
) -> list[Finding]:
    """Findings of any original identifying value, UID or date in `output` (file bytes or dataset,
    re-read from bytes so what is checked is what was written) and in `object_key`.

    Hits that are coincidences (`_explained`: a vendor's name that is also the institution's, a
    station named after its model) are no findings; they go to `excused` when it is given.
    `pixel_data`: the byte range of the top-level Pixel Data element in `output`, as the writer
    reports it (`WrittenFile`); the search skips pixel values at every depth, so the proof on the
    bytes may leave them out."""
    matcher = originals.matcher()
    findings: list[Finding] = []
    if not isinstance(output, bytes) or not _bytes_name_nobody(output, originals, pixel_data):
        ds = dcmread(io.BytesIO(output), force=True) if isinstance(output, bytes) else output
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            _search(meta, matcher, "meta:", findings, originals, excused)
        _search(ds, matcher, "", findings, originals, excused)
    if object_key:
        findings.extend(
            Finding("object key", kind, "key") for kind, _ in matcher.in_text(object_key)
        )
    return findings


# --- the proof on the written bytes -------------------------------------------------------------

SPECIFIC_CHARACTER_SET = struct.pack("<HH", 0x0008, 0x0005)
PIXEL_DATA_TAG = struct.pack("<HH", 0x7FE0, 0x0010)
# character sets whose text is the Latin-1 reading of its bytes (`_single_codec` gives latin-1)
LATIN1_CHARSETS = frozenset({b"", b"ISO_IR 6", b"ISO_IR 100"})
GZIP_DEFLATE = GZIP_MAGIC + b"\x08"  # a gzip member (RFC 1952, CM 8) starts so


def _bytes_name_nobody(
    data: bytes, originals: IdentifierSet, pixel_data: tuple[int, int] | None
) -> bool:
    """True when the element-wise search cannot find any original value, UID or date in the written
    file `data`: none occurs in its bytes, nor in a gzip block within them, where an element's text
    could hold it as a hit. False when one may (the file is then read back and searched).

    The element-wise search reads each element's text as its bytes decoded with the data set's
    character set (Latin-1 here, checked for every Specific Character Set in the file), without
    trailing padding; a binary value's text adds what its gzip member decompresses to. It finds a
    value case-insensitively (an ASCII value matches only ASCII letters in Latin-1 text) and not
    within a longer word, a UID or a date not within a longer run of digits (and dots). So a hit is
    an occurrence in the bytes whose neighbours are no letters or digits (`_may_hit`), unless the
    element's value begins or ends right there, which the bytes around tell (an element header
    before, the next header after). Anything this cannot read so (a non-ASCII value, another
    character set, a deflated or big endian data set, a gzip stream of several members) is False.
    """
    if any(not value.isascii() for value in originals.values) or data[128:132] != b"DICM":
        return False
    syntax = _syntax_of(data)
    if syntax is None or syntax.is_deflated or not syntax.is_little_endian:
        return False
    implicit = bool(syntax.is_implicit_VR)
    parts = [data]
    if pixel_data is not None:  # each side searched on its own: no text spans the cut
        start, end = pixel_data
        if data[start : start + 4] != PIXEL_DATA_TAG:
            return False
        parts = [data[:start], data[end:]]
    if not all(_latin1_only(part, implicit) for part in parts):
        return False
    texts = [_Text(part, implicit) for part in parts]
    for part in parts:
        at = part.find(GZIP_DEFLATE)
        while at >= 0:
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                inner = inflate.decompress(part[at:])
            except zlib.error:
                inner = b""
            if inflate.eof:
                if inflate.unused_data.lstrip(b"\x00").startswith(GZIP_MAGIC):
                    return False  # several members: gzip reads them all
                texts.append(_Text(inner, None))  # plain text: no element starts or ends within
            at = part.find(GZIP_DEFLATE, at + 1)
    values = [v.lower().encode("ascii") for v in originals.values]
    numbers = [t.encode("ascii") for t in (*originals.uids, *originals.dates) if t.isascii()]
    if len(numbers) != len(originals.uids) + len(originals.dates):
        return False
    return not any(text.may_hit(term, WORD) for text in texts for term in values) and not any(
        text.may_hit(term, NUMBER) for text in texts for term in numbers
    )


WORD = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
NUMBER = frozenset(b"0123456789.")
_UINT32 = struct.Struct("<L")


class _Text:
    """Written bytes as the search reads them: lower-cased for values; `implicit` tells how an
    element header looks there (None: plain text, no element in it)."""

    def __init__(self, data: bytes, implicit: bool | None) -> None:
        self.data = data
        self.lower = data.lower()
        self.implicit = implicit

    def may_hit(self, term: bytes, inside: frozenset[int]) -> bool:
        """Whether `term` occurs where an element's text could hold it as a whole word or run:
        each side a non-`inside` byte, the end of the bytes, or where a value may begin or end."""
        text = self.lower
        at = text.find(term)
        while at >= 0:
            end = at + len(term)
            if (at == 0 or text[at - 1] not in inside or self._value_may_start(at)) and (
                end == len(text) or text[end] not in inside or self._value_may_end(end)
            ):
                return True
            at = text.find(term, at + 1)
        return False

    def _value_may_start(self, at: int) -> bool:
        """An element header may end at `at`, as pydicom reads one: explicit VR (tag, a VR, a 2-byte
        length; or tag, a VR, 0, a 4-byte length) or implicit VR (tag, a 4-byte length the file can
        hold), which pydicom also reads in an explicit VR data set (a writer's switch)."""
        if self.implicit is None:
            return False
        data = self.data
        if at >= 8 and _explicit_vr(data, at - 4):
            return True
        if at >= 12 and _explicit_vr(data, at - 8) and data[at - 6 : at - 4] == b"\x00\x00":
            return True
        return at >= 8 and int(_UINT32.unpack_from(data, at - 4)[0]) <= len(data)

    def _value_may_end(self, end: int) -> bool:
        """The next element, item or delimiter may start at `end`: an item tag (FFFE,xxxx), an
        explicit VR header, or an implicit one (a length the file can hold, or undefined)."""
        if self.implicit is None:
            return False
        data = self.data
        if data[end : end + 2] == b"\xfe\xff" or _explicit_vr(data, end + 4):
            return True
        if end + 8 > len(data):
            return False
        length: int = _UINT32.unpack_from(data, end + 4)[0]
        return length <= len(data) or length == 0xFFFFFFFF


def _explicit_vr(data: bytes, at: int) -> bool:
    """pydicom reads the two bytes at `at` as an explicit VR (a known one or any from AA to ZZ;
    anything else it takes for an implicit VR header)."""
    return bool(b"AA" <= data[at : at + 2] <= b"ZZ")


def _syntax_of(data: bytes) -> UID | None:
    """The transfer syntax a Part 10 file's meta group (explicit VR little endian) declares."""
    at = 132
    while at + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, at)
        if group != 2:
            return None
        vr = data[at + 4 : at + 6].decode("latin-1")
        if vr in LONG_LENGTH_VRS:
            (length,) = struct.unpack_from("<L", data, at + 8)
            at += 12
        else:
            (length,) = struct.unpack_from("<H", data, at + 6)
            at += 8
        if element == 0x0010:
            uid = UID(data[at : at + length].rstrip(b" \x00").decode("latin-1"))
            return uid if uid.is_transfer_syntax else None
        at += length
    return None


def _latin1_only(data: bytes, implicit: bool) -> bool:
    """Every Specific Character Set in `data` (at any depth; a lookalike of its tag elsewhere only
    makes this False) names a character set read as Latin-1."""
    at = data.find(SPECIFIC_CHARACTER_SET)
    while at >= 0:
        if implicit:
            if at + 8 > len(data):
                return False
            (length,) = struct.unpack_from("<L", data, at + 4)
            start = at + 8
        else:
            if data[at + 4 : at + 6] != b"CS" or at + 8 > len(data):
                return False
            (length,) = struct.unpack_from("<H", data, at + 6)
            start = at + 8
        if length > 64 or data[start : start + length].strip(b" \x00") not in LATIN1_CHARSETS:
            return False
        at = data.find(SPECIFIC_CHARACTER_SET, at + 1)
    return True
