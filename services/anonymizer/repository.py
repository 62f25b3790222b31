"""The anonymizer's Postgres side: pseudonyms, date offsets, plans, study progress, audit rows.

Nothing identifying is stored in clear (ADR 0003): lookups go through keyed HMACs of the project
secret (`Vault.key`), and what must be recoverable — the original PatientID for the audit export,
date offsets, source paths, audit rows — is a Fernet token under a key derived from the project
secret (`Vault.seal`). The schema is `migrations/001_anonymizer.sql`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg
from cryptography.fernet import Fernet, InvalidToken

from services.anonymizer.audit import AuditRow, SubjectRow
from services.anonymizer.profile import (
    PatientIdOptions,
    PseudonymCollision,
    date_offset_days,
    identity_of,
    pseudonymize_patient_id,
    subject_key,
    timepoint_label,
)
from shared.secrets import SecretError, project_key
from shared.settings import Settings


class Vault:
    """The anonymizer's keys, all derived from the project secret, one per purpose.

    - `core_secret`: what the de-identification core keys new UIDs, hashed pseudonyms and date
      offsets with (the same for every run and cohort of the project);
    - `key(kind, value)`: a lookup key (HMAC-SHA256, hex) that stands for an original value;
    - `seal` / `open`: reversible encryption of what the service must read back.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.core_secret = project_key("anonymizer:deidentification", settings)
        self._lookup = project_key("anonymizer:lookup", settings)
        self._fernet = Fernet(base64.urlsafe_b64encode(project_key("anonymizer:store", settings)))

    def key(self, kind: str, value: str) -> str:
        message = f"{kind}:{value}".encode()
        return hmac.new(self._lookup, message, hashlib.sha256).hexdigest()

    def seal(self, value: Any) -> bytes:
        return self._fernet.encrypt(zlib.compress(json.dumps(value).encode()))

    def open(self, token: bytes) -> Any:
        try:
            return json.loads(zlib.decompress(self._fernet.decrypt(bytes(token))))
        except InvalidToken as exc:
            raise SecretError(
                "stored anonymizer data cannot be opened: the project secret has changed"
            ) from exc


# --- pseudonyms and date offsets ----------------------------------------------------------------


class PostgresPseudonymStore:
    """`PseudonymStore` on `anonymizer.subject`, bound to the one patient being resolved, so that a
    claim also stores that patient's original identity (encrypted) for the audit export."""

    def __init__(
        self, pool: asyncpg.Pool, vault: Vault, patient_id: str, issuer: str, basis: str
    ) -> None:
        self.pool = pool
        self.vault = vault
        self._original = {"patient_id": patient_id, "issuer": issuer, "basis": basis}

    async def get(self, subject_key: str) -> str | None:
        async with self.pool.acquire() as conn:
            value = await conn.fetchval(
                "SELECT pseudonym FROM anonymizer.subject WHERE subject_key = $1", subject_key
            )
        return str(value) if value is not None else None

    async def claim(self, subject_key: str, pseudonym: str) -> str:
        async with self.pool.acquire() as conn:
            try:
                claimed = await conn.fetchval(
                    "INSERT INTO anonymizer.subject (subject_key, pseudonym, original)"
                    " VALUES ($1, $2, $3) ON CONFLICT (subject_key) DO NOTHING RETURNING pseudonym",
                    subject_key,
                    pseudonym,
                    self.vault.seal(self._original),
                )
            except asyncpg.UniqueViolationError as exc:
                # the same patient claimed concurrently elsewhere trips the pseudonym index first;
                # only a pseudonym held by another subject is a collision
                claimed = await conn.fetchval(
                    "SELECT pseudonym FROM anonymizer.subject WHERE subject_key = $1", subject_key
                )
                if claimed is None:
                    raise PseudonymCollision(
                        f"pseudonym {pseudonym!r} already belongs to another patient"
                    ) from exc
            if claimed is None:  # this patient already had one (claimed concurrently)
                claimed = await conn.fetchval(
                    "SELECT pseudonym FROM anonymizer.subject WHERE subject_key = $1", subject_key
                )
        return str(claimed)

    async def next_number(self, scope: str) -> int:
        async with self.pool.acquire() as conn:
            value = await conn.fetchval(
                "INSERT INTO anonymizer.pseudonym_sequence AS s (scope, last_value) VALUES ($1, 1)"
                " ON CONFLICT (scope) DO UPDATE SET last_value = s.last_value + 1"
                " RETURNING last_value",
                scope,
            )
        return int(value)


