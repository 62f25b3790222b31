"""Kept vendor headers cleaned in place: same length, structure intact, still readable by dcm2niix.

The private blocks conversion needs (`safe_private.json`) hide text a plain attribute walk never
sees:

- Siemens CSA image/series headers (`SIEMENS CSA HEADER` xx10/xx20): a binary list of named tags
  (`SV10` CSA2, or the older CSA1), each with string items. The series header's `MrPhoenixProtocol`
  item holds the XProtocol text and the `### ASCCONV BEGIN ###` protocol (`key = value` lines):
  `tReferenceImageN` are the UIDs of the localizer images, and `sSpecPara.lFinalMatrixSizePhase`
  holds, despite its name, the acquisition date (YYYYMMDD) on every sequence but spectroscopy,
  where it is a small matrix size. Items carry leftover text after their terminating NUL.
- GE's Protocol Data Block (`GEMS_SERS_01` xx1B): a little-endian uint32 length and a gzip stream
  of `KEY "value"` lines (slice order, phase encoding, protocol UIDs, notes).
- Philips and GE text elements (LO/SH/LT/UN...): plain strings.

`VendorTextCleaner.clean` rewrites such a value without changing any offset or length: original
dates become the subject's shifted date (or the dummy 19000101 when dates are removed), UIDs get a
same-length replacement derived from the project secret, identifying values are overwritten with X.
In a CSA header only the text of names and items is touched, never the binary counts and lengths
around them; a GE block is decompressed, cleaned and compressed again. What the cleaning could not
reach (an original identifier still found afterwards) is reported as `residue`: the caller removes
the element rather than keep it.
"""

from __future__ import annotations

import bisect
import gzip
import re
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from services.anonymizer.profile.dates import shift_da
from services.anonymizer.profile.identifiers import Matcher
from services.anonymizer.profile.uids import UID_PATTERN, is_well_known, same_length_uid

GZIP_MAGIC = b"\x1f\x8b"
CSA2_MAGIC = b"SV10"
CSA_NAME_LENGTH = 64
CSA_TAG_HEADER = struct.Struct("<64si4s3i")  # name, vm, vr, syngodt, n_items, xx (77 or 205)
CSA_ITEM_HEADER = struct.Struct("<4i")  # item length is the second field
CSA_MAX_TAGS = 1000
CSA_MAX_ITEMS = 1000

# ASCCONV / XProtocol fields that hold a date although their names do not say so (see the module
# docstring): `sSpecPara.lFinalMatrixSizePhase = 20180502`, `<ParamLong."lFinalMatrixSizePhase">
# { 20180502 }`; a value is taken for a date only when it is a valid YYYYMMDD
ASCCONV_DATE_KEYS = ("sSpecPara.lFinalMatrixSizePhase",)
_ASCCONV_NAMES = tuple(key.rsplit(".", 1)[-1].encode() for key in ASCCONV_DATE_KEYS)
_KEYED_VALUE = re.compile(r'(?:\s*=\s*|">\s*\{\s*)([0-9]{8})(?![0-9])')
# three numeric UID components between dots: every UID of >= 5 components has them, and the
# literal dot lets the search skip ahead fast through 100 KB protocol texts
# a UID, or what is left of one (stale text in a CSA name field: "43.66024.2018012411254450177",
# the device serial and the acquisition time): two dots inside digits
_UID_CORE = re.compile(rb"[0-9]\.[0-9]+\.[0-9]")
_DIGITS_DOT = frozenset(b"0123456789.")
_DIGITS = frozenset("0123456789")
_ALNUM = frozenset("0123456789abcdefghijklmnopqrstuvwxyz")  # word bounds as verification's (ASCII)
DUMMY_DATE = "19000101"


def unpack_gzip_block(data: bytes) -> bytes | None:
    """The decompressed text of a length-prefixed gzip block, None when `data` is not one."""
    if len(data) < 8 or data[4:6] != GZIP_MAGIC:
        return None
    (length,) = struct.unpack("<I", data[:4])
    try:
        return gzip.decompress(data[4 : 4 + length])
    except (OSError, EOFError, zlib.error):
        return None


GZIP_FNAME, GZIP_FCOMMENT = 0x08, 0x10


def gzip_header_identifies(data: bytes) -> bool:
    """Whether a length-prefixed gzip block's header carries a file name, a comment or a time
    stamp (RFC 1952 FLG and MTIME): the GE scanner writes the exam and series number there."""
    flags = data[7] if len(data) > 8 else 0
    return bool(flags & (GZIP_FNAME | GZIP_FCOMMENT)) or data[8:12] != b"\x00\x00\x00\x00"


