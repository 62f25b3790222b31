"""How much of a folder de-identification releases, and whether anything identifying got out.

Starts a private local stack (Postgres, broker, S3, gateway, anonymizer), runs the anonymization
stage on FOLDER through the HTTP API (strategy `hash`, dates shifted, encrypted Excel audit: what
a new user configures), then prints

- files in, rejected (no DICOM object of a study), quarantined (burned-in risk), released, left
  behind, and the release rate of the de-identifiable files (released / (in - rejected -
  quarantined));
- what was refused, by reason (the job's grouped summary);
- leaks found by an independent scan of every released object: it shares no code with the
  anonymizer's verification. From each source file (pydicom, every element at every depth) it
  takes the identifying values (names and their parts, IDs, institution, station, device serial,
  accession; >= 4 characters, placeholders skipped), every UID that is not a standard one, every
  date (DA values and the date of DT values); then it searches the raw bytes of every released
  object and its object key, whole-token and case-insensitive. A hit in an element that the
  output holds byte for byte as the source did, and that is a device or technique attribute
  (Manufacturer, ManufacturerModelName, SoftwareVersions, SequenceName, coding scheme, a private
  creator), is listed apart as a coincidence (a vendor imaging at its own site), and so is an
  identifying number under five digits (StudyID 160 in a window width); every other hit is a
  leak. A GE gzip protocol block is searched as stored (its gzip header too) and decompressed.

    .venv/bin/python -m bench.anonymize.release FOLDER [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pydicom.dataelem import DataElement
from pydicom.uid import UID_dictionary

from cohortflow.stack import LocalStack
from shared.settings import get_settings
from shared.storage import ObjectStore

PASSWORD = "release-bench-password"
CONFIG = {
    "patient_id": {"strategy": "hash"},
    "study_dates": {"enabled": True},
    "audit_export": {"format": "encrypted_excel", "password": PASSWORD},
}
IDENTIFYING = {
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "ReferringPhysicianName",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName",
    "PhysiciansOfRecord", "RequestingPhysician", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber", "AccessionNumber",
    "StudyID", "RequestedProcedureID", "PerformedProcedureStepID", "ScheduledPerformingPhysicianName",
}  # fmt: skip
DEVICE_TEXT = {
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "SequenceName",
    "PulseSequenceName", "ReceiveCoilName", "TransmitCoilName", "CodingSchemeDesignator",
    "CodeValue", "CodeMeaning", "ImplementationVersionName",
}  # fmt: skip
PLACEHOLDERS = {"ANONYMOUS", "ANONYMIZED", "UNKNOWN", "REMOVED", "NONE", "NULL", "N/A"}
PIXEL_DATA = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian: no text after it
BOUNDS = {
    "value": (rb"(?<![A-Za-z0-9])", rb"(?![A-Za-z0-9])"),
    # numbers (an ID like 1693354) and UIDs are not matched inside longer numbers or decimals
    "number": (rb"(?<![0-9.])", rb"(?![0-9.])"),
    "uid": (rb"(?<![0-9.])", rb"(?![0-9.])"),
    "date": (rb"(?<![0-9])", rb"(?![0-9])"),
}
CODED = {"CS", "AS"}  # defined terms (ContentQualification RESEARCH) and ages: no free text


KEPT_AS_IS = ("SOPClassUID", "Modality", "SeriesNumber", "InstanceNumber", "ContentTime",
              "AcquisitionTime", "SeriesTime", "Rows", "Columns")  # fmt: skip


def pixel_key(data: bytes) -> str | None:
    """What ties an output to its source: de-identification leaves the pixel data byte for byte;
    an object without pixels is known by attributes it keeps as they were (times are not shifted)."""
    cut = data.rfind(PIXEL_DATA)
    if cut > 0:
        return hashlib.sha256(data[cut:]).hexdigest()
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    except Exception:
        return None
    return "kept:" + "|".join(str(ds.get(k, "")) for k in KEPT_AS_IS)


class Terms:
    """What a source file identified: values, UIDs, dates (each a set of bytes)."""

    def __init__(self) -> None:
        self.values: set[bytes] = set()
        self.uids: set[bytes] = set()
        self.dates: set[bytes] = set()
        self.source_text: dict[str, set[bytes]] = {}  # device/technique keyword -> source values

    def merge(self, other: Terms) -> None:
        self.values |= other.values
        self.uids |= other.uids
        self.dates |= other.dates
        for keyword, texts in other.source_text.items():
            self.source_text.setdefault(keyword, set()).update(texts)

    @classmethod
    def of(cls, path: Path) -> tuple[Terms, str | None] | None:
        """The terms of a source file and its pixel key; None when pydicom cannot read it."""
        try:
            data = path.read_bytes()
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            elems = list(ds.iterall()) + list(getattr(ds, "file_meta", pydicom.Dataset()))
        except Exception:
            return None
        terms = cls()
        for elem in elems:
            terms._element(elem)
        # kinds and software, not studies: a (private) SOP class or an implementation's UID
        # recurs in every file of its kind, wherever else a file repeats it
        terms.uids -= {
            str(e.value).strip().encode()
            for e in elems
            if e.VR == "UI" and (e.keyword or "").endswith("ClassUID") and isinstance(e.value, str)
        }
        return terms, pixel_key(data)

    def _element(self, elem: DataElement) -> None:
        if elem.value in (None, "", b""):
            return
        items = list(elem.value) if elem.VM > 1 and elem.VR != "SQ" else [elem.value]
        keyword = elem.keyword or ""
        if elem.VR == "UI" and not keyword.endswith("ClassUID") and keyword != "TransferSyntaxUID":
            self.uids.update(
                str(v).strip().encode()
                for v in items
                if str(v).strip() not in UID_dictionary
                and re.fullmatch(r"\d+(\.\d+){2,}", str(v).strip())
            )
        elif elem.VR in ("DA", "DT"):
            self.dates.update(str(v)[:8].encode() for v in items if str(v)[:8].isdigit())
        elif keyword in IDENTIFYING:
            for item in items:
                text = str(item)
                parts = re.split(r"[\^=]", text) if elem.VR == "PN" else []
                for part in [text.replace("^", " "), *parts]:
                    part = " ".join(part.split())
                    if len(part) >= 4 and part.upper() not in PLACEHOLDERS and part.strip("*-."):
                        self.values.add(part.encode("latin-1", "replace"))
        elif keyword in DEVICE_TEXT or (elem.tag.is_private and elem.tag.element <= 0xFF):
            self.source_text.setdefault(keyword or "private creator", set()).add(
                str(elem.value).strip().encode("latin-1", "replace")
            )


def _pattern(kind: str, terms: list[bytes]) -> re.Pattern[bytes]:
    left, right = BOUNDS[kind]
    alternation = b"|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
    return re.compile(left + b"(" + alternation + b")" + right, re.IGNORECASE)


def _gzip_texts(head: bytes) -> bytes:
    """The decompressed text of every GE gzip protocol block in a header (for the quick test)."""
    out = []
    for match in re.finditer(rb"\x1f\x8b\x08", head):
        with contextlib.suppress(Exception):
            out.append(zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head[match.start() :]))
    return b"\n" + b"\n".join(out)


def scan(data: bytes, key: str, terms: Terms) -> list[tuple[str, str]]:
    """(kind, where) of every hit in an output object (its header: pixel data holds no text) and
    its object key. Plain substring tests pick the candidate terms; patterns settle boundaries."""
    cut = data.rfind(PIXEL_DATA)
    head = data[:cut] if cut > 0 else data
    folded = head.lower() + b"\n" + key.lower().encode() + _gzip_texts(head).lower()
    values = [t for t in terms.values if t.lower() in folded]
    candidates = {
        "value": [t for t in values if not t.replace(b".", b"").isdigit()],
        "number": [t for t in values if t.replace(b".", b"").isdigit()],
        "uid": [t for t in terms.uids if t in folded],
        "date": [t for t in terms.dates if t in folded],
    }
    pats = [(kind, _pattern(kind, found)) for kind, found in candidates.items() if found]
    hits: list[tuple[str, str]] = [(k, "object key") for k, p in pats if p.search(key.encode())]
    if not pats or not any(p.search(head + _gzip_texts(head)) for _, p in pats):
        return hits
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    elems = list(ds.iterall()) + list(getattr(ds, "file_meta", pydicom.Dataset()))
    for elem in elems:
        if elem.VR == "SQ" or elem.VR in CODED or elem.tag == 0x7FE00010:
            continue
        value = elem.value
        raw = value if isinstance(value, bytes) else str(value).encode("latin-1", "replace")
        if raw[4:6] == b"\x1f\x8b":  # a GE protocol block: 4-byte length, then gzip
            with contextlib.suppress(Exception):
                raw += b"\n" + gzip.decompress(raw[4 : 4 + int.from_bytes(raw[:4], "little")])
        private_creator = elem.tag.is_private and elem.tag.element <= 0xFF
        keyword = elem.keyword or ("private creator" if private_creator else str(elem.tag))
        for kind, pat in pats:
            if not pat.search(raw):
                continue
            if kind == "number":  # a number under 5 digits (StudyID 160) is too generic
                short = all(len(m) < 5 for m in pat.findall(raw))
                kind = "short number" if short else "value"
            same = raw.strip() in terms.source_text.get(keyword, set())
            device = keyword in DEVICE_TEXT or private_creator
            hits.append(("coincidence" if kind == "value" and same and device else kind, keyword))
    return hits


def run_stage(folder: Path, work: Path) -> tuple[LocalStack, str, dict[str, Any], float]:
    """Start a private stack over `folder` and run the anonymization stage on it."""
    (work / "source").mkdir()
    (work / "source" / "data").symlink_to(folder, target_is_directory=True)
    # the data the link points at is a root too: links out of the roots are refused
    stack = LocalStack(work / "state", data_roots=[work, folder])
    info = stack.up(services=["gateway", "anonymizer"])
    os.environ.update(info.env())
    get_settings.cache_clear()
    with httpx.Client(base_url=info.gateway_url, timeout=60.0) as api:
        body = {
            "name": f"release-{int(time.time())}",
            "source_path": str(work / "source"),
            "anonymization_enabled": True,
        }
        cohort = api.post("/api/cohorts", json=body)
        cohort.raise_for_status()
        cohort_id = cohort.json()["id"]
        start = time.perf_counter()
        run = f"/api/cohorts/{cohort_id}/stages/anonymization/run"
        job = api.post(run, json={"config": CONFIG}).json()
        while job["status"] not in ("completed", "failed", "cancelled"):
            time.sleep(0.5)
            job = api.get(f"/api/jobs/{job['id']}").json()
    return stack, cohort_id, job, time.perf_counter() - start


def scan_zone(
    folder: Path, store: ObjectStore, cohort_id: str
) -> tuple[Counter[tuple[str, str]], dict[str, int]]:
    """Hits by (kind, where) in the cohort's de-identified zone, and what was searched."""
    everything = Terms()  # for an output whose pixels do not name its source
    by_pixels: dict[str, Terms] = {}
    sources = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    readable = 0
    for path in sources:
        read = Terms.of(path)
        if read is None:
            continue
        readable += 1
        everything.merge(read[0])
        if read[1] is not None:
            by_pixels.setdefault(read[1], Terms()).merge(read[0])
    found: Counter[tuple[str, str]] = Counter()
    objects = list(store.list(f"anon/{cohort_id}/"))
    unmatched = 0
    for obj in objects:
        data = store.get_bytes(obj.key)
        own = by_pixels.get(pixel_key(data) or "")
        unmatched += own is None
        for hit in scan(data, obj.key, own or everything):
            found[hit] += 1
    numbers = {
        "sources": len(sources),
        "readable": readable,
        "objects": len(objects),
        "unmatched": unmatched,
        "values": len(everything.values),
        "uids": len(everything.uids),
        "dates": len(everything.dates),
    }
    return found, numbers


