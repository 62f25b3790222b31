"""Extraction as a stage plugin: plan the files, catalogue each batch, build stacks at the end.

- plan: list the source (or the de-identified zone after anonymization), skip files already
  recorded with the same size and mtime (resume re-reads nothing catalogued), and cut the rest into
  items of files that share a folder (a study's files usually do), keyed by folder.
- process: worker processes read, hash, parse and, when asked, copy into the raw zone (a local
  folder is catalogued in place by default, ADR 0035); this process bulk-loads
  the rows with COPY into staging tables and upserts them, so a redelivered item writes nothing twice
  (one row per SOP Instance UID within the cohort).
- finalize: rebuild the stacks of every series that gained instances, one series at a time (memory
  stays flat), and report the cohort's counts.

In a streamed pipeline run after anonymization (ADR 0023) the de-identified zone is laid out one
prefix per study: each study is one item (keyed by its prefix, so the closing plan does not plan
it again), which builds its own stacks and hands the study on to sorting when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import asyncpg

from services.extractor import SCHEMA
from services.extractor import repository as repo
from services.extractor.catalog import InstanceRecord, StackBuilder
from services.extractor.worker import (
    CatalogRows,
    FileBatch,
    FileOutcome,
    extract_batch,
    open_location,
)
from shared.catalog import StackSummary
from shared.events import ItemError, StageRequested, WorkItem
from shared.observability import FILES_PROCESSED
from shared.settings import get_settings
from shared.sources import SourceFile, anon_prefix, raw_prefix, readable_in_place
from shared.stage import ItemContext, ItemResult, PlannedItem, RunInfo
from shared.stage_config import ExtractionConfig, JobConfigs
from shared.topics import Stage
from shared.workers import ProcessPools, calm_collector, cpu_workers

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# series whose stacks are rebuilt together at finalize (one series' rows in memory at a time)
_STACK_BATCH_SERIES = 200


def _batches(files: list[tuple[str, int, int]], size: int) -> list[list[tuple[str, int, int]]]:
    """Files grouped by folder, each folder cut into runs of at most `size` files, and runs of
    small folders packed together up to `size` (one item per folder of a few files would cost
    an item's round trips for each: one held-out folder has 93 folders for 2,571 files)."""
    by_folder: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    for f in files:
        by_folder[str(PurePosixPath(f[0]).parent)].append(f)
    out: list[list[tuple[str, int, int]]] = []
    packing: list[tuple[str, int, int]] = []
    for folder in sorted(by_folder):
        group = by_folder[folder]
        for run in (group[i : i + size] for i in range(0, len(group), size)):
            if len(packing) + len(run) > size:
                out.append(packing)
                packing = []
            packing.extend(run)
    if packing:
        out.append(packing)
    return out


def _summary_json(summary: StackSummary, cohort_id: uuid.UUID) -> dict[str, Any]:
    """A stack summary as the catalog stores it. The representative's header is already plain
    JSON (it was read from the catalog): it goes in as it is, not walked by the model's dump."""
    data = summary.model_dump(mode="json", exclude={"header"})
    data["cohort_id"] = str(cohort_id)
    data["header"] = summary.header
    return data


def _study_folder(key: str) -> str:
    """The study's prefix of a key in the de-identified zone (`<subject>/<study>/<series>/<sop>`)."""
    return str(PurePosixPath(key).parent.parent)


def _by_study(files: list[tuple[str, int, int]]) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """Files of the de-identified zone grouped by study prefix, in key order."""
    by_study: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    for f in files:
        by_study[_study_folder(f[0])].append(f)
    return sorted(by_study.items())


class ExtractorPlugin:
    stage = Stage.extraction
    service = "extractor"
    schema = SCHEMA
    # two items in hand per process: one is parsed by the pool while the other's rows are loaded
    # and its end recorded, so the worker processes never wait for the catalog (items share rows
    # of a study or series: the merges take their row locks in key order)
    item_workers = 2

    def cohort_prefixes(self, cohort_id: uuid.UUID) -> list[str]:
        """Removed with the cohort: its raw zone (the copies of the source, when made)."""
        return [raw_prefix(cohort_id)]

    def __init__(self) -> None:
        self._pools = ProcessPools(self.service, ["services.extractor.worker"])
        self._configs = JobConfigs(ExtractionConfig)

    def warm_up(self) -> int:
        """Start the default pool (the size a config without `process_pool_workers` uses), and
        calm this process' collector (`calm_collector`): the service is up and imported."""
        calm_collector()
        return self._pools.warm(cpu_workers())

    # --- plan -----------------------------------------------------------------------------------

    @staticmethod
    def _location(request: StageRequested) -> tuple[str, str | None]:
        """(where to read, raw-zone prefix to ingest into or None). A local folder is then read in
        place unless the job's config says `copy_sources` (`plan`)."""
        if request.input_prefix:  # de-identified zone written by the anonymizer
            return f"zone:{request.input_prefix}", None
        if request.cohort.anonymization_enabled:
            # never the identified source of an anonymized cohort, whatever the request says
            return f"zone:{anon_prefix(request.cohort.id)}", None
        location = request.location or request.cohort.source_path
        return location, raw_prefix(request.cohort.id)

    async def plan(
        self, pool: asyncpg.Pool, request: StageRequested, job_id: uuid.UUID
    ) -> list[PlannedItem]:
        location, ingest = self._location(request)
        config = self._configs.read(job_id, request.config, get_settings())
        # a new study's folder is keyed within the cohort's source (studies never share a key)
        within = request.cohort.source_path if ingest is not None and request.location else None
        entries, in_place = await asyncio.to_thread(
            self._listing, location, request.study_prefixes, config.folder_thread_workers, within
        )
        if in_place and not config.copy_sources:
            ingest = None  # catalogued where it lies (ADR 0035)
        listed = [f for f in entries if f.rejected is None]
        skipped = [f for f in entries if f.rejected is not None]
        if skipped:  # links out of the roots, FIFOs, loops, ...: recorded, never read
            await self._record_skipped(pool, request.cohort.id, job_id, skipped)
        async with pool.acquire() as conn:
            only = [f.key for f in listed] if request.study_prefixes else None
            seen = await repo.known_files(conn, request.cohort.id, only)
        todo = [
            (f.key, f.size, f.mtime_ns) for f in listed if seen.get(f.key) != (f.size, f.mtime_ns)
        ]
        items = []
        if request.streamed and location.startswith("zone:"):
            # one item per study, keyed by its prefix: the study's hand-over and the closing plan
            # of a streamed run name it alike. A study handed over under several prefixes (its
            # files went to two subjects) is one item, so sorting gets it whole.
            studies = request.study_prefixes
            groups = [(studies[0].strip("/"), todo)] if studies and todo else _by_study(todo)
            for study, files in groups:
                data = {"location": location, "ingest": None, "files": files, "study": study}
                items.append(PlannedItem(key=f"study:{study}"[:512], data=data))
        else:
            for i, files in enumerate(_batches(todo, config.batch_files)):
                folder = str(PurePosixPath(files[0][0]).parent)
                items.append(
                    PlannedItem(
                        key=f"{i:06d}:{folder}"[:512],
                        data={
                            "location": location,
                            "within": within,
                            "ingest": ingest,
                            "files": files,
                        },
                        partition_key=folder,
                    )
                )
        log.info(
            "extraction planned",
            extra={
                "files": len(listed),
                "skipped": len(skipped),
                "already_catalogued": len(listed) - len(todo),
                "items": len(items),
            },
        )
        return items

    @staticmethod
    def _listing(
        location: str, study_prefixes: list[str], folder_workers: int, within: str | None
    ) -> tuple[list[SourceFile], bool]:
        """The files to plan: the whole location, or only these studies' prefixes under a zone
        (keyed as in the whole zone's listing, so the catalog is the same either way); and
        whether the cohort's source folder can read them again at their keys."""
        if not study_prefixes or not location.startswith("zone:"):
            source = open_location(location, folder_workers, within)
            return list(source.list()), readable_in_place(source)
        found: list[SourceFile] = []
        for study in study_prefixes:
            part = open_location(f"{location.rstrip('/')}/{study.strip('/')}", folder_workers)
            found += [replace(f, key=f"{study.strip('/')}/{f.key}") for f in part.list()]
        return found, False

    @staticmethod
    async def _record_skipped(
        pool: asyncpg.Pool, cohort_id: uuid.UUID, job_id: uuid.UUID, skipped: list[SourceFile]
    ) -> None:
        """Entries the listing refused to read, recorded as rejected files with their reasons."""
        rejected = [(cohort_id, f.key, f.rejected, f.size, None, job_id) for f in skipped]
        sources = [
            (cohort_id, f.key, f.size, f.mtime_ns, None, "rejected", None, job_id) for f in skipped
        ]
        async with pool.acquire() as conn, conn.transaction():
            await repo.prepare_staging(conn)
            await repo.save_file_outcomes(conn, rejected, sources)
        FILES_PROCESSED.labels("extraction", "rejected").inc(len(skipped))

    # --- process ----------------------------------------------------------------------------------

    async def process(self, ctx: ItemContext, item: WorkItem) -> ItemResult:
        files = [tuple(f) for f in item.data["files"]]
        config = self._configs.read(ctx.job_id, item.config, ctx.settings)
        workers = config.process_pool_workers or cpu_workers()
        threads = config.scan_thread_workers
        # one chunk per worker, each loaded into the catalog as soon as it is parsed (measured:
        # two smaller chunks per worker overlap a little more but cost more round trips and CPU
        # than they save)
        parts = max(1, min(workers, len(files)))
        size = -(-len(files) // parts)
        chunks = [files[i : i + size] for i in range(0, len(files), size)]
        executor = await self._pools.ready(workers)
        loop = asyncio.get_running_loop()
        futures = [
            loop.run_in_executor(
                executor,
                extract_batch,
                FileBatch(
                    item.data["location"],
                    item.data["ingest"],
                    chunk,
                    threads,
                    item.data.get("within"),
                ),
            )
            for chunk in chunks
        ]
        started = time.perf_counter()
        total = ItemResult()
        studies: set[str] = set()
        series: set[str] = set()
        try:
            for future in asyncio.as_completed(futures):
                outcomes = await future
                await ctx.check_cancelled()
                for o in outcomes:
                    if o.rows is not None:
                        studies.add(o.rows.study[0])
                        series.add(o.rows.series[0])
                part = await self._load(ctx.pool, item.cohort.id, ctx.job_id, outcomes)
                for key, value in part.counts.items():
                    total.counts[key] = total.counts.get(key, 0) + value
                total.errors.extend(part.errors)
        finally:
            for future in futures:
                future.cancel()
        total.errors = total.errors[:50]
        if "study" in item.data:  # a study whole (streamed): its stacks now, then sorting
            await self._rebuild_stacks(ctx.pool, item.cohort.id, sorted(series))
            total.studies = sorted(studies)
        log.debug(
            "item extracted",
            extra={"files": len(files), "seconds": round(time.perf_counter() - started, 3)},
        )
        return total

    async def _load(
        self,
        pool: asyncpg.Pool,
        cohort_id: uuid.UUID,
        job_id: uuid.UUID,
        outcomes: list[FileOutcome],
    ) -> ItemResult:
        catalogued = [(o, o.rows) for o in outcomes if o.rows is not None]
        rejected = [o for o in outcomes if o.rows is None]
        subjects: dict[str, tuple[Any, ...]] = {}
        studies: dict[str, tuple[Any, ...]] = {}
        series: dict[str, tuple[Any, ...]] = {}
        instances: dict[str, tuple[Any, ...]] = {}
        details: dict[str, list[tuple[Any, ...]]] = {kind: [] for kind in repo.DETAIL_KINDS}
        duplicates: list[tuple[FileOutcome, CatalogRows]] = []
        # of a chunk's files holding one instance, the one whose key sorts first is catalogued
        # (as across items, `repo._insert_instances`): the others are its duplicates
        best: dict[str, tuple[FileOutcome, CatalogRows]] = {}
        for o, rows in catalogued:
            uid = rows.sop_instance_uid or ""
            held = best.get(uid)
            if held is None or o.key < held[0].key:
                if held is not None:
                    duplicates.append(held)
                best[uid] = (o, rows)
            else:
                duplicates.append((o, rows))
        for uid, (o, rows) in best.items():
            # a chunk's files mostly share one subject, study and series: their rows are kept once
            subject = (cohort_id, *rows.subject)
            kept = subjects.get(rows.subject[0])
            if kept is None or (
                subject != kept and repo.subject_order(subject) < repo.subject_order(kept)
            ):
                subjects[rows.subject[0]] = subject
            if rows.study[0] not in studies:
                studies[rows.study[0]] = (cohort_id, *rows.study)
            if rows.series[0] not in series:
                series[rows.series[0]] = (cohort_id, *rows.series)
            instances[uid] = (
                cohort_id,
                uid,
                rows.series[0],
                rows.study[0],
                *rows.instance,
                o.key,
                o.object_key,
                o.sha256,
                o.size,
                job_id,
                o.row_json,
                o.header_json,
            )
            for kind, values in rows.details:
                details[kind].append((cohort_id, uid, *values))

        async with pool.acquire() as conn, conn.transaction():
            await repo.prepare_staging(conn)
            inserted, owners = await repo.save_catalog_rows(
                conn,
                subjects=list(subjects.values()),
                studies=list(studies.values()),
                series=list(series.values()),
                instances=list(instances.values()),
                details=details,
            )
            # a SOP instance already catalogued from another file of the cohort: this file is a
            # duplicate (recorded as such); the same file again (a redelivered item) is not
            duplicate_ids = {id(o) for o, _ in duplicates}
            for o, rows in catalogued:
                uid = rows.sop_instance_uid or ""
                if id(o) not in duplicate_ids and owners.get(uid, o.key) != o.key:
                    duplicates.append((o, rows))
                    duplicate_ids.add(id(o))
            reasons = [(o, o.rejection or "") for o in rejected]
            reasons += [
                (o, repo.DUPLICATE_REASON.format(rows.sop_instance_uid)) for o, rows in duplicates
            ]
            rejected_rows = [
                (cohort_id, o.key, reason, o.size, o.sha256, job_id) for o, reason in reasons
            ]
            source_rows = [
                (
                    cohort_id,
                    o.key,
                    o.size,
                    o.mtime_ns,
                    o.sha256,
                    "catalogued"
                    if o.rows is not None and id(o) not in duplicate_ids
                    else "rejected",
                    o.rows.sop_instance_uid if o.rows is not None else None,
                    job_id,
                )
                for o in outcomes
            ]
            await repo.save_file_outcomes(conn, rejected_rows, source_rows)
        catalogued_files = len(catalogued) - len(duplicates)
        FILES_PROCESSED.labels("extraction", "catalogued").inc(catalogued_files)
        FILES_PROCESSED.labels("extraction", "rejected").inc(len(reasons))
        return ItemResult(
            counts={
                "files": len(outcomes),
                "catalogued_files": catalogued_files,
                "new_instances": inserted,
                "rejected_files": len(reasons),
            },
            errors=[ItemError(item=o.key, message=reason) for o, reason in reasons][:50],
        )

    # --- finalize ---------------------------------------------------------------------------------

    async def finalize(self, pool: asyncpg.Pool, run: RunInfo) -> tuple[dict[str, Any], str | None]:
        cohort_id = run.cohort.id
        async with pool.acquire() as conn:
            dirty = await repo.dirty_series(conn, cohort_id)
        for i in range(0, len(dirty), _STACK_BATCH_SERIES):
            await self._rebuild_stacks(pool, cohort_id, dirty[i : i + _STACK_BATCH_SERIES])
        async with pool.acquire() as conn:
            summary = await repo.cohort_counts(conn, cohort_id)
        # the gateway's cohort metrics: a session is a study
        summary["sessions"] = summary["studies"]
        return summary, None

    async def _rebuild_stacks(
        self, pool: asyncpg.Pool, cohort_id: uuid.UUID, series_uids: list[str]
    ) -> None:
        """Rebuild the stacks of a batch of series. Their rows stream in series order without their
        headers, one series in memory at a time however long it is; when a series ends, only its
        representatives' headers are fetched. The batch's stacks are then written in one
        transaction (a handful of statements per batch, not per series)."""
        stack_rows: list[tuple[Any, ...]] = []

        async def summarize(
            series_uid: str, builder: StackBuilder, conn: asyncpg.Connection
        ) -> None:
            wanted = list(set(builder.representatives().values()))
            headers = await repo.instance_headers(conn, cohort_id, wanted)
            stack_rows.extend(
                (
                    cohort_id,
                    series_uid,
                    s.stack_key,
                    s.n_instances,
                    s.n_frames,
                    _summary_json(s, cohort_id),
                    sorted(getattr(s, "sop_instance_uids", []) or []),
                )
                for s in builder.summaries(headers=headers)
            )

        async with pool.acquire() as conn, pool.acquire() as lookup, conn.transaction():
            current: str | None = None
            builder = StackBuilder()
            async for r in repo.series_records(conn, cohort_id, series_uids):
                if r["series_instance_uid"] != current:
                    if current is not None:
                        await summarize(current, builder, lookup)
                    current, builder = r["series_instance_uid"], StackBuilder()
                builder.add(InstanceRecord.from_row(repo.decoded(r["record"])))
            if current is not None:
                await summarize(current, builder, lookup)
        async with pool.acquire() as conn, conn.transaction():
            await repo.replace_stacks(conn, cohort_id, series_uids, stack_rows)