@dataclass(frozen=True)
class Subject:
    """A resolved patient: its lookup key, its pseudonym and (when dates shift) its offset."""

    key: str
    pseudonym: str
    date_offset_days: int | None
    stored: bool  # False under `strategy: none` (the identity is kept, nothing to map)


async def resolve_subject(
    pool: asyncpg.Pool,
    vault: Vault,
    *,
    cohort_id: uuid.UUID,
    patient_id: str,
    issuer: str,
    opts: PatientIdOptions,
    relative_path: str,
    mapping: dict[str, str] | None,
    offset_range: tuple[int, int] | None,
    study_key: str,
) -> Subject:
    """The patient's pseudonym under `opts` (allocated once, project-wide) and, when
    `offset_range` is given, its date offset (chosen once, stored encrypted, reused). A patient
    without a usable PatientID is keyed by `study_key` (see `identity_of`)."""
    secret = vault.core_secret
    identity = identity_of(
        patient_id, issuer, opts=opts, relative_path=relative_path, study_ref=study_key
    )
    store = PostgresPseudonymStore(pool, vault, patient_id, issuer, identity.basis)
    pseudonym = await pseudonymize_patient_id(
        patient_id,
        opts=opts,
        secret=secret,
        store=store,
        issuer=issuer,
        relative_path=relative_path,
        mapping=mapping,
        study_ref=study_key,
    )
    key = subject_key(secret, identity.text, identity.issuer)
    stored = opts.strategy != "none"
    offset = None
    if offset_range is not None:
        offset = await _date_offset(
            pool, vault, key, date_offset_days(secret, pseudonym, offset_range)
        )
    if stored:
        async with pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO anonymizer.cohort_subject (cohort_id, subject_key) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING",
                cohort_id,
                key,
            )
    return Subject(key, pseudonym, offset, stored)


async def _date_offset(pool: asyncpg.Pool, vault: Vault, key: str, proposed: int) -> int:
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO anonymizer.date_offset (subject_key, offset_days) VALUES ($1, $2)"
            " ON CONFLICT (subject_key) DO NOTHING",
            key,
            vault.seal(proposed),
        )
        token = await conn.fetchval(
            "SELECT offset_days FROM anonymizer.date_offset WHERE subject_key = $1", key
        )
    return int(vault.open(token))


# --- timepoints -----------------------------------------------------------------------------------


async def record_study_subjects(
    pool: asyncpg.Pool, vault: Vault, rows: Sequence[tuple[str, str, str | None]]
) -> None:
    """(study_key, subject_key, original StudyDate or None) of studies a plan read."""
    if not rows:
        return
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO anonymizer.study_subject (study_key, subject_key, study_date)"
            " VALUES ($1, $2, $3) ON CONFLICT (study_key) DO UPDATE SET"
            " subject_key = EXCLUDED.subject_key, study_date = EXCLUDED.study_date,"
            " updated_at = now()",
            [(k, s, vault.seal(d) if d else None) for k, s, d in rows],
        )


async def study_timepoint(
    pool: asyncpg.Pool, vault: Vault, study_key: str, step_months: int
) -> str | None:
    """`M00`, `M06`, ... of a study: months from its subject's earliest recorded study date, or
    None when the study (or its date) was never recorded."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT s.study_key, s.study_date FROM anonymizer.study_subject s"
            " JOIN anonymizer.study_subject t ON t.subject_key = s.subject_key"
            " WHERE t.study_key = $1",
            study_key,
        )
    dates = {r["study_key"]: str(vault.open(r["study_date"])) for r in rows if r["study_date"]}
    valid = {k: d for k, d in dates.items() if len(d) == 8 and d.isdigit()}
    own = valid.get(study_key)
    if own is None:
        return None
    try:
        return timepoint_label(min(valid.values()), own, step_months)
    except ValueError:  # an impossible calendar date
        return None


# --- plans --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnownFile:
    size: int
    mtime_ns: int
    study_key: str | None
    rejection: str | None


async def known_files(pool: asyncpg.Pool, cohort_id: uuid.UUID) -> dict[str, KnownFile]:
    """The source files a previous plan of this cohort has read, by file key."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT file_key, size, mtime_ns, study_key, rejection FROM anonymizer.source_file"
            " WHERE cohort_id = $1",
            cohort_id,
        )
    return {
        r["file_key"]: KnownFile(r["size"], r["mtime_ns"], r["study_key"], r["rejection"])
        for r in rows
    }


