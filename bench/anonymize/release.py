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
  creator), is listed apart as a coincidence (a vendor imaging at its own site); every other hit
  is a leak. A GE gzip protocol block is searched as stored (compressed), which this scan cannot
  read: the verification does.

    .venv/bin/python -m bench.anonymize.release FOLDER [--keep]
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

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


class Terms:
    """What the sources identified: values, UIDs, dates (each a set of bytes)."""

    def __init__(self) -> None:
        self.values: set[bytes] = set()
        self.uids: set[bytes] = set()
        self.dates: set[bytes] = set()
        self.source_text: dict[str, set[bytes]] = {}  # device/technique keyword -> source values

    def add(self, path: Path) -> bool:
        try:
            ds = pydicom.dcmread(path, force=True)
            elems = list(ds.iterall()) + list(getattr(ds, "file_meta", pydicom.Dataset()))
        except Exception:
            return False
        for elem in elems:
            self._element(elem)
        return True

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


BOUNDS = {
    "value": (rb"(?<![A-Za-z0-9])", rb"(?![A-Za-z0-9])"),
    "uid": (rb"(?<![0-9.])", rb"(?![0-9.])"),
    "date": (rb"(?<![0-9])", rb"(?![0-9])"),
}
PIXEL_DATA = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian: no text after it


def _pattern(kind: str, terms: list[bytes]) -> re.Pattern[bytes]:
    left, right = BOUNDS[kind]
    alternation = b"|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
    return re.compile(left + b"(" + alternation + b")" + right, re.IGNORECASE)


def scan(data: bytes, key: str, terms: Terms) -> list[tuple[str, str]]:
    """(kind, where) of every hit in an output object (its header: pixel data holds no text) and
    its object key. Plain substring tests pick the candidate terms; patterns settle boundaries."""
    cut = data.rfind(PIXEL_DATA)
    head = data[:cut] if cut > 0 else data
    folded = head.lower() + b"\n" + key.lower().encode()
    candidates = {
        "value": [t for t in terms.values if t.lower() in folded],
        "uid": [t for t in terms.uids if t in folded],
        "date": [t for t in terms.dates if t in folded],
    }
    pats = [(kind, _pattern(kind, found)) for kind, found in candidates.items() if found]
    hits: list[tuple[str, str]] = [(k, "object key") for k, p in pats if p.search(key.encode())]
    if not pats or not any(p.search(head) for _, p in pats):
        return hits
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    elems = list(ds.iterall()) + list(getattr(ds, "file_meta", pydicom.Dataset()))
    for elem in elems:
        if elem.VR == "SQ" or elem.tag == 0x7FE00010:
            continue
        value = elem.value
        raw = value if isinstance(value, bytes) else str(value).encode("latin-1", "replace")
        private_creator = elem.tag.is_private and elem.tag.element <= 0xFF
        keyword = elem.keyword or ("private creator" if private_creator else str(elem.tag))
        for kind, pat in pats:
            if not pat.search(raw):
                continue
            same = raw.strip() in terms.source_text.get(keyword, set())
            device = keyword in DEVICE_TEXT or private_creator
            hits.append(("coincidence" if kind == "value" and same and device else kind, keyword))
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("--keep", action="store_true", help="leave the stack's state folder")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # pydicom's complaints about odd source files
    folder = args.folder.resolve()
    work = Path(tempfile.mkdtemp(prefix="cohortflow-release-"))
    work.chmod(0o755)
    (work / "source").mkdir()
    (work / "source" / "data").symlink_to(folder, target_is_directory=True)
    stack = LocalStack(work / "state", data_roots=[work])
    try:
        info = stack.up(services=["gateway", "anonymizer"])
        os.environ.update(info.env())
        get_settings.cache_clear()
        settings = get_settings()
        with httpx.Client(base_url=info.gateway_url, timeout=60.0) as api:
            cohort = api.post(
                "/api/cohorts",
                json={
                    "name": f"release-{int(time.time())}",
                    "source_path": str(work / "source"),
                    "anonymization_enabled": True,
                },
            )
            cohort.raise_for_status()
            cohort_id = cohort.json()["id"]
            start = time.perf_counter()
            job = api.post(
                f"/api/cohorts/{cohort_id}/stages/anonymization/run", json={"config": CONFIG}
            ).json()
            while job["status"] not in ("completed", "failed", "cancelled"):
                time.sleep(0.5)
                job = api.get(f"/api/jobs/{job['id']}").json()
            seconds = time.perf_counter() - start
        print(f"anonymization {job['status']} in {seconds:.0f} s; scanning", file=sys.stderr)
        store = ObjectStore(settings)
        objects = list(store.list(f"anon/{cohort_id}/"))
        terms = Terms()
        sources = [p for p in sorted(folder.rglob("*")) if p.is_file()]
        readable = sum(terms.add(p) for p in sources)
        found: Counter[tuple[str, str]] = Counter()
        for obj in objects:
            for hit in scan(store.get_bytes(obj.key), obj.key, terms):
                found[hit] += 1
    finally:
        if not args.keep:
            stack.down()
            shutil.rmtree(work, ignore_errors=True)
    summary = job.get("summary") or {}
    files_in = int(summary.get("files_listed", len(sources)))
    rejected = int(summary.get("rejected", 0))
    quarantined = int(summary.get("quarantined", 0))
    released = len(objects)
    eligible = max(files_in - rejected - quarantined, 1)
    print(
        f"folder {folder}: {len(sources)} files ({readable} readable by pydicom), run {seconds:.0f} s, job {job['status']}"
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
    leaks = {k: v for k, v in found.items() if k[0] != "coincidence"}
    print(
        f"  independent scan: {len(terms.values)} values, {len(terms.uids)} UIDs, {len(terms.dates)} dates searched in {released} objects"
    )
    print(f"  leaks: {sum(leaks.values())}" + ("" if leaks else " (none)"))
    for (kind, where), n in sorted(leaks.items(), key=lambda kv: -kv[1]):
        print(f"    {n:5d} {kind} in {where}")
    for (kind, where), n in sorted(found.items()):
        if kind == "coincidence":
            print(f"  coincidence (kept device text equal to the source's) {n:5d} in {where}")
    sys.exit(1 if leaks else 0)


if __name__ == "__main__":
    main()
