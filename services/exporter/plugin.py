"""Export as a stage plugin: plan the names once, export one stack per item, finish the dataset.

- plan: the cohort's stacks and their classification (through the catalog and sorting views,
  filtered by cohort), the selection of `includeIntents`/`includeProvenance` (the rest recorded with
  the reason), and the whole naming plan (sessions, `run-` numbers by acquisition time) computed once
  by the core and stored in `export.planned_stack`; one work item per exported stack. A scoped
  ("new study") run plans only the subjects of its studies and carries the others' files over from
  the previous export as manifest rows, without touching their objects (ADR 0024).
- process: download the stack's DICOM objects, convert (dcm2niix in a subprocess with a timeout,
  dicom2nifti as fallback) and/or copy the DICOM, upload to `export/<cohort>/<job>/<path>`, write the
  manifest. A stack that cannot be converted fails its item only. With `overwrite: skip` a stack whose
  fingerprint (names, DICOM bytes, modes, classification) matches an earlier export of the cohort
  lists that export's objects and writes nothing.
- finalize: dataset files and field-map links (core; the root files merged from every subject's
  part, carried or computed), in the manifest too; the BIDS validator (bids layout) as the last
  step, its report in the summary, on the cohort's tree kept on this process's disk and synced by
  manifest (`tree_cache`: only what changed is downloaded); the copy to `destination` when asked,
  from the same tree.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import asyncpg

from services.exporter import SCHEMA
from services.exporter import repository as repo
from services.exporter.bids import (
    ExportedStack,
    ExportStack,
    StudyVisit,
    SubjectPart,
    assign_sessions,
    dataset_files,
    incomplete_images,
    merged_dataset_files,
    naming_problems,
    plan_names,
    subject_files,
)
from services.exporter.bids.entities import subject_label
from services.exporter.convert import ConverterError
from services.exporter.convert.dcm2niix import dcm2niix_version
from services.exporter.convert.export import export_stack
from services.exporter.repository import ManifestRow, SourceInstance
from services.exporter.selection import (
    CLASSIFICATION_FIELDS,
    ExportOptions,
    export_stack_of,
    file_kind,
    leave_out_retracted,
    split_selected,
    stack_fingerprint,
)
from services.exporter.tree_cache import TreeCache
from services.exporter.validate import ValidatorError, run_bids_validator
from shared.catalog import StackSummary
from shared.db import JsonText
from shared.events import CohortRef, ItemError, StageRequested, WorkItem
from shared.mapping_rules import RuleBook, apply_rule, load_rules
from shared.retractions import load_retracted
from shared.settings import Settings, get_settings
from shared.sources import (
    LocalSource,
    SourceError,
    check_destination,
    in_place_key,
    open_source,
    raw_prefix,
)
from shared.stage import ItemContext, ItemResult, PlannedItem, RunInfo, spread_items
from shared.stage_config import ExportConfig, JobConfigs
from shared.storage import ObjectStore, parse_s3_uri, write_hashed
from shared.topics import Stage
from shared.workers import cpu_workers

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
NOT_CLASSIFIED = "not classified (run sorting first)"
_TRANSFER_THREADS = 8
_COPY_CHUNK = 1 << 20
_PUT_WHOLE = 64 << 20  # outputs up to this size are uploaded from memory
_LISTED_MAX = 200
_SWEEP_EVERY_S = 600.0  # how often items clear stale staged files (tree_cache)


class _Clock:
    """Seconds spent in each phase of one item, for its log line."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


def export_prefix(cohort_id: uuid.UUID, job_id: uuid.UUID) -> str:
    """Where an export job's tree lives in the data bucket (the `export/` zone, shared.storage)."""
    return f"export/{cohort_id}/{job_id}"


_transfers: ThreadPoolExecutor | None = None
_transfers_made = threading.Lock()


def _transfer_threads() -> ThreadPoolExecutor:
    """The process's transfer threads, made on first use and kept (ADR 0036)."""
    global _transfers
    with _transfers_made:
        if _transfers is None:
            _transfers = ThreadPoolExecutor(_TRANSFER_THREADS, thread_name_prefix="transfer")
        return _transfers


def _run_each(fn: Callable[[Any], Any], part: list[Any]) -> list[Any]:
    return [fn(x) for x in part]


def _parallel(work: Iterable[Any], fn: Callable[[Any], Any]) -> list[Any]:
    """`fn` over `work`, results in order, on the process's transfer threads (one pool that
    every item shares, not one started per call). The work goes out as one share per thread (a
    stack's thousands of files are a few tasks, not thousands of futures); every share runs to
    its end or its first error before the first error (in share order) is raised, so the caller
    may then remove what they wrote into. `fn` must not call `_parallel` itself (the shares of
    the inner call could wait behind the outer's for a thread)."""
    items = list(work)
    if len(items) <= 1:
        return _run_each(fn, items)
    shares = min(_TRANSFER_THREADS, len(items))
    pool = _transfer_threads()
    futures = [pool.submit(_run_each, fn, items[i::shares]) for i in range(shares)]
    wait(futures)
    results: list[Any] = [None] * len(items)
    for i, future in enumerate(futures):
        results[i::shares] = future.result()
    return results