async def record_source_files(pool: asyncpg.Pool, rows: Sequence[tuple[Any, ...]]) -> None:
    """Upsert `(cohort_id, file_key, size, mtime_ns, study_key, rejection, source, job_id)` rows."""
    if not rows:
        return
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO anonymizer.source_file"
            " (cohort_id, file_key, size, mtime_ns, study_key, rejection, source, job_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (cohort_id, file_key) DO UPDATE SET"
            " size = EXCLUDED.size, mtime_ns = EXCLUDED.mtime_ns, study_key = EXCLUDED.study_key,"
            " rejection = EXCLUDED.rejection, source = EXCLUDED.source, job_id = EXCLUDED.job_id,"
            " updated_at = now()",
            rows,
        )


async def study_states(pool: asyncpg.Pool, cohort_id: uuid.UUID) -> dict[str, tuple[str, str]]:
    """`study_key -> (status, fileset)` of the cohort's studies processed before."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT study_key, status, fileset FROM anonymizer.study WHERE cohort_id = $1",
            cohort_id,
        )
    return {r["study_key"]: (r["status"], r["fileset"]) for r in rows}


@dataclass(frozen=True)
class PlannedStudy:
    study_key: str
    location: str
    files: list[tuple[str, int, int]]  # (relative path, size, mtime_ns), sorted
    fileset: str


async def record_plan(
    pool: asyncpg.Pool,
    vault: Vault,
    *,
    job_id: uuid.UUID,
    cohort_id: uuid.UUID,
    studies: Sequence[PlannedStudy],
    files_listed: int,
    files_rejected: int,
    studies_skipped: int,
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO anonymizer.planned_study (job_id, study_key, files, n_files, fileset)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (job_id, study_key) DO UPDATE SET"
            " files = EXCLUDED.files, n_files = EXCLUDED.n_files, fileset = EXCLUDED.fileset",
            [
                (
                    job_id,
                    s.study_key,
                    vault.seal({"location": s.location, "files": s.files}),
                    len(s.files),
                    s.fileset,
                )
                for s in studies
            ],
        )
        await conn.execute(
            "INSERT INTO anonymizer.plan (job_id, cohort_id, files_listed, files_rejected,"
            " studies_planned, studies_skipped) VALUES ($1, $2, $3, $4, $5, $6)"
            " ON CONFLICT (job_id) DO UPDATE SET files_listed = EXCLUDED.files_listed,"
            " files_rejected = EXCLUDED.files_rejected, studies_planned = EXCLUDED.studies_planned,"
            " studies_skipped = EXCLUDED.studies_skipped",
            job_id,
            cohort_id,
            files_listed,
            files_rejected,
            len(studies),
            studies_skipped,
        )


async def load_planned_study(
    pool: asyncpg.Pool, vault: Vault, job_id: uuid.UUID, study_key: str
) -> PlannedStudy:
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT files, fileset FROM anonymizer.planned_study WHERE job_id = $1 AND study_key = $2",
            job_id,
            study_key,
        )
    if row is None:
        raise LookupError(f"no planned study {study_key[:16]} for job {job_id}")
    plan = vault.open(row["files"])
    files = [(str(k), int(s), int(m)) for k, s, m in plan["files"]]
    return PlannedStudy(study_key, str(plan["location"]), files, row["fileset"])


async def plan_numbers(pool: asyncpg.Pool, job_id: uuid.UUID) -> dict[str, int]:
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT files_listed, files_rejected, studies_planned, studies_skipped"
            " FROM anonymizer.plan WHERE job_id = $1",
            job_id,
        )
    return {k: int(v) for k, v in dict(row).items()} if row else {}


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileAudit:
    """One file's audit row as the service stores it (the row itself encrypted)."""

    sop_key: str
    status: str
    reason: str
    object_key: str
    row: AuditRow


async def finish_study(
    pool: asyncpg.Pool,
    vault: Vault,
    *,
    cohort_id: uuid.UUID,
    job_id: uuid.UUID,
    study: PlannedStudy,
    audits: Iterable[FileAudit],
    counts: dict[str, Any],
    error: str | None,
) -> None:
    """The study's audit rows and its status (`done`, or `failed` with the reason), in one go."""
    rows = [
        (
            cohort_id,
            a.sop_key,
            study.study_key,
            job_id,
            a.status,
            a.reason,
            a.object_key,
            vault.seal(asdict(a.row)),
        )
        for a in audits
    ]
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO anonymizer.audit_file (cohort_id, sop_key, study_key, job_id, status, reason,"
            " object_key, row) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            " ON CONFLICT (cohort_id, sop_key) DO UPDATE SET study_key = EXCLUDED.study_key,"
            " job_id = EXCLUDED.job_id, status = EXCLUDED.status, reason = EXCLUDED.reason,"
            " object_key = EXCLUDED.object_key, row = EXCLUDED.row, exported_in = NULL,"
            " updated_at = now()",
            rows,
        )
        await conn.execute(
            "INSERT INTO anonymizer.study (cohort_id, study_key, status, fileset, job_id, counts, error)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (cohort_id, study_key) DO UPDATE SET"
            " status = EXCLUDED.status, fileset = EXCLUDED.fileset, job_id = EXCLUDED.job_id,"
            " counts = EXCLUDED.counts, error = EXCLUDED.error, updated_at = now()",
            cohort_id,
            study.study_key,
            "failed" if error else "done",
            study.fileset,
            job_id,
            counts,
            error,
        )


