"""Anonymization as a stage plugin: one work item per study, de-identified into `anon/<cohort>/`.

- plan: list the source (a new study's `location`, else the cohort's `source_path`), read just
  enough of each new or changed file to learn its StudyInstanceUID (files read before and unchanged
  are not read again), reject what is not a DICOM object of a study (with the reason), and group the
  rest by study. A study already done for this cohort with the same file set is skipped; a failed
  one is planned again. Item keys are HMACs of the original StudyInstanceUID; the file lists stay in
  `anonymizer.planned_study`, encrypted, so no path or UID travels on the bus.
- process: batches of the study's file keys go to worker processes, which read each file
  themselves (ADR 0026); the patient's pseudonym and date offset (stored, project-wide) are
  resolved here, once per patient; per file the worker runs `anonymize`, serializes, `verify`s the
  written bytes and the object key, and only then uploads to
  `anon/<cohort>/<pseudonym>/<study>/<series>/<sop>.dcm` (deterministic keys: a redelivery
  overwrites, so every file ends up exactly once). Quarantined objects are not uploaded; a
  verification hit fails the file and the study (tried again by the next run), and the objects of
  the failed file's series are withdrawn: a series is released whole or not at all.
- finalize: the encrypted audit export (`write_audit`) into the audit bucket, the summary, and the
  de-identified zone as the next stage's input.

Nothing identifying goes to logs, tables (except encrypted), object keys or events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg

from services.anonymizer import SCHEMA
from services.anonymizer.audit import write_audit
from services.anonymizer.profile import (
    PatientIdOptions,
    Profile,
    ProfileOptions,
    PseudonymError,
    load_profile,
    read_mapping,
)
from services.anonymizer.profile.pseudonyms import hashed_pseudonym, identity_of, subject_key
from services.anonymizer.profile.uids import new_uid
from services.anonymizer.repository import (
    FileAudit,
    PlannedStudy,
    Subject,
    Vault,
    audit_for_export,
    finish_study,
    known_files,
    load_planned_study,
    mark_exported,
    plan_numbers,
    record_plan,
    record_retraction,
    record_source_files,
    record_study_subjects,
    refusal_groups,
    resolve_subject,
    study_states,
    study_timepoint,
)
from services.anonymizer.worker import (
    ANON_ZONE,
    FileOutcome,
    StudyBatch,
    SubjectKey,
    SubjectRef,
    Unresolved,
    deidentify_batch,
    load_worker_profile,
    study_heads,
    subject_key_of,
    worker_options,
)
from shared import topics
from shared.events import Envelope, ItemError, StageRequested, StudyRetraction, WorkItem
from shared.observability import FILES_PROCESSED
from shared.secrets import unseal
from shared.service import Handler
from shared.settings import Settings, get_settings
from shared.sources import Source, SourceFile, open_source
from shared.stage import ItemContext, ItemResult, PlannedItem, RunInfo
from shared.stage_config import AnonymizationConfig, JobConfigs, read_stage_config
from shared.storage import ObjectStore
from shared.topics import Stage
from shared.workers import ProcessPools, cpu_workers

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
AUDIT_PREFIX = "audit"
AUDIT_SUFFIX = {"encrypted_excel": "xlsx", "csv": "csv.enc"}
PLAN_READERS = 8  # header reads in flight while planning (I/O bound), over the worker pool
PLAN_BATCH_FILES = 64  # files per header-reading batch of a worker
WITHDRAWN = "withdrawn: a file of its series failed"
# files of a study per batch for a worker process: a handful of batches per worker, so the last
# ones of a study still spread over every worker, and a cancel is heard between batches
MAX_BATCH_FILES = 16
BATCHES_PER_WORKER = 4


# --- one file -------------------------------------------------------------------------------------


def subject_folder(subject: Subject, secret: bytes, patient_id: str, strategy: str) -> str:
    """The object-key folder of a subject: its pseudonym, alphanumeric. Under `strategy: none` the
    output keeps the original PatientID, but the key never does: a keyed hash names the folder."""
    if strategy == "none":
        return hashed_pseudonym(secret, patient_id, "", "id", 80)
    return "".join(ch for ch in subject.pseudonym if ch.isalnum()) or "sub"


# --- the plugin -----------------------------------------------------------------------------------


def deidentified_study_uid(settings: Settings, retraction: StudyRetraction) -> str:
    """The StudyInstanceUID the de-identified copy of the retracted study carries: `new_uid` of the
    original under the core secret, as `anonymize` and the object keys have it. Not under
    `retain_uids` (the copy keeps its original UID): the gateway covers that case, ADR 0025, "Retain UIDs"."""
    return study_uid_of_copy(settings, unseal(retraction.study_instance_uid, settings))


def study_uid_of_copy(settings: Settings, original: str) -> str:
    """The StudyInstanceUID the de-identified copy of study `original` carries (without
    `retain_uids`): `new_uid` under the core secret, as `anonymize` gives it."""
    return new_uid(Vault(settings).core_secret, original.strip())


class AnonymizerPlugin:
    stage = Stage.anonymization
    service = "anonymizer"
    schema = SCHEMA

    def cohort_prefixes(self, cohort_id: uuid.UUID) -> list[str]:
        """Removed with the cohort: its de-identified zone (audit exports stay)."""
        return [f"{ANON_ZONE}/{cohort_id}"]

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._store: ObjectStore | None = None
        self._profiles: dict[ProfileOptions, Profile] = {}
        self._pools = ProcessPools(self.service, ["services.anonymizer.worker"])
        self._configs = JobConfigs(AnonymizationConfig)

    @property
    def settings(self) -> Settings:
        return self._settings or get_settings()

    def warm_up(self) -> int:
        """Start the default pool (the size a config without `process_pool_workers` uses) when
        the service starts; each run's plan still loads its profile into the workers."""
        return self._pools.warm(cpu_workers())

    def scope_after(self, request: StageRequested) -> list[str]:
        """The studies a new study's run works on after this stage: their de-identified copies'
        UIDs (`new_uid` under the core secret, as `anonymize` gives them), or under `retain_uids`
        the same UIDs (the copies keep them). So sorting and export stay scoped to the new
        studies, and no original UID travels past this stage."""
        if not request.study_instance_uids:
            return []
        config = read_stage_config(
            AnonymizationConfig, request.config, self.settings, secrets_withheld=True
        )
        if config.retain_uids:
            return list(request.study_instance_uids)
        return [study_uid_of_copy(self.settings, uid) for uid in request.study_instance_uids]

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = ObjectStore(self.settings)
        return self._store

    def profile(self, options: ProfileOptions) -> Profile:
        if options not in self._profiles:
            self._profiles[options] = load_profile(options)
        return self._profiles[options]

    # --- retractions (ADR 0025) ------------------------------------------------------------------

    def subscriptions(self, pool: asyncpg.Pool) -> dict[str, Handler]:
        """Topics this service handles besides the stage's (`shared.service.subscribe_stage`)."""

        async def on_retraction(envelope: Envelope) -> None:
            await self.handle_retraction(pool, envelope)

        return {topics.STUDY_RETRACTIONS: on_retraction}

    async def handle_retraction(self, pool: asyncpg.Pool, envelope: Envelope) -> None:
        """A study of an anonymized cohort retracted, or available again: recorded under the
        de-identified StudyInstanceUID, which the exporter reads (`retracted_studies_v`)."""
        retraction = envelope.open(StudyRetraction)
        if envelope.cohort_id is None:
            log.warning("retraction without a cohort skipped", extra={"event_id": str(envelope.id)})
            return
        uid = deidentified_study_uid(self.settings, retraction)
        changed = await record_retraction(
            pool,
            envelope.cohort_id,
            uid,
            retracted=retraction.retracted,
            reason=retraction.reason,
            changed_at=envelope.time,
        )
        log.info(
            "study retraction recorded" if retraction.retracted else "study retraction taken back",
            extra={"cohort_id": str(envelope.cohort_id), "study": uid, "changed": changed},
        )

    # --- plan -------------------------------------------------------------------------------------

    async def plan(
        self, pool: asyncpg.Pool, request: StageRequested, job_id: uuid.UUID
    ) -> list[PlannedItem]:
        settings = self.settings
        vault = Vault(settings)  # refuses an empty project secret
        scoped = bool(request.study_instance_uids)
        # a scoped run has no password: its audit rows wait for the cohort's next audit export
        config = self._configs.read(job_id, request.config, settings, secrets_withheld=scoped)
        options = ProfileOptions.from_config(config)
        self.profile(options)  # a bad config fails here
        # the worker pool starts (once per service) and loads the profile while the plan reads
        workers = config.process_pool_workers or cpu_workers()
        executor = await self._pools.ready(workers)
        for _ in range(workers):
            executor.submit(load_worker_profile, worker_options(options))
        cohort_id = request.cohort.id
        location = request.location or request.cohort.source_path
        # a new study's folder is keyed within the cohort's source: the same file has the same
        # key (and `folder` strategy path) in a study run and a whole-cohort run
        source = open_source(location, settings, within=request.cohort.source_path)
        listed = await asyncio.to_thread(lambda: list(source.list()))
        file_keys = {f.key: vault.key("file", f"{source.location}\x00{f.key}") for f in listed}
        studies = await self._studies_of(
            pool,
            vault,
            (source, request.cohort.source_path, workers),
            listed,
            file_keys,
            cohort_id,
            job_id,
            options.patient_id,
        )
        rejected = len(studies.pop(None, []))
        by_study = {k: v for k, v in studies.items() if k is not None}
        if scoped:
            wanted = {vault.key("study", uid.strip()) for uid in request.study_instance_uids}
            by_study = {k: v for k, v in by_study.items() if k in wanted}
        states = await study_states(pool, cohort_id)
        planned: list[PlannedStudy] = []
        skipped = 0
        for study_key in sorted(by_study):
            files = sorted(by_study[study_key])
            fileset = vault.key("fileset", json.dumps([source.location, files]))
            if states.get(study_key) == ("done", fileset):
                skipped += 1
                continue
            planned.append(PlannedStudy(study_key, source.location, files, fileset))
        await record_plan(
            pool,
            vault,
            job_id=job_id,
            cohort_id=cohort_id,
            studies=planned,
            files_listed=len(listed),
            files_rejected=rejected,
            studies_skipped=skipped,
        )
        log.info(
            "anonymization planned",
            extra={
                "job_id": str(job_id),
                "files": len(listed),
                "rejected": rejected,
                "studies": len(planned),
                "studies_skipped": skipped,
            },
        )
        return [
            PlannedItem(key=s.study_key, data={"files": len(s.files)}, partition_key=s.study_key)
            for s in planned
        ]

    async def _studies_of(
        self,
        pool: asyncpg.Pool,
        vault: Vault,
        reading: tuple[Source, str | None, int],
        listed: list[SourceFile],
        file_keys: dict[str, str],
        cohort_id: uuid.UUID,
        job_id: uuid.UUID,
        patient: PatientIdOptions,
    ) -> dict[str | None, list[tuple[str, int, int]]]:
        """Listed files grouped by study key (None: rejected). Only new or changed files are read
        (`reading`: the source, the cohort's source it lies within, the worker pool's size); what
        they turned out to be is recorded for the next plan."""
        source, within, workers = reading
        known = await known_files(pool, cohort_id)
        fresh = [
            f
            for f in listed
            if (k := known.get(file_keys[f.key])) is None
            or (k.size, k.mtime_ns) != (f.size, f.mtime_ns)
        ]
        # the headers are read and parsed by the worker pool (a few reads in flight in each)
        loop = asyncio.get_running_loop()
        threads = max(1, PLAN_READERS // workers)
        executor = await self._pools.ready(workers)
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(
                    executor,
                    study_heads,
                    source.location,
                    within,
                    fresh[i : i + PLAN_BATCH_FILES],
                    threads,
                )
                for i in range(0, len(fresh), PLAN_BATCH_FILES)
            )
        )
        read = [head for part in parts for head in part]
        study_of = {k: known[k].study_key for k in known}
        rows = []
        subjects: dict[str, tuple[str, str | None]] = {}  # study key -> (subject key, date)
        for f, (head, reason) in zip(fresh, read, strict=True):
            study_key = vault.key("study", head.study_uid) if head else None
            study_of[file_keys[f.key]] = study_key
            if head is not None and study_key is not None and study_key not in subjects:
                try:
                    identity = identity_of(
                        head.patient_id,
                        head.issuer,
                        opts=patient,
                        relative_path=f.key,
                        study_ref=study_key,
                    )
                except PseudonymError:  # the item fails with the reason; no timepoint to keep
                    identity = None
                if identity is not None:
                    subject = subject_key(vault.core_secret, identity.text, identity.issuer)
                    subjects[study_key] = (subject, head.study_date)
            sealed_path = vault.seal({"location": source.location, "key": f.key})
            rows.append(
                (
                    cohort_id,
                    file_keys[f.key],
                    f.size,
                    f.mtime_ns,
                    study_key,
                    reason,
                    sealed_path,
                    job_id,
                )
            )
        await record_study_subjects(pool, vault, [(k, s, d) for k, (s, d) in subjects.items()])
        await record_source_files(pool, rows)
        log.info("headers read", extra={"job_id": str(job_id), "files": len(fresh)})
        grouped: dict[str | None, list[tuple[str, int, int]]] = defaultdict(list)
        for f in listed:
            grouped[study_of[file_keys[f.key]]].append((f.key, f.size, f.mtime_ns))
        return grouped

    # --- process ----------------------------------------------------------------------------------

    async def process(self, ctx: ItemContext, item: WorkItem) -> ItemResult:
        settings = ctx.settings
        vault = Vault(settings)
        config = self._configs.read(ctx.job_id, item.config, settings, secrets_withheld=True)
        options = ProfileOptions.from_config(config)
        study = await load_planned_study(ctx.pool, vault, ctx.job_id, item.item_key)
        mapping = (
            read_mapping(options.patient_id.csv_text or "")
            if options.patient_id.strategy == "csv"
            else None
        )
        offset_range = options.offset_range_days if options.shift_dates else None
        timepoint = (
            await study_timepoint(ctx.pool, vault, study.study_key, options.timepoint_step_months)
            if options.timepoint_labels
            else None
        )
        strategy = options.patient_id.strategy
        cohort_id = item.cohort.id
        subjects: dict[SubjectKey, SubjectRef | str] = {}  # a reason when it cannot be resolved

        async def resolve(file: Unresolved) -> None:
            known = subject_key_of(file.patient_id, file.issuer, file.path, strategy)
            if known in subjects:
                return
            try:
                subject = await resolve_subject(
                    ctx.pool,
                    vault,
                    cohort_id=cohort_id,
                    patient_id=file.patient_id,
                    issuer=file.issuer,
                    opts=options.patient_id,
                    relative_path=file.path,
                    mapping=mapping,
                    offset_range=offset_range,
                    study_key=study.study_key,
                )
            except PseudonymError as exc:
                subjects[known] = str(exc)
                return
            folder = subject_folder(subject, vault.core_secret, file.patient_id, strategy)
            subjects[known] = SubjectRef(subject.pseudonym, subject.date_offset_days, folder)

        workers = config.process_pool_workers or cpu_workers()
        executor = await self._pools.ready(workers)
        loop = asyncio.get_running_loop()
        keys = [f[0] for f in study.files]
        job_options = worker_options(options)
        outcomes: list[FileOutcome | None] = [None] * len(keys)

        async def run(indices: list[int]) -> list[tuple[int, Unresolved]]:
            """De-identify these files in batches across the worker pool; the files whose subject
            is not resolved yet come back."""
            size = max(1, min(MAX_BATCH_FILES, -(-len(indices) // (BATCHES_PER_WORKER * workers))))
            slots = asyncio.Semaphore(2 * workers)  # batches in flight: every worker kept busy
            missing: list[tuple[int, Unresolved]] = []

            async def batch(part: list[int]) -> None:
                async with slots:
                    await ctx.check_cancelled()
                    job = StudyBatch(
                        location=study.location,
                        within=item.cohort.source_path,
                        keys=[keys[i] for i in part],
                        vault=vault,
                        options=job_options,
                        subjects=dict(subjects),
                        cohort_id=cohort_id,
                        timepoint_label=timepoint,
                    )
                    # read, parse, de-identify, write, verify and upload in a worker process
                    results = await loop.run_in_executor(executor, deidentify_batch, job)
                for i, result in zip(part, results, strict=True):
                    if isinstance(result, Unresolved):
                        missing.append((i, result))
                    else:
                        outcomes[i] = result

            try:
                async with asyncio.TaskGroup() as group:  # a cancel or an error stops the siblings
                    for start in range(0, len(indices), size):
                        group.create_task(batch(indices[start : start + size]))
            except BaseExceptionGroup as failure:
                raise failure.exceptions[0] from None
            return sorted(missing, key=lambda m: m[0])

        # the first file alone finds the study's patient (usually its only one); the rest then go
        # out with it resolved, and a file of another patient comes back once to be resolved
        waves = [list(range(min(1, len(keys)))), list(range(1, len(keys)))]
        returned: set[int] = set()
        while waves:
            missing = await run(waves.pop(0))
            for _, file in missing:
                await resolve(file)
            again = [i for i, _ in missing]
            if returned.intersection(again):
                raise RuntimeError("a file came back unresolved after its subject was resolved")
            returned.update(again)
            if again:
                waves = [sorted(again + waves.pop(0))] if waves else [again]
        done = [o for o in outcomes if o is not None]
        if len(done) != len(keys):
            raise RuntimeError("a file of the study has no outcome")
        return await self._settle(ctx, item, study, done)

    async def _settle(
        self, ctx: ItemContext, item: WorkItem, study: PlannedStudy, outcomes: list[FileOutcome]
    ) -> ItemResult:
        """Record the study's outcome; the released objects of a failed file's series are withdrawn
        (of the whole study when the failure has no series), and the study is tried again by the
        next run."""
        status = Counter(o.status for o in outcomes)
        counts = {
            "files": len(outcomes),
            "anonymized": status["released"],
            "quarantined": status["quarantined"],
            "rejected": status["rejected"],
            "failed_files": status["failed"],
            "verification_failures": sum(o.verification_failed for o in outcomes),
        }
        n = len(outcomes)
        label = item.item_key[:12]
        # what stayed behind, by reason (reasons name attributes and kinds, never values)
        refused = Counter(
            f"{o.status}: {o.reason}"
            for o in outcomes
            if o.status in ("failed", "rejected", "quarantined")
        )
        failed = status["failed"] > 0 or status["released"] + status["quarantined"] == 0
        error = None
        withdrawn: set[str] = set()  # sop keys
        if failed:
            error = (
                f"{status['failed']} of {n} files failed"
                if status["failed"]
                else "no file of the study could be de-identified"
            )
            # a series is released whole or not at all (no half series reaches the catalog); a
            # failure that cannot be placed in a series (its patient could not be resolved)
            # withdraws the whole study
            bad = {o.series for o in outcomes if o.status == "failed"}
            whole = "" in bad
            gone = [o for o in outcomes if o.status == "released" and (whole or o.series in bad)]
            for o in gone:
                await asyncio.to_thread(self.store.delete, o.object_key)
            withdrawn = {o.sop_key for o in gone}
            counts["anonymized"] = status["released"] - len(gone)
            counts["withdrawn"] = len(gone)
            if gone:
                refused[WITHDRAWN] = len(gone)
        errors = [
            ItemError(item=f"study {label}", message=f"{count} of {n} files {reason}")
            for reason, count in refused.most_common()
        ]
        if error:
            errors.insert(0, ItemError(item=f"study {label}", message=f"study failed: {error}"))
        audits = []
        for o in outcomes:
            if o.audit is None:
                continue
            if o.sop_key in withdrawn:
                row = replace(o.audit, status="withdrawn", reason=WITHDRAWN, object_key="")
                audits.append(FileAudit(o.sop_key, "withdrawn", WITHDRAWN, "", row))
            else:
                audits.append(FileAudit(o.sop_key, o.status, o.reason, o.object_key, o.audit))
        await finish_study(
            ctx.pool,
            Vault(ctx.settings),
            cohort_id=item.cohort.id,
            job_id=ctx.job_id,
            study=study,
            audits=audits,
            counts={**counts, "refused": dict(refused)},
            error=error,
        )
        for name in ("released", "quarantined", "rejected", "failed"):
            if status[name]:
                FILES_PROCESSED.labels("anonymization", name).inc(status[name])
        # the study's de-identified prefixes (`<subject>/<new study UID>` under the zone): a
        # streamed run's extraction reads them as soon as this item ends (ADR 0023); the
        # replacement UID in the key, never an original, names the study
        zone = f"{ANON_ZONE}/{item.cohort.id}"
        prefixes = sorted(
            {
                o.object_key.rsplit("/", 2)[0][len(zone) + 1 :]
                for o in outcomes
                if o.status == "released" and o.sop_key not in withdrawn
            }
        )
        return ItemResult(
            counts=counts,
            errors=errors[:50],
            failed=failed,
            studies=sorted({p.rsplit("/", 1)[-1] for p in prefixes}),
            study_prefixes=prefixes,
            output_prefix=zone,
        )

    # --- finalize ---------------------------------------------------------------------------------

    async def finalize(self, pool: asyncpg.Pool, run: RunInfo) -> tuple[dict[str, Any], str | None]:
        settings = self.settings
        vault = Vault(settings)
        cohort_id = run.cohort.id
        numbers = await plan_numbers(pool, run.job_id)
        summary: dict[str, Any] = {
            "files_listed": numbers.get("files_listed", 0),
            "studies_planned": numbers.get("studies_planned", 0),
            "studies_skipped": numbers.get("studies_skipped", 0),
            "rejected_at_plan": numbers.get("files_rejected", 0),
            "rejected": int(run.summary.get("rejected", 0)) + numbers.get("files_rejected", 0),
            # files a de-identifiable study held that did not come out (quarantine is a verdict,
            # rejected files are no DICOM of a study: both are counted, neither is left behind)
            "left_behind": int(run.summary.get("failed_files", 0))
            + int(run.summary.get("withdrawn", 0)),
            "left_behind_unit": "files",
            "refused": await refusal_groups(pool, run.job_id),
        }
        config = self._configs.read(run.job_id, run.config, settings, secrets_withheld=True)
        fmt, password = config.audit_export.format, config.audit_export.password
        if password is None:
            summary["audit_export"] = (
                "not written: a scoped run came without an audit password; its audit rows are"
                " kept and go into the cohort's next audit export"
            )
        else:
            subjects, files = await audit_for_export(pool, vault, cohort_id, run.job_id)
            secret = password.get_secret_value()
            data = await asyncio.to_thread(write_audit, subjects, files, fmt, secret)
            key = f"{AUDIT_PREFIX}/{cohort_id}/{run.job_id}.{AUDIT_SUFFIX[fmt]}"
            store = self.store
            await asyncio.to_thread(store.put_bytes, key, data, bucket=store.audit_bucket)
            await mark_exported(pool, cohort_id, run.job_id)
            summary.update(
                audit_export="written",
                audit_object=key,
                audit_bucket=store.audit_bucket,
                audit_format=fmt,
                audit_subjects=len(subjects),
                audit_files=len(files),
            )
        return summary, f"{ANON_ZONE}/{cohort_id}"
