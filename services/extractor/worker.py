"""The per-file work of extraction, run in worker processes: read, hash, ingest, parse.

A batch of files goes to one worker process; inside it a few threads read (and, for a cohort
source that is copied, write into the raw zone) while the process parses, so reading and parsing overlap and the
parent process only writes the catalog. Content decides what a file is, never its name.
"""

from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from services.extractor.catalog import InstanceRecord, Rejection, parse_instance, sniff
from services.extractor.catalog.records import as_dict
from services.extractor.catalog.sniff import SNIFF_BYTES
from services.extractor.repository import DETAIL_KINDS, detail_values
from shared.db import json_bytes
from shared.settings import get_settings
from shared.sources import ObjectSource, Source, in_place_locator, open_source
from shared.storage import process_store, sha256_file, sha256_hex
from shared.subjects import catalog_subject_id


@dataclass
class FileBatch:
    """Files of one work item, for one worker process."""

    location: str  # the cohort source (local folder or s3://) or `zone:<prefix>` of our bucket
    # copy each file of a cohort source to `<ingest_prefix>/<key>` (the raw zone), or catalogue it
    # in place (`shared.sources.in_place_locator`: a local folder, ADR 0035)
    ingest_prefix: str | None
    files: list[tuple[str, int, int]]  # (key, size, mtime_ns)
    read_threads: int = 4
    within: str | None = None  # the cohort's source, when `location` is a new study's folder


class CatalogRows(NamedTuple):
    """A catalogued file's share of the catalog's rows, each without its `cohort_id` (and the
    instance's columns from `catalog.instance`'s `sop_class_uid` to `transfer_syntax_uid`). Each
    row starts with its natural key: `study[0]` is the study's UID, `series[0]` the series'."""

    sop_instance_uid: str | None
    subject: tuple[Any, ...]  # catalog.subject
    study: tuple[Any, ...]  # catalog.study
    series: tuple[Any, ...]  # catalog.series
    instance: tuple[Any, ...]  # catalog.instance, sop_class_uid .. transfer_syntax_uid
    details: tuple[tuple[str, tuple[Any, ...]], ...]  # (kind, catalog.<kind>_detail after the UID)


def catalog_rows(rec: InstanceRecord) -> CatalogRows:
    """The rows `rec` contributes to the catalog (`services.extractor.plugin` adds the cohort)."""
    study_uid = rec.study.study_instance_uid or ""
    subject_id = catalog_subject_id(rec.subject.patient_id, study_uid)
    series_uid = rec.series.series_instance_uid or ""
    return CatalogRows(
        rec.sop_instance_uid,
        (subject_id, rec.subject.patient_sex, rec.subject.patient_age, as_dict(rec.subject)),
        (
            study_uid,
            subject_id,
            rec.study.study_date,
            rec.study.study_time,
            rec.study.accession_number,
            rec.study.study_description,
            as_dict(rec.study),
        ),
        (
            series_uid,
            study_uid,
            subject_id,
            rec.series.modality,
            rec.series.series_number,
            rec.series.series_description,
            rec.series.protocol_name,
            rec.series.manufacturer,
            rec.series.manufacturer_model,
            as_dict(rec.series),
        ),
        (
            rec.sop_class_uid or "",
            rec.instance_number,
            rec.number_of_frames or 1,
            rec.transfer_syntax_uid,
        ),
        tuple(
            (kind, detail_values(kind, detail))
            for kind in DETAIL_KINDS
            if (detail := getattr(rec, kind)) is not None
        ),
    )


@dataclass
class FileOutcome:
    key: str
    size: int
    mtime_ns: int
    sha256: str | None = None
    object_key: str | None = None
    # the catalog's rows of the file when catalogued: they travel back from the worker process
    # as plain values, the record and its header already serialized (JSON text and tuples are
    # far cheaper to pickle than the record's nested dataclasses or dicts)
    rows: CatalogRows | None = None
    # JSON text for the instance's text columns: a plain `str` (a `JsonText`, a str subclass,
    # is copied again by pickle on each side)
    row_json: str | None = None  # InstanceRecord.to_row() without the header
    header_json: str | None = None  # the header as DICOM JSON
    rejection: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __reduce__(self) -> tuple[type[FileOutcome], tuple[Any, ...]]:
        # pickled as its values in field order: one call to rebuild it, not a dict of state
        return FileOutcome, tuple(getattr(self, name) for name in _OUTCOME_FIELDS)


_OUTCOME_FIELDS = tuple(f.name for f in fields(FileOutcome))