REFUSAL_GROUPS_SHOWN = 20
STUDIES_NAMED = 10


async def refusal_groups(pool: asyncpg.Pool, job_id: uuid.UUID) -> list[dict[str, Any]]:
    """What a run left out, grouped by reason, largest first: files, studies and the first study
    labels (the 12-character prefix of the study key the job's errors use) of each reason."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT study_key, counts -> 'refused' AS refused FROM anonymizer.study"
            " WHERE job_id = $1 AND counts ? 'refused'",
            job_id,
        )
    files: dict[str, int] = {}
    studies: dict[str, list[str]] = {}
    for row in rows:
        for reason, count in (row["refused"] or {}).items():
            files[reason] = files.get(reason, 0) + int(count)
            studies.setdefault(reason, []).append(str(row["study_key"])[:12])
    ordered = sorted(files, key=lambda r: (-files[r], r))
    return [
        {
            "reason": reason,
            "files": files[reason],
            "studies": len(studies[reason]),
            "study_labels": sorted(studies[reason])[:STUDIES_NAMED],
        }
        for reason in ordered[:REFUSAL_GROUPS_SHOWN]
    ]


# --- the audit export ---------------------------------------------------------------------------


async def audit_for_export(
    pool: asyncpg.Pool, vault: Vault, cohort_id: uuid.UUID, job_id: uuid.UUID
) -> tuple[list[SubjectRow], list[AuditRow]]:
    """The cohort's subjects (original PatientID -> pseudonym, offset: decrypted here, in memory
    only) and the file rows of this run plus any not yet exported (scoped runs without a password)."""
    async with pool.acquire() as conn:
        subjects = await conn.fetch(
            "SELECT s.original, s.pseudonym, d.offset_days FROM anonymizer.cohort_subject c"
            " JOIN anonymizer.subject s USING (subject_key)"
            " LEFT JOIN anonymizer.date_offset d USING (subject_key)"
            " WHERE c.cohort_id = $1 ORDER BY s.pseudonym",
            cohort_id,
        )
        files = await conn.fetch(
            "SELECT row FROM anonymizer.audit_file WHERE cohort_id = $1"
            " AND (job_id = $2 OR exported_in IS NULL) ORDER BY study_key, sop_key",
            cohort_id,
            job_id,
        )
    subject_rows = []
    for r in subjects:
        original = vault.open(r["original"])
        offset = vault.open(r["offset_days"]) if r["offset_days"] is not None else None
        subject_rows.append(
            SubjectRow(
                str(original["patient_id"]),
                r["pseudonym"],
                offset,
                str(original.get("basis") or "PatientID"),
            )
        )
    return subject_rows, [AuditRow(**vault.open(r["row"])) for r in files]


async def mark_exported(pool: asyncpg.Pool, cohort_id: uuid.UUID, job_id: uuid.UUID) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE anonymizer.audit_file SET exported_in = $2 WHERE cohort_id = $1"
            " AND (job_id = $2 OR exported_in IS NULL)",
            cohort_id,
            job_id,
        )


# --- retractions (ADR 0025) ----------------------------------------------------------------------


async def record_retraction(
    pool: asyncpg.Pool,
    cohort_id: uuid.UUID,
    study_instance_uid: str,
    *,
    retracted: bool,
    reason: str,
    changed_at: Any,
) -> bool:
    """Retract (or take back the retraction of) a de-identified study of the cohort; a message
    older than the row's last change does nothing (False)."""
    async with pool.acquire() as conn:
        status = await conn.execute(
            "INSERT INTO anonymizer.retracted_study"
            " (cohort_id, study_instance_uid, retracted, reason, changed_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (cohort_id, study_instance_uid) DO UPDATE SET"
            " retracted = EXCLUDED.retracted, reason = EXCLUDED.reason,"
            " changed_at = EXCLUDED.changed_at"
            " WHERE anonymizer.retracted_study.changed_at < EXCLUDED.changed_at",
            cohort_id,
            study_instance_uid,
            retracted,
            reason,
            changed_at,
        )
    return bool(status.endswith(" 1"))
