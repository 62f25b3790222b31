"""Verification: read the output back and look everywhere for what the input identified.

Every element at every depth is searched, private ones and file meta included, and so is the
object key. Any hit is a `Finding`; a file with findings must not be released.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement

from services.anonymizer.profile.identifiers import IdentifierSet, Matcher
from services.anonymizer.profile.vendor_headers import unpack_gzip_block

SKIP_BULK = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # pixel data: not text
CODED_VRS = frozenset({"CS", "AS"})
NUMERIC_VRS = frozenset(
    {"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "OF", "OD", "OL", "OV", "AT"}
)


@dataclass(frozen=True)
class Finding:
    """An original identifier found in the output: where (`location`), what kind, and the tag."""

    location: str
    kind: str  # value | uid | date
    detail: str  # the attribute keyword or tag; never the value itself


def _text_of(elem: DataElement) -> str | None:
    value = elem.value
    if value is None:
        return None
    if isinstance(value, bytes):
        inner = unpack_gzip_block(value)  # GE protocol block: search what it compresses
        return value.decode("latin-1") + ("\n" + inner.decode("latin-1") if inner else "")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _search(ds: Dataset, matcher: Matcher, where: str, out: list[Finding]) -> None:
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset converts every element)
        if tag in SKIP_BULK:
            continue
        raw = ds.get_item(tag)
        if getattr(raw, "VR", None) in NUMERIC_VRS:
            continue  # binary numbers: no text to leak, no need to convert them
        if getattr(raw, "VR", None) in CODED_VRS:
            continue  # defined terms (ContentQualification RESEARCH): not free text
        elem = ds[tag]
        label = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or []):
                _search(item, matcher, f"{where}{label}[{i}].", out)
            continue
        text = _text_of(elem)
        if not text:
            continue
        if elem.VR == "UI" and label.endswith("ClassUID"):
            continue  # kinds of objects (also vendor-private classes), kept by design
        if elem.VR == "UI" and text.strip().rstrip("\x00") in matcher.uids:
            out.append(Finding(f"{where}{label}", "uid", label))
            continue
        for kind, _ in matcher.in_text(text):
            out.append(Finding(f"{where}{label}", kind, label))


def verify(
    output: bytes | Dataset, originals: IdentifierSet, object_key: str | None = None
) -> list[Finding]:
    """Findings of any original identifying value, UID or date in `output` (file bytes or dataset,
    re-read from bytes so what is checked is what was written) and in `object_key`."""
    ds = dcmread(io.BytesIO(output), force=True) if isinstance(output, bytes) else output
    matcher = originals.matcher()
    findings: list[Finding] = []
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        _search(meta, matcher, "meta:", findings)
    _search(ds, matcher, "", findings)
    if object_key:
        findings.extend(
            Finding("object key", kind, "key") for kind, _ in matcher.in_text(object_key)
        )
    return findings