def _one_copy(kept: dict[str, tuple[Any, ...]], row: tuple[Any, ...]) -> tuple[Any, ...]:
    """`row`, or the equal row kept for its key before: the files of a batch mostly share their
    subject, study and series rows, and pickle sends an object it has sent once as a reference
    (the outcomes' rows cost a quarter of their way back to the service before)."""
    first = kept.setdefault(row[0], row)
    return first if first == row else row


def open_location(location: str, folder_workers: int = 4, within: str | None = None) -> Source:
    """A cohort source (local folder or s3://), a new study's folder `within` it
    (`shared.sources.open_source`), or `zone:<prefix>` of our own bucket."""
    if location.startswith("zone:"):
        store = process_store()
        return ObjectSource(store, store.bucket, location[5:])
    return open_source(location, get_settings(), folder_workers, within=within)


def _zone_key(location: str, key: str) -> str | None:
    if location.startswith("zone:"):
        prefix = location[5:].strip("/")
        return f"{prefix}/{key}" if prefix else key
    return None


# files above this size are never held whole in memory: hashed and uploaded as a stream from disk
# (a remote object is first downloaded to a scratch file), parsed from their header prefix
LARGE_FILE_BYTES = 32 * 1024 * 1024

Content = bytes | Path  # what the parser gets: the bytes, or the path of a large file


def _head(content: Content) -> bytes:
    if isinstance(content, Path):
        with content.open("rb") as fh:
            return fh.read(SNIFF_BYTES)
    return content[:SNIFF_BYTES]


def _fetch(
    source: Source, batch: FileBatch, key: str, size: int, scratch: Path
) -> tuple[Content | None, str | None, str | None, str | None]:
    """(content, sha256, object key, error) for one file, ingesting it when asked."""
    try:
        if size > LARGE_FILE_BYTES:
            path = source.as_file(key, Path(tempfile.mkdtemp(dir=scratch)))
            content: Content = path
            digest = sha256_file(path)
        else:
            content = source.read(key)
            digest = sha256_hex(content)
    except OSError as exc:
        return None, None, None, f"unreadable: {exc.strerror or exc}"
    except Exception as exc:
        return None, None, None, f"unreadable: {exc}"
    object_key = _zone_key(batch.location, key)
    if object_key is None:
        # a file of the cohort's source: only content that sniffs as DICOM is catalogued (and
        # copied into the raw zone): anything else is rejected here, with the sniffer's reason,
        # and never reaches object storage
        verdict = sniff(_head(content))
        if not verdict.is_dicom:
            return None, digest, None, verdict.reason
        if batch.ingest_prefix is None:
            return content, digest, in_place_locator(key), None
        object_key = f"{batch.ingest_prefix}/{key}"
        # no existence check first: planning already left out every file catalogued before, so
        # what reaches here is new or changed (or a crashed item's, where overwriting is right)
        if isinstance(content, Path):
            process_store().put_file(object_key, content, sha256=digest)
        else:
            process_store().put_bytes(object_key, content, sha256=digest)
    return content, digest, object_key, None


def extract_batch(batch: FileBatch) -> list[FileOutcome]:
    """Read, hash, ingest and parse every file of the batch (in a worker process)."""
    source = open_location(batch.location, within=batch.within)
    outcomes: list[FileOutcome] = []
    kept: tuple[dict[str, tuple[Any, ...]], ...] = ({}, {}, {})  # subject, study, series rows
    with (
        tempfile.TemporaryDirectory(prefix="cohortflow-extract-") as scratch,
        ThreadPoolExecutor(max_workers=max(1, batch.read_threads)) as readers,
    ):
        fetched = readers.map(
            lambda f: _fetch(source, batch, f[0], f[1], Path(scratch)), batch.files
        )
        for (key, size, mtime), (content, digest, object_key, error) in zip(
            batch.files, fetched, strict=True
        ):
            outcome = FileOutcome(key, size, mtime, digest, object_key)
            if error is not None or content is None:
                outcome.rejection = error or "unreadable"
            else:
                parsed = parse_instance(content, key)
                if isinstance(content, Path) and content.is_relative_to(scratch):
                    shutil.rmtree(content.parent, ignore_errors=True)
                if isinstance(parsed, Rejection):
                    outcome.rejection = parsed.reason
                else:
                    row = parsed.to_row()
                    header = row.pop("header", None) or {}
                    outcome.row_json = json_bytes(row).decode()
                    outcome.header_json = json_bytes(header).decode()
                    rows = catalog_rows(parsed)
                    outcome.rows = rows._replace(
                        subject=_one_copy(kept[0], rows.subject),
                        study=_one_copy(kept[1], rows.study),
                        series=_one_copy(kept[2], rows.series),
                    )
            outcomes.append(outcome)
    return outcomes