def report(
    job: dict[str, Any], seconds: float, found: Counter[tuple[str, str]], n: dict[str, int]
) -> int:
    summary = job.get("summary") or {}
    files_in = int(summary.get("files_listed", n["sources"]))
    rejected = int(summary.get("rejected", 0))
    quarantined = int(summary.get("quarantined", 0))
    released = n["objects"]
    eligible = max(files_in - rejected - quarantined, 1)
    print(
        f"{n['sources']} files ({n['readable']} readable by pydicom), run {seconds:.0f} s, job {job['status']}"
    )
    print(
        f"  files in {files_in}, rejected {rejected}, quarantined {quarantined}, released {released}, left behind {summary.get('left_behind', 0)}"
    )
    print(
        f"  released {released} of {eligible} de-identifiable files: {100 * released / eligible:.1f}%"
    )
    if job.get("status_reason"):
        print(f"  status reason: {job['status_reason']}")
    for group in summary.get("refused") or []:
        print(
            f"  refused {group['files']:5d} files in {group['studies']:3d} studies: {group['reason']}"
        )
    print(
        f"  independent scan: {n['values']} values, {n['uids']} UIDs, {n['dates']} dates from the"
        f" sources, searched in {released} objects ({released - n['unmatched']} against their own"
        f" source's terms, found by pixel data or kept attributes; {n['unmatched']} against all)"
    )
    leaks = {k: v for k, v in found.items() if k[0] not in ("coincidence", "short number")}
    print(f"  leaks: {sum(leaks.values())}" + ("" if leaks else " (none)"))
    for (kind, where), count in sorted(leaks.items(), key=lambda kv: -kv[1]):
        print(f"    {count:5d} {kind} in {where}")
    for (kind, where), count in sorted(found.items()):
        if kind == "coincidence":
            print(f"  coincidence (kept device text equal to its source's): {count:5d} in {where}")
        elif kind == "short number":
            print(f"  identifying number under 5 digits (too generic): {count:5d} in {where}")
    return 1 if leaks else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("--keep", action="store_true", help="leave the private stack running")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # pydicom's complaints about odd source files
    folder = args.folder.resolve()
    work = Path(tempfile.mkdtemp(prefix="cohortflow-release-"))
    work.chmod(0o755)
    stack = None
    try:
        stack, cohort_id, job, seconds = run_stage(folder, work)
        print(f"anonymization {job['status']} in {seconds:.0f} s; scanning", file=sys.stderr)
        found, numbers = scan_zone(folder, ObjectStore(get_settings()), cohort_id)
    finally:
        if stack is not None and not args.keep:
            stack.down()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"folder {folder}:")
    sys.exit(report(job, seconds, found, numbers))


if __name__ == "__main__":
    main()