def pack_gzip_block(text: bytes) -> bytes:
    """`text` as a length-prefixed gzip block of even length (a DICOM value)."""
    compressed = gzip.compress(text, mtime=0)
    out = struct.pack("<I", len(compressed)) + compressed
    return out + b"\x00" if len(out) % 2 else out


def csa_text_spans(data: bytes) -> list[tuple[int, int]] | None:
    """The (start, end) byte ranges of a Siemens CSA header that hold text: each tag's 64-byte name
    field and each item's data (leftovers after the NUL included); None when `data` is not a CSA
    header whose every count and length is consistent (it is then cleaned as plain bytes)."""
    layout = csa_layout(data)
    return sorted(layout[0] + layout[1]) if layout is not None else None


def csa_layout(data: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]] | None:
    """(name fields, item data) byte ranges of a CSA header, or None when it is not one."""
    end = len(data)
    pos = 8 if data[:4] == CSA2_MAGIC else 0
    if pos + 8 > end:
        return None
    n_tags, _check = struct.unpack_from("<2I", data, pos)
    if not 0 < n_tags <= CSA_MAX_TAGS:
        return None
    pos += 8
    names: list[tuple[int, int]] = []
    items: list[tuple[int, int]] = []
    for _ in range(n_tags):
        if pos + CSA_TAG_HEADER.size > end:
            return None
        _name, _vm, _vr, _syngodt, n_items, xx = CSA_TAG_HEADER.unpack_from(data, pos)
        if not 0 <= n_items <= CSA_MAX_ITEMS or xx not in (77, 205):
            return None
        names.append((pos, pos + CSA_NAME_LENGTH))
        pos += CSA_TAG_HEADER.size
        for _ in range(n_items):
            if pos + CSA_ITEM_HEADER.size > end:
                return None
            length = CSA_ITEM_HEADER.unpack_from(data, pos)[1]
            pos += CSA_ITEM_HEADER.size
            if length < 0 or pos + length > end:
                return None
            if length:
                items.append((pos, pos + length))
            pos += (length + 3) // 4 * 4
    return names, items


def clear_stale_csa_names(data: bytes) -> bytes | None:
    """`data` with the bytes after the terminating NUL of every CSA tag name zeroed, or None when
    there were none (or `data` is no CSA header). The scanner leaves stale memory there ("enPat$$
    10a50$5eb$MRC35119b051fac": a station name; remnants of UIDs with the device serial and the
    acquisition time); no reader looks past the NUL."""
    layout = csa_layout(data)
    if layout is None:
        return None
    out = bytearray(data)
    for start, stop in layout[0]:
        nul = out.find(b"\x00", start, stop)
        if nul >= 0 and any(out[nul + 1 : stop]):
            out[nul + 1 : stop] = bytes(stop - nul - 1)
    return bytes(out) if out != data else None


def _date_forms(yyyymmdd: str) -> dict[str, str]:
    """The written forms of a date that vendor text uses, each mapped to its YYYYMMDD."""
    y, m, d = yyyymmdd[:4], yyyymmdd[4:6], yyyymmdd[6:8]
    forms = [yyyymmdd, f"{y}-{m}-{d}", f"{y}.{m}.{d}", f"{y}/{m}/{d}", f"{d}.{m}.{y}"]
    return {form: yyyymmdd for form in forms}


def _rewrite_date(token: str, new: str) -> str:
    """`token` (a date in one of the forms above, or a DT digit run) with its date set to `new`."""
    if token.isdigit():
        return new + token[8:]
    if token[2] == ".":  # DD.MM.YYYY
        return f"{new[6:8]}.{new[4:6]}.{new[:4]}"
    sep = token[4]
    return f"{new[:4]}{sep}{new[4:6]}{sep}{new[6:8]}"


def is_valid_date(text: str) -> bool:
    if len(text) != 8 or not text.isdigit():
        return False
    try:
        date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return False
    return True


@dataclass
class CleanedValue:
    """One vendor value after cleaning: `data` None when nothing changed; the original UIDs and
    dates it held (for verification); `residue` True when an original identifier is still in it."""

    data: bytes | None
    uids: list[str] = field(default_factory=list)
    dates: list[str] = field(default_factory=list)
    residue: bool = False