def kept_in_tree(path: str, options: ExportOptions) -> bool:
    """Whether finalize puts the file in the cohort's kept tree: everything for a destination
    copy; else what the validator reads (a validated tree without sourcedata/, which it skips)."""
    if options.destination:
        return True
    validated = options.layout == "bids" and options.nifti
    return validated and not path.startswith("sourcedata/")


@dataclass(frozen=True)
class SourceCopy:
    """A stack's file placed in the scratch folder from the source folder: a hard link to the
    file (`identity` set: nothing copied, the reader checks `unchanged` afterwards) or a copy."""

    path: Path
    identity: tuple[int, int, int, int, int] | None = None

    @staticmethod
    def of(st: os.stat_result) -> tuple[int, int, int, int, int]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def unchanged(self) -> bool:
        """Whether the linked file is as it was when its content was checked: any write since
        changes its ctime (a copy cannot change)."""
        if self.identity is None:
            return True
        try:
            return self.of(os.stat(self.path, follow_symlinks=False)) == self.identity
        except OSError:
            return False


def _hard_link(fh: BinaryIO, real: Path, target: Path) -> bool:
    """Hard link `target` to the open file `fh` (found at `real`); False when the file system or
    its rules do not allow it (another device, a file of another user), or `real` no longer is
    that file."""
    try:
        os.link(real, target, follow_symlinks=False)
    except OSError:
        return False
    opened, linked = os.fstat(fh.fileno()), os.lstat(target)
    if (opened.st_dev, opened.st_ino) != (linked.st_dev, linked.st_ino):
        target.unlink()
        return False
    return True


class SourceGone(RuntimeError):
    """A file catalogued in place that cannot be taken as it was catalogued (ADR 0035)."""


def take_if_unchanged(
    source: LocalSource, key: str, target: Path, sha256: str, *, link: bool = True
) -> SourceCopy | None:
    """Place the source's file `key` at `target` when its content still has the catalogued
    `sha256`: hard linked and hashed in place where the file system allows it, else copied and
    hashed on the way; None, with nothing written, when it is gone, unreadable, refused (a link
    out of the roots) or changed since it was ingested. A linked file is the source's inode: the
    caller checks `SourceCopy.unchanged` once it has read it (ADR 0030)."""
    try:
        real, fh = source.open_resolved(key)
        with fh:
            if not (link and _hard_link(fh, real, target)):
                chunks = iter(lambda: fh.read(_COPY_CHUNK), b"")
                return SourceCopy(target) if write_hashed(chunks, target, sha256) else None
            identity = SourceCopy.of(os.fstat(fh.fileno()))  # after the link changed its ctime
            if hashlib.file_digest(fh, "sha256").hexdigest() == sha256:  # type: ignore[arg-type]
                return SourceCopy(target, identity)
            target.unlink()
            return None
    except (SourceError, OSError):
        target.unlink(missing_ok=True)
        return None


def catalog_stacks(
    rows: Sequence[asyncpg.Record],
    instances: dict[str, SourceInstance],
    sessions: dict[str, str],
    rules: RuleBook | None = None,
) -> dict[str, tuple[ExportStack, dict[str, Any]]]:
    """Every catalog stack as the core's `ExportStack`, with its classification row, by key.

    A stack listed without members (an older catalog) is its series' instances when it is the
    series' only stack; otherwise it stays without members and its item fails with the reason.
    """
    stacks_per_series = Counter(r["series_instance_uid"] for r in rows)
    series_members: dict[str, list[str]] = defaultdict(list)
    for instance in instances.values():
        series_members[instance.series_instance_uid].append(instance.sop_instance_uid)
    by_key: dict[str, tuple[ExportStack, dict[str, Any]]] = {}
    for row in rows:
        summary = StackSummary.model_validate(row["summary"])
        summary.sop_instance_uids = list(row["sop_instance_uids"] or [])
        if not summary.sop_instance_uids and stacks_per_series[summary.series_instance_uid] == 1:
            summary.sop_instance_uids = series_members[summary.series_instance_uid]
        classification = {f: row[f] for f in CLASSIFICATION_FIELDS}
        classification["classified"] = row["classified"]
        # a person's correction (the cohort's mapping rules) names the stack instead of the sorter
        classification = apply_rule(
            rules or {}, summary.series_description, summary.stack_key, classification
        )
        stack = export_stack_of(summary, classification, sessions.get(row["study_instance_uid"]))
        by_key[stack.key] = (stack, classification)
    return by_key


_COST_PER_ITEM = 1 << 20  # in source bytes: the converter's start, the item's round trips
_COST_PER_INSTANCE = 16 << 10  # a file's open, parse and link


