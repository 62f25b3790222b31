-- The anonymizer's own state. No original identifying value is stored in clear: identities are
-- keyed by HMACs of the project secret (`*_key` columns), and whatever must be recoverable (the
-- original PatientID for the audit export, date offsets, source paths, audit rows) is a Fernet
-- token under a key derived from the project secret (`bytea` columns).

-- Pseudonyms, project-wide: the same patient keeps one pseudonym across runs and cohorts.
CREATE TABLE IF NOT EXISTS anonymizer.subject (
    subject_key text PRIMARY KEY,          -- HMAC(secret, issuer \ PatientID)
    pseudonym   text NOT NULL UNIQUE,      -- what the outputs carry; unique: no two patients share one
    original    bytea NOT NULL,            -- encrypted {"patient_id", "issuer"}
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Sequential pseudonyms: a number is handed out once per scope (`sequential:<prefix>`).
CREATE TABLE IF NOT EXISTS anonymizer.pseudonym_sequence (
    scope      text PRIMARY KEY,
    last_value bigint NOT NULL
);

-- One date offset per subject, stored so a later change of the offset range keeps subjects stable.
CREATE TABLE IF NOT EXISTS anonymizer.date_offset (
    subject_key text PRIMARY KEY,
    offset_days bytea NOT NULL,            -- encrypted integer
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Which subjects a cohort has (the subject sheet of its audit export).
CREATE TABLE IF NOT EXISTS anonymizer.cohort_subject (
    cohort_id   uuid NOT NULL,
    subject_key text NOT NULL REFERENCES anonymizer.subject (subject_key),
    PRIMARY KEY (cohort_id, subject_key)
);

-- Every source file seen by a plan: its study (so an unchanged file is not read again) or why it
-- was rejected. `file_key` = HMAC(location, relative path); the path itself only encrypted.
CREATE TABLE IF NOT EXISTS anonymizer.source_file (
    cohort_id  uuid NOT NULL,
    file_key   text NOT NULL,
    size       bigint NOT NULL,
    mtime_ns   bigint NOT NULL,
    study_key  text,                       -- HMAC of the original StudyInstanceUID
    rejection  text,                       -- reason (never a value) when not a usable DICOM file
    source     bytea NOT NULL,             -- encrypted {"location", "key"}
    job_id     uuid NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cohort_id, file_key)
);

-- What one run planned for one study: its files (encrypted list), so work items carry only keys.
CREATE TABLE IF NOT EXISTS anonymizer.planned_study (
    job_id    uuid NOT NULL,
    study_key text NOT NULL,
    files     bytea NOT NULL,              -- encrypted {"location", "files": [[key, size, mtime_ns]]}
    n_files   integer NOT NULL,
    fileset   text NOT NULL,               -- HMAC of the sorted (path, size, mtime) list
    PRIMARY KEY (job_id, study_key)
);

-- Per-study progress within a cohort: a study done with the same file set is not redone.
CREATE TABLE IF NOT EXISTS anonymizer.study (
    cohort_id  uuid NOT NULL,
    study_key  text NOT NULL,
    status     text NOT NULL CHECK (status IN ('done', 'failed')),
    fileset    text NOT NULL,
    job_id     uuid NOT NULL,
    counts     jsonb NOT NULL DEFAULT '{}',
    error      text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cohort_id, study_key)
);

-- The audit: one row per output file (keywords and actions only; the full row encrypted because
-- under `patient_id.strategy: none` its PatientID is the original one).
CREATE TABLE IF NOT EXISTS anonymizer.audit_file (
    cohort_id   uuid NOT NULL,
    sop_key     text NOT NULL,             -- HMAC of the original SOPInstanceUID
    study_key   text NOT NULL,
    job_id      uuid NOT NULL,
    status      text NOT NULL,             -- released | quarantined | failed | rejected
    reason      text NOT NULL DEFAULT '',
    object_key  text NOT NULL DEFAULT '',  -- de-identified zone key ('' when not released)
    row         bytea NOT NULL,            -- encrypted AuditRow
    exported_in uuid,                      -- job whose audit export listed it
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cohort_id, sop_key)
);
CREATE INDEX IF NOT EXISTS audit_file_job ON anonymizer.audit_file (cohort_id, job_id);
CREATE INDEX IF NOT EXISTS audit_file_unexported
    ON anonymizer.audit_file (cohort_id) WHERE exported_in IS NULL;

-- A run's plan in numbers (the summary reports them at finalize).
CREATE TABLE IF NOT EXISTS anonymizer.plan (
    job_id          uuid PRIMARY KEY,
    cohort_id       uuid NOT NULL,
    files_listed    integer NOT NULL,
    files_rejected  integer NOT NULL,
    studies_planned integer NOT NULL,
    studies_skipped integer NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