class VendorTextCleaner:
    """Cleans kept vendor values of one file once everything identifying in it is known.

    `values`: the identifying values to overwrite (whole values, name components and the words of
    names; not the words of an institution: "research" also names sequences,
    `research/ABCD/epi_pepolar`, and stays); `originals`: what
    verification will search for (whole values, UIDs, dates), used to report what is left;
    `new_date`: YYYYMMDD -> its replacement (the subject's shift or the dummy date), None when dates
    are kept; `secret` keys the same-length UID replacements (None when UIDs are kept).
    """

    def __init__(
        self,
        *,
        values: Iterable[str],
        originals: Matcher,
        new_date: Callable[[str], str] | None,
        secret: bytes | None,
    ) -> None:
        # longest first: "DOE JOHN" is masked whole before "DOE"
        self._lowered = sorted({v.lower() for v in values if v}, key=len, reverse=True)
        self.originals = originals
        self.new_date = new_date
        self.secret = secret
        self.dates: dict[str, str] = {}  # written form -> YYYYMMDD, for every original date
        for original in originals.dates:
            self.dates.update(_date_forms(original))
        self._date_bytes = [form.encode() for form in self.dates]
        self._uid_bytes = [uid.encode() for uid in originals.uids]

    def clean(self, data: bytes) -> CleanedValue:
        """`data` cleaned: a GE gzip block inside its compression, a CSA header item by item, any
        other value as text of the same length."""
        inner = unpack_gzip_block(data)
        if inner is None:
            cleared = clear_stale_csa_names(data)
            if cleared is not None:  # a CSA header: its stale bytes go whatever they hold
                result = self._clean(cleared, csa_text_spans(cleared))
                result.data = result.data if result.data is not None else cleared
                return result
            if not self._may_hold(data):
                return CleanedValue(None)  # most vendor values: short codes and numbers
            return self._clean(data, csa_text_spans(data))
        result = self._clean(inner, None)
        if result.data is not None or gzip_header_identifies(data):
            # repacked: the gzip header keeps no original file name ("Ex1486Ser1Rx": the exam
            # number) and no time stamp (when the block was written, i.e. the acquisition)
            result.data = pack_gzip_block(result.data if result.data is not None else inner)
        packed = result.data if result.data is not None else data
        result.residue = result.residue or bool(self.originals.in_text(packed.decode("latin-1")))
        return result

    def _clean(self, data: bytes, spans: list[tuple[int, int]] | None) -> CleanedValue:
        starts = [s for s, _ in spans] if spans is not None else []

        def inside(start: int, stop: int) -> bool:
            if spans is None:
                return True
            i = bisect.bisect_right(starts, start) - 1
            return i >= 0 and stop <= spans[i][1]

        out = CleanedValue(None)
        buf = data
        if self.secret is not None:
            buf = self._uids(buf, inside, out)
        text = buf.decode("latin-1")
        if self.new_date is not None:
            text = self._dates(text, inside, out)
        if self._lowered:
            text = self._values(text, inside)
        cleaned = text.encode("latin-1")
        if cleaned != data:
            out.data = cleaned
        out.residue = bool(self.originals.in_text(text))
        return out

    def worth_cleaning(self, values: list[bytes]) -> list[bool]:
        """Which of `values` may need cleaning, by one search over all plain ones (most files'
        vendor values name nobody); compressed GE blocks and CSA2 headers are always looked at."""
        # GE gzip blocks and Siemens CSA2 headers are always looked at (gzip header, stale bytes)
        packed = [len(v) >= 8 and (v[4:6] == GZIP_MAGIC or v[:4] == CSA2_MAGIC) for v in values]
        plain = self._may_hold(
            b"\x00".join(v for v, p in zip(values, packed, strict=True) if not p)
        )
        return [p or plain for p in packed]

    def _may_hold(self, data: bytes) -> bool:
        """Whether `data` may hold anything to clean (a UID, a date form, an ASCCONV date field, a
        value); False means it holds nothing verification would find either."""
        uids = self.secret is not None and b"." in data
        if uids and (_UID_CORE.search(data) or any(uid in data for uid in self._uid_bytes)):
            return True
        if self.new_date is not None:
            if any(form in data for form in self._date_bytes):
                return True
            if any(key in data for key in _ASCCONV_NAMES):
                return True
        if self._lowered:
            lowered = data.decode("latin-1").lower()
            return any(value in lowered for value in self._lowered)
        return False

    def _values(self, text: str, inside: Callable[[int, int], bool]) -> str:
        """Identifying values overwritten with X where they stand as whole words (a plain search
        per value: a regex alternation over a 100 KB protocol text costs milliseconds)."""
        lowered = text.lower()  # length-preserving on latin-1 text, unlike casefold
        edits: list[tuple[int, int, str]] = []
        for value in self._lowered:
            pos = lowered.find(value)
            while pos >= 0:
                end = pos + len(value)
                alone = (pos == 0 or lowered[pos - 1] not in _ALNUM) and (
                    end == len(lowered) or lowered[end] not in _ALNUM
                )
                if alone and inside(pos, end):
                    edits.append((pos, end, "X" * len(value)))
                pos = lowered.find(value, pos + 1)
        return _apply(text, edits) if edits else text

    def _uids(self, buf: bytes, inside: Callable[[int, int], bool], out: CleanedValue) -> bytes:
        """Every non-standard UID-shaped run of >= 12 characters, and every run that is an original
        UID of the file, replaced by a same-length UID."""
        assert self.secret is not None
        runs: dict[int, int] = {}  # start -> end of maximal [0-9.] runs worth a look
        for match in _UID_CORE.finditer(buf):
            start, end = _run_around(buf, match.start(), match.end(), _DIGITS_DOT)
            runs[start] = end
        for uid in self.originals.uids:
            needle = uid.encode()
            pos = buf.find(needle)
            while pos >= 0:
                start, end = _run_around(buf, pos, pos + len(needle), _DIGITS_DOT)
                runs[start] = end
                pos = buf.find(needle, pos + 1)
        edits: list[tuple[int, int, bytes]] = []
        for start, end in runs.items():
            run = buf[start:end]
            uid = run.decode("ascii")
            if not inside(start, end) or is_well_known(uid):
                continue
            if uid in self.originals.uids or (len(run) >= 12 and UID_PATTERN.fullmatch(run)):
                out.uids.append(uid)
                edits.append((start, end, same_length_uid(self.secret, run)))
        return _apply(buf, edits) if edits else buf

    def _dates(self, text: str, inside: Callable[[int, int], bool], out: CleanedValue) -> str:
        """Original dates in any of their written forms (a DT's date part too) replaced by
        `new_date`; ASCCONV date fields holding another valid date are original dates as well."""
        assert self.new_date is not None
        for key in ASCCONV_DATE_KEYS:
            name = key.rsplit(".", 1)[-1]
            pos = text.find(name)
            while pos >= 0:
                match = _KEYED_VALUE.match(text, pos + len(name))
                if match and is_valid_date(match.group(1)) and match.group(1) not in self.dates:
                    self.dates.update(_date_forms(match.group(1)))
                    self._date_bytes = [form.encode() for form in self.dates]
                pos = text.find(name, pos + 1)
        edits: list[tuple[int, int, str]] = []
        for form, original in self.dates.items():
            pos = text.find(form)
            while pos >= 0:
                end = pos + len(form)
                if form.isdigit():  # 8 digits alone or opening a DT, never inside a longer number
                    run_end = _run_around(text, pos, end, _DIGITS)[1]
                    if run_end - pos >= 12:
                        end = pos + 8
                    elif run_end != end:
                        end = -1
                elif end < len(text) and text[end] in _DIGITS:
                    end = -1
                if (
                    end > 0
                    and (pos == 0 or text[pos - 1] not in ".0123456789")
                    and inside(pos, end)
                ):
                    out.dates.append(original)
                    edits.append((pos, end, _rewrite_date(text[pos:end], self.new_date(original))))
                pos = text.find(form, pos + 1)
        return _apply(text, edits) if edits else text


def _run_around(data: Any, start: int, end: int, chars: Any) -> tuple[int, int]:
    """The maximal run of `chars` around data[start:end] (bytes or str)."""
    while start > 0 and data[start - 1] in chars:
        start -= 1
    while end < len(data) and data[end] in chars:
        end += 1
    return start, end


def _apply(data: Any, edits: list[tuple[int, int, Any]]) -> Any:
    """`data` with same-length replacements at (start, end) (overlaps: the first one wins)."""
    parts = []
    last = 0
    for start, end, new in sorted(edits):
        if start < last:
            continue
        parts += [data[last:start], new]
        last = end
    parts.append(data[last:])
    return data[:0].join(parts)


def date_replacement(offset_days: int | None) -> Callable[[str], str]:
    """YYYYMMDD -> the subject's shifted date, or the dummy date when dates are not shifted (or
    the original is no calendar date, such as 00000000)."""

    def replace(original: str) -> str:
        if offset_days is None or not is_valid_date(original):
            return DUMMY_DATE
        return shift_da(original, offset_days)

    return replace