def conversion_cost(stack: ExportStack, instances: dict[str, SourceInstance]) -> float:
    """A stack's export work in source bytes: the converter's time grows with the pixel data it
    reads and compresses, a little with the number of files, plus what every item costs."""
    members = [instances[u] for u in stack.summary.sop_instance_uids if u in instances]
    return _COST_PER_ITEM + sum(i.size + _COST_PER_INSTANCE for i in members)


def membership_problem(stack: ExportStack, instances: dict[str, SourceInstance]) -> str | None:
    """Why the stack's DICOM cannot be fetched, if it cannot."""
    if not stack.summary.sop_instance_uids:
        return (
            "the catalog lists no instances for this stack"
            " (catalog.stack_summary_v.sop_instance_uids is empty)"
        )
    missing = sum(1 for u in stack.summary.sop_instance_uids if u not in instances)
    return f"{missing} instance(s) missing from the catalog" if missing else None


class ExporterPlugin:
    stage = Stage.export
    service = "exporter"
    schema = SCHEMA
    # BIDS names are cohort-wide (sessions per subject, runs by time): a streamed pipeline run's
    # export plans once sorting has closed its run, not study by study (ADR 0023)
    streams_in = False

    def cohort_prefixes(self, cohort_id: uuid.UUID) -> list[str]:
        """Removed with the cohort: its export trees in the bucket (destinations stay)."""
        return [f"export/{cohort_id}"]

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._store: ObjectStore | None = None
        self._configs = JobConfigs(ExportConfig)
        self._trees: TreeCache | None = None
        self._converting: asyncio.Semaphore | None = None
        self._swept = time.monotonic()
        # items whose linked sources changed during a conversion: their next attempt copies
        self._copy_sources: set[tuple[uuid.UUID, str]] = set()

    @property
    def item_workers(self) -> int:
        """Stacks are independent once named: twice as many items in flight as there are cores
        (no more than the items topic has partitions), so that one item's download and upload
        overlap another's conversion, while `converting` keeps the conversions to the cores."""
        settings = self._settings or get_settings()
        return max(1, min(2 * cpu_workers(), settings.kafka_partitions))

    def warm_up(self) -> int:
        """What the first item would otherwise pay for, done when the service starts: the
        converter's version (a dcm2niix run) and nibabel's import (0.25-0.5 s, for the checks of
        converted images)."""
        import nibabel  # noqa: F401

        dcm2niix_version()
        return 0

    @property
    def converting(self) -> asyncio.Semaphore:
        """Held around each stack's conversion: as many at once as there are cores (ADR 0027)."""
        if self._converting is None:
            self._converting = asyncio.Semaphore(cpu_workers())
        return self._converting

    @property
    def trees(self) -> TreeCache:
        """The cohorts' last validated trees on this process's disk (ADR 0024)."""
        if self._trees is None:
            settings = self._settings or get_settings()
            self._trees = TreeCache(
                settings.export_tree_cache_dir, settings.export_tree_cache_cohorts
            )
        return self._trees

    async def forget_cohort(self, cohort_id: uuid.UUID) -> None:
        """A deleted cohort's tree leaves this process's disk too."""
        async with self.trees.lock(cohort_id):
            await asyncio.to_thread(self.trees.remove, cohort_id)

    def options(self, job_id: uuid.UUID, raw: dict[str, Any]) -> ExportOptions:
        """The job's export options, from its config read once per job."""
        config = self._configs.read(job_id, raw, self._settings or get_settings())
        return ExportOptions.from_config(config)

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = ObjectStore(self._settings or get_settings())
        return self._store

    # --- plan -----------------------------------------------------------------------------------

    async def plan(
        self, pool: asyncpg.Pool, request: StageRequested, job_id: uuid.UUID
    ) -> list[PlannedItem]:
        options = self.options(job_id, request.config)
        cohort_id = request.cohort.id
        async with pool.acquire() as conn:
            retracted = await load_retracted(conn, cohort_id)
            scope = await self._scope(conn, request, job_id, options, retracted)
            subjects = None if scope is None else sorted(scope)
            studies = await repo.cohort_studies(conn, cohort_id, subjects)
            study_uids = None if scope is None else [r["study_instance_uid"] for r in studies]
            rows = await repo.cohort_stacks(conn, cohort_id, study_uids)
            series = None if scope is None else sorted({r["series_instance_uid"] for r in rows})
            instances = await repo.cohort_instances(conn, cohort_id, series)
            rules = await load_rules(conn, cohort_id)
        sessions = assign_sessions(
            StudyVisit(
                subject=r["subject_id"],
                study_instance_uid=r["study_instance_uid"],
                study_date=r["study_date"],
                study_time=r["study_time"],
                timepoint=r["timepoint"],
            )
            for r in studies
        )
        by_key = catalog_stacks(rows, instances, sessions, rules)
        classified = [pair for pair in by_key.values() if pair[1]["classified"]]
        candidates, withdrawn = leave_out_retracted(classified, retracted)
        kept, reasons = split_selected(candidates, options)
        reasons.update(withdrawn)
        reasons.update({k: NOT_CLASSIFIED for k, (_, c) in by_key.items() if not c["classified"]})
        problems = naming_problems(kept, group_symri=options.group_symri)
        for stack in kept:
            problems.setdefault(stack.key, membership_problem(stack, instances) or "")
        problems = {k: v for k, v in problems.items() if v}
        names = plan_names(
            [s for s in kept if s.key not in problems],
            layout=options.layout,
            group_symri=options.group_symri,
        )
        plan_rows = []
        for key, (stack, classification) in by_key.items():
            base = names.get(key)
            sources = [
                [i.sop_instance_uid, i.object_key, i.sha256, i.size]
                for u in stack.summary.sop_instance_uids
                if (i := instances.get(u)) is not None
            ]
            plan_rows.append(
                (
                    job_id,
                    cohort_id,
                    stack.summary.series_instance_uid,
                    stack.summary.stack_key,
                    str(base) if base is not None else None,
                    # serialized by pydantic at once (a fifth of the plan's time as a dict)
                    JsonText(stack.model_dump_json()) if key not in reasons else None,
                    sources if key not in reasons else [],
                    {k: v for k, v in classification.items() if k != "classified"},
                    reasons.get(key),
                    problems.get(key),
                )
            )
        labels = None if scope is None else sorted({subject_label(s) for s in scope})
        async with pool.acquire() as conn, conn.transaction():
            await repo.save_plan(conn, plan_rows)
            await repo.save_tree(conn, job_id, cohort_id, options.tree_shape(), labels)
        log.info(
            "export planned",
            extra={
                "job_id": str(job_id),
                "subjects": "all" if labels is None else len(labels),
                "stacks": len(by_key),
                "exported": len(kept),
                "not_exported": len(reasons),
                "unnamable": len(problems),
            },
        )
        # by stack, not by study, and by their work: the consumers finish together (ADR 0030)
        return spread_items(
            [
                (
                    PlannedItem(
                        key=stack.key,
                        data={
                            "series": stack.summary.series_instance_uid,
                            "stack_key": stack.summary.stack_key,
                        },
                    ),
                    conversion_cost(stack, instances),
                )
                for stack in kept
            ],
            (self._settings or get_settings()).kafka_partitions,
        )

    async def _scope(
        self,
        conn: asyncpg.Connection,
        request: StageRequested,
        job_id: uuid.UUID,
        options: ExportOptions,
        retracted: dict[str, str],
    ) -> set[str] | None:
        """The catalog subjects a scoped export re-plans, or None to plan the whole cohort.

        A subject is the unit: a new study of a known subject can change the session and `run-`
        names of its other studies (naming is per subject, ADR 0005). Also re-planned: the
        subjects of retracted studies (their files leave the tree) and every catalog subject the
        previous export gave one of the same `sub-` labels. The whole cohort is planned when the
        run is not scoped, the layout is flat, or no earlier export of the cohort has this tree's
        options to carry the other subjects from (ADR 0024).
        """
        if not request.study_instance_uids or options.layout != "bids":
            return None
        cohort_id = request.cohort.id
        base = await repo.latest_tree(conn, cohort_id, options.tree_shape(), job_id)
        if base is None:
            return None
        studies = sorted({*request.study_instance_uids, *retracted})
        subjects = await repo.subjects_of_studies(conn, cohort_id, studies)
        labels = sorted({subject_label(s) for s in subjects})
        return subjects | await repo.subject_ids_of_parts(conn, base["job_id"], labels)

    # --- process ----------------------------------------------------------------------------------

    async def process(self, ctx: ItemContext, item: WorkItem) -> ItemResult:
        options = self.options(ctx.job_id, item.config)
        cohort_id = item.cohort.id
        series_uid, stack_key = item.data["series"], item.data["stack_key"]
        async with ctx.pool.acquire() as conn:
            planned = await repo.planned_stack(conn, ctx.job_id, series_uid, stack_key)
        if planned is None:
            raise RuntimeError(f"no plan for stack {item.item_key} in job {ctx.job_id}")
        if planned["problem"] or planned["base_path"] is None:
            return await self._fail(ctx, item, planned, planned["problem"] or "no name planned")
        stack = ExportStack.model_validate(planned["stack"])
        sources = [SourceInstance(*s[:4]) for s in planned["sources"]]
        base = PurePosixPath(planned["base_path"])
        fingerprint = stack_fingerprint(base, stack, [s.sha256 for s in sources], options)
        if options.overwrite == "skip":
            reused = await self._reuse(ctx, item, planned, fingerprint)
            if reused is not None:
                return reused
        await ctx.check_cancelled()
        prefix = export_prefix(cohort_id, ctx.job_id)
        clock = _Clock()
        # removed in a thread: thousands of files to unlink would hold up the other items
        folder = Path(tempfile.mkdtemp(prefix="cohortflow-export-"))
        try:
            try:
                files, taken = await asyncio.to_thread(
                    self._fetch_sources,
                    sources,
                    folder / "dicom",
                    item.cohort,
                    (ctx.job_id, item.item_key) not in self._copy_sources,
                )
            except SourceGone as exc:  # another attempt would find the same: the item fails
                return await self._fail(ctx, item, planned, str(exc), fingerprint)
            clock.lap("sources")
            local_sop = {
                str(path): s.sop_instance_uid for path, s in zip(files, sources, strict=True)
            }
            try:
                async with self.converting:
                    clock.lap("waiting")
                    exported = await asyncio.to_thread(
                        export_stack,
                        stack.model_copy(update={"files": files}),
                        base,
                        folder / "out",
                        output_modes=options.output_modes,
                        layout=options.layout,
                        overwrite="overwrite",
                        timeout_s=options.convert_timeout_s,
                    )
            except (ConverterError, ValueError) as exc:
                return await self._fail(
                    ctx, item, planned, f"{type(exc).__name__}: {exc}", fingerprint
                )
            if not exported.files:
                reason = "; ".join(exported.skipped) or "the converter produced no file"
                return await self._fail(
                    ctx, item, planned, f"nothing exported: {reason}", fingerprint
                )
            clock.lap("converting")
            changed = await asyncio.to_thread(lambda: [t for t in taken if not t.unchanged()])
            if changed:  # written (or relinked) while converted: the next attempt copies
                self._copy_sources.add((ctx.job_id, item.item_key))
                raise RuntimeError(f"{changed[0].path}: a source file changed while converted")
            await ctx.check_cancelled()
            rows = await asyncio.to_thread(
                self._upload, exported, folder / "out", prefix, planned, local_sop, options
            )
            clock.lap("upload")
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)
        record = exported.model_copy(
            update={
                "stack": stack,
                "sources": {
                    path: local_sop.get(local, "") for path, local in exported.sources.items()
                },
            }
        ).model_dump(mode="json")
        async with ctx.pool.acquire() as conn:
            await repo.save_stack(
                conn,
                job_id=ctx.job_id,
                cohort_id=cohort_id,
                series_uid=series_uid,
                stack_key=stack_key,
                base_path=str(base),
                fingerprint=fingerprint,
                status="exported",
                record=record,
                files=rows,
                tool=exported.tool,
                tool_version=exported.tool_version,
            )
        clock.lap("saved")
        log.info(
            "stack exported",
            extra={
                "item": item.item_key,
                "instances": len(sources),
                "source_mb": round(sum(s.size for s in sources) / 1e6, 1),
                **clock.laps,
            },
        )
        await self._sweep_staged()
        return ItemResult(
            counts={
                "stacks_exported": 1,
                "files_uploaded": len(rows),
                "bytes_uploaded": sum(r.size for r in rows),
                "images": len(exported.images),
                "converted_with_fallback": int(exported.tool == "dicom2nifti"),
            }
        )

    async def _sweep_staged(self) -> None:
        """Now and then, drop what items staged for runs this process never finalized."""
        now = time.monotonic()
        if now - self._swept < _SWEEP_EVERY_S:
            return
        self._swept = now
        await asyncio.to_thread(self.trees.sweep_staged)

    def _fetch_sources(
        self, sources: Sequence[SourceInstance], folder: Path, cohort: CohortRef, link: bool
    ) -> tuple[list[Path], list[SourceCopy]]:
        """The stack's DICOM files in a scratch folder, each checked against the catalog's
        SHA-256: a file catalogued in place (ADR 0035), and an identified cohort's raw copy, are
        taken from the cohort's source folder when this process may read it and the file there
        still has that SHA-256 (hard linked where possible and `link`: the caller checks the links
        once it has read them; ADR 0027, ADR 0030); otherwise a raw copy is downloaded and a file
        catalogued in place fails the item with the reason."""
        folder.mkdir(parents=True)
        local = self._local_source(cohort)
        raw = raw_prefix(cohort.id) + "/"

        def fetch(indexed: tuple[int, SourceInstance]) -> tuple[Path, SourceCopy | None]:
            index, source = indexed
            path = folder / f"{index:06d}.dcm"
            in_place = in_place_key(source.object_key)
            if in_place is not None:  # catalogued in place, never copied (ADR 0035)
                if local is None:
                    raise SourceGone(
                        f"{in_place}: catalogued in place, but the cohort's source folder"
                        f" {cohort.source_path} cannot be read by this service"
                    )
                taken = take_if_unchanged(local, in_place, path, source.sha256, link=link)
                if taken is None:
                    raise SourceGone(
                        f"{in_place}: changed, removed or unreadable since it was catalogued"
                        " (run extraction again)"
                    )
                return path, taken
            if local is not None and source.sha256 and source.object_key.startswith(raw):
                key = source.object_key[len(raw) :]
                taken = take_if_unchanged(local, key, path, source.sha256, link=link)
                if taken is not None:
                    return path, taken
            digest = self.store.download(source.object_key, path)
            if source.sha256 and digest != source.sha256:
                raise RuntimeError(
                    f"{source.object_key}: content differs from the catalog's SHA-256"
                )
            return path, None

        fetched = _parallel(enumerate(sources), fetch)
        return [path for path, _ in fetched], [taken for _, taken in fetched if taken is not None]

    def _local_source(self, cohort: CohortRef) -> LocalSource | None:
        """The cohort's source folder, when it is one this process may read (inside its data
        roots) and the cohort is identified: an anonymized cohort's stages never read it."""
        if cohort.anonymization_enabled:
            return None
        try:
            source = open_source(cohort.source_path, self._settings or get_settings())
        except (SourceError, ValueError, OSError):
            return None
        return source if isinstance(source, LocalSource) else None

    def _upload(
        self,
        exported: ExportedStack,
        root: Path,
        prefix: str,
        planned: asyncpg.Record,
        local_sop: dict[str, str],
        options: ExportOptions,
    ) -> list[ManifestRow]:
        """Every output into the job's prefix, each also staged for the cohort's kept tree when
        finalize will sync it, so that sync need not download it again (ADR 0027)."""
        all_sops = [s[0] for s in planned["sources"]]
        cohort_id = planned["cohort_id"]

        def put(relative: PurePosixPath) -> ManifestRow:
            path = root / str(relative)
            key = f"{prefix}/{relative}"
            size = path.stat().st_size
            if size <= _PUT_WHOLE:  # read once: hashed and sent from memory, unsigned (obstore)
                digest = self.store.put_bytes(key, path.read_bytes())
            else:
                digest = self.store.put_file(key, path)
            if kept_in_tree(str(relative), options):
                self.trees.stage_file(cohort_id, path, digest)
            local = exported.sources.get(str(relative))
            return ManifestRow(
                path=str(relative),
                object_key=key,
                kind=file_kind(relative),
                size=size,
                sha256=digest,
                series_instance_uid=planned["series_instance_uid"],
                stack_key=planned["stack_key"],
                source_sop_instance_uids=[local_sop[local]] if local else all_sops,
                classification=planned["classification"],
                tool=None if local else exported.tool,
                tool_version=None if local else exported.tool_version,
            )

        return _parallel(exported.files, put)

    async def _reuse(
        self, ctx: ItemContext, item: WorkItem, planned: asyncpg.Record, fingerprint: str
    ) -> ItemResult | None:
        """List an earlier export's objects for this stack when they all still exist."""
        async with ctx.pool.acquire() as conn:
            found = await repo.reusable_export(conn, item.cohort.id, ctx.job_id, fingerprint)
        if found is None:
            return None
        earlier, files = found
        present = await asyncio.to_thread(
            lambda: all(self.store.stat(f.object_key) is not None for f in files)
        )
        if not files or not present:
            return None
        async with ctx.pool.acquire() as conn:
            await repo.save_stack(
                conn,
                job_id=ctx.job_id,
                cohort_id=item.cohort.id,
                series_uid=planned["series_instance_uid"],
                stack_key=planned["stack_key"],
                base_path=planned["base_path"],
                fingerprint=fingerprint,
                status="reused",
                record=earlier["record"],
                files=files,
                tool=earlier["tool"],
                tool_version=earlier["tool_version"],
                reused_from=earlier["reused_from"] or earlier["job_id"],
            )
        return ItemResult(counts={"stacks_reused": 1, "files_reused": len(files)})

    async def _fail(
        self,
        ctx: ItemContext,
        item: WorkItem,
        planned: asyncpg.Record,
        error: str,
        fingerprint: str = "",
    ) -> ItemResult:
        async with ctx.pool.acquire() as conn:
            await repo.save_stack(
                conn,
                job_id=ctx.job_id,
                cohort_id=item.cohort.id,
                series_uid=planned["series_instance_uid"],
                stack_key=planned["stack_key"],
                base_path=planned["base_path"] or "",
                fingerprint=fingerprint,
                status="failed",
                record=None,
                files=[],
                error=error[:4000],
            )
        log.warning("stack not exported", extra={"item": item.item_key, "error": error[:500]})
        return ItemResult(
            counts={"stacks_failed": 1},
            errors=[ItemError(item=item.item_key, message=error[:2000])],
            failed=True,
        )

    # --- finalize ---------------------------------------------------------------------------------

    async def finalize(self, pool: asyncpg.Pool, run: RunInfo) -> tuple[dict[str, Any], str | None]:
        options = self.options(run.job_id, run.config)
        prefix = export_prefix(run.cohort.id, run.job_id)
        async with pool.acquire() as conn:
            records = await repo.exported_records(conn, run.job_id)
            failed = await repo.failed_stacks(conn, run.job_id)
            left_out = await repo.not_exported(conn, run.job_id)
            review_required = await repo.review_required_planned(conn, run.job_id)
        exports = [ExportedStack.model_validate(r["record"]) for r in records]
        if options.layout == "bids":
            parts, texts = subject_files(exports)
        else:
            versions = [e.tool_version for e in exports if e.tool == "dcm2niix" and e.tool_version]
            parts = {}
            texts = dataset_files(
                exports,
                name=run.cohort.name,
                dcm2niix_version=versions[0] if versions else None,
                layout=options.layout,
            )
        # every sidecar as this job must list it: linked where links apply, else as converted (a
        # reused stack's listed sidecar may carry the links of the export it came from)
        for exported in exports:
            for path, content in exported.sidecars.items():
                texts.setdefault(PurePosixPath(path), json.dumps(content, indent=2) + "\n")
        tree_info = await self._complete_tree(pool, run, options, parts, texts, prefix)
        async with pool.acquire() as conn:
            files = await repo.manifest(conn, run.job_id)
        # the cohort's kept tree: one finalize of the cohort uses it at a time (ADR 0024); it
        # holds sourcedata/ only when a destination copy needs it (the validator skips it), so
        # the copy never fetches again what the validation's sync just removed
        kept = [f for f in files if kept_in_tree(f.path, options)]
        async with self.trees.lock(run.cohort.id):
            validator = await self._validate(run.cohort.id, kept, options, bool(exports))
            destination = await self._copy_to_destination(run.cohort.id, files, options)
        await self.trees.evict()
        warnings = [f"{e.base.name}: {w}" for e in exports for w in [*e.warnings, *e.skipped]]
        summary = {
            "output_prefix": prefix,
            "layout": options.layout,
            "output_modes": list(options.output_modes),
            "overwrite": options.overwrite,
            "stacks_with_output": len(exports)
            if tree_info["stacks"] is None
            else tree_info["stacks"],
            "stacks_planned_with_output": len(exports),
            "files_total": len(files),
            "bytes_total": sum(f.size for f in files),
            "files_written": sum(1 for f in files if f.object_key.startswith(prefix + "/")),
            "dataset_files_written": tree_info["dataset_files_written"],
            "subjects_planned": tree_info["subjects_planned"],
            "files_carried": tree_info["files_carried"],
            "carried_from": tree_info["carried_from"],
            "not_exported": dict(Counter(r["not_exported_reason"] for r in left_out)),
            "not_exported_stacks": [
                {
                    "series_instance_uid": r["series_instance_uid"],
                    "stack_key": r["stack_key"],
                    "reason": r["not_exported_reason"],
                }
                for r in left_out[:_LISTED_MAX]
            ],
            "failed_stacks": [
                {
                    "series_instance_uid": r["series_instance_uid"],
                    "stack_key": r["stack_key"],
                    "path": r["base_path"],
                    "error": (r["error"] or "")[:500],
                }
                for r in failed[:_LISTED_MAX]
            ],
            # exported as classified; the classification's review_reasons are on the catalog
            "review_required_exported": review_required,
            "warnings": warnings[:_LISTED_MAX],
            # raw perf images lacking REQUIRED metadata the DICOM does not record (in .bidsignore)
            "incomplete_images": {
                str(path): missing
                for path, missing in sorted(incomplete_images(exports).items())[:_LISTED_MAX]
            },
            "validator": validator,
            "destination": destination,
        }
        return summary, prefix

    async def _complete_tree(
        self,
        pool: asyncpg.Pool,
        run: RunInfo,
        options: ExportOptions,
        parts: dict[str, SubjectPart],
        texts: dict[PurePosixPath, str],
        prefix: str,
    ) -> dict[str, Any]:
        """Carry the other subjects from the previous export (a scoped run), merge every subject's
        part into the dataset-level files (the one writer of participants.tsv), publish them, and
        mark the tree complete; one export of the cohort at a time (ADR 0024)."""
        async with pool.acquire() as conn:
            planned = await repo.tree(conn, run.job_id)
        subjects = None if planned is None else planned["subjects"]
        base: asyncpg.Record | None = None
        carried = 0
        async with pool.acquire() as lock:
            await repo.lock_trees(lock, run.cohort.id)
            try:
                async with pool.acquire() as conn, conn.transaction():
                    if subjects is not None:
                        base = await repo.latest_tree(
                            conn, run.cohort.id, options.tree_shape(), run.job_id
                        )
                        if base is None:
                            log.warning(
                                "scoped export found no earlier export to carry from",
                                extra={"job_id": str(run.job_id)},
                            )
                        else:
                            carried = await repo.carry_over(
                                conn, run.job_id, base["job_id"], subjects
                            )
                    await repo.save_parts(
                        conn,
                        run.job_id,
                        run.cohort.id,
                        {s: p.model_dump(mode="json") for s, p in parts.items()},
                    )
                    stored = [
                        SubjectPart.model_validate(p)
                        for p in await repo.subject_parts(conn, run.job_id)
                    ]
                if options.layout == "bids":
                    texts.update(merged_dataset_files(stored, name=run.cohort.name))
                written = await self._publish_dataset_files(pool, run, texts, options, prefix)
                async with pool.acquire() as conn:
                    await repo.finish_tree(conn, run.job_id, base["job_id"] if base else None)
            finally:
                await repo.unlock_trees(lock, run.cohort.id)
        return {
            "dataset_files_written": written,
            # the tree's stacks: this run's and the ones carried with their subjects
            "stacks": sum(p.stacks for p in stored) if options.layout == "bids" else None,
            "subjects_planned": "all" if subjects is None else len(subjects),
            "files_carried": carried,
            "carried_from": str(base["job_id"]) if base else None,
        }

    async def _publish_dataset_files(
        self,
        pool: asyncpg.Pool,
        run: RunInfo,
        texts: dict[PurePosixPath, str],
        options: ExportOptions,
        prefix: str,
    ) -> int:
        """Dataset files and linked sidecars into storage and the manifest; returns how many
        objects were written (with `overwrite: skip`, identical earlier objects are listed instead)."""
        async with pool.acquire() as conn:
            current = {
                f.path: f for f in await repo.manifest_at(conn, run.job_id, [str(p) for p in texts])
            }
            rows: list[ManifestRow] = []
            to_write: list[tuple[str, bytes]] = []
            for relative, text in sorted(texts.items()):
                path, data = str(relative), text.encode("utf-8")
                digest = hashlib.sha256(data).hexdigest()
                if path in current and current[path].sha256 == digest:
                    continue
                key = None
                if options.overwrite == "skip":
                    key = await repo.object_with_content(conn, run.cohort.id, path, digest)
                if key is None:
                    key = f"{prefix}/{path}"
                    to_write.append((key, data))
                rows.append(
                    ManifestRow(
                        path=path,
                        object_key=key,
                        kind=file_kind(path) if path in current else "metadata",
                        size=len(data),
                        sha256=digest,
                    )
                )
        await asyncio.to_thread(_parallel, to_write, lambda kd: self.store.put_bytes(kd[0], kd[1]))
        # the sync that follows takes them from here instead of downloading them (ADR 0027)
        for relative, text in texts.items():
            if kept_in_tree(str(relative), options):
                data = text.encode("utf-8")
                self.trees.stage_bytes(run.cohort.id, data, hashlib.sha256(data).hexdigest())
        async with pool.acquire() as conn, conn.transaction():
            await repo.upsert_manifest(conn, run.job_id, run.cohort.id, rows)
        return len(to_write)

    async def _sync_tree(self, cohort_id: uuid.UUID, files: Sequence[ManifestRow]) -> Path:
        """The cohort's kept tree holding exactly `files`, fetching only what changed since it
        was last synced (`tree_cache`); the caller holds the cohort's lock."""
        synced = await asyncio.to_thread(
            self.trees.sync, cohort_id, files, self.store.download, _parallel
        )
        log.info(
            "export tree synced",
            extra={
                "cohort_id": str(cohort_id),
                "downloaded": synced.downloaded,
                "staged": synced.staged,
                "kept": synced.kept,
                "removed": synced.removed,
            },
        )
        return synced.tree

    async def _validate(
        self,
        cohort_id: uuid.UUID,
        files: Sequence[ManifestRow],
        options: ExportOptions,
        has_stacks: bool,
    ) -> dict[str, Any]:
        """The BIDS validator's report on the cohort's tree kept on disk, synced to `files` by
        manifest: only files this export changed are downloaded (`tree_cache`)."""
        if options.layout != "bids":
            return {"skipped": "flat layout is not a BIDS dataset"}
        if not options.nifti or not has_stacks:
            return {"skipped": "no NIfTI output to validate"}
        tree = await self._sync_tree(cohort_id, files)
        try:
            report = await asyncio.to_thread(
                run_bids_validator, tree, timeout_s=options.validate_timeout_s
            )
        except ValidatorError as exc:
            log.error("BIDS validator did not run", extra={"error": str(exc)})
            return {"error": str(exc)}
        return report.as_json()

    async def _copy_to_destination(
        self, cohort_id: uuid.UUID, files: Sequence[ManifestRow], options: ExportOptions
    ) -> dict[str, Any] | None:
        """Copy the whole tree (sourcedata/ too) to the user's folder or s3:// prefix (checked
        again here), from the cohort's kept tree synced with every row (already current when the
        validator ran on it); the caller holds the cohort's lock."""
        if not options.destination:
            return None
        tree = await self._sync_tree(cohort_id, files)
        if options.destination.startswith("s3://"):
            bucket, dest_prefix = parse_s3_uri(options.destination)

            def put(row: ManifestRow) -> None:
                key = f"{dest_prefix}/{row.path}" if dest_prefix else row.path
                self.store.put_file(key, tree / row.path, bucket=bucket)

            await asyncio.to_thread(_parallel, files, put)
            return {"location": options.destination, "files": len(files)}
        target = Path(check_destination(options.destination, self._settings or get_settings()))
        await asyncio.to_thread(shutil.copytree, tree, target, dirs_exist_ok=True)
        return {"location": str(target), "files": len(files)}
