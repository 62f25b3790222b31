-- Export runs: the naming plan, what each stack became, and the file manifest (output -> sources).
-- Every row is keyed by its job, so a redelivered item or a re-planned run upserts the same rows.

-- the plan: one row per stack of the cohort that an export run considered
CREATE TABLE IF NOT EXISTS export.planned_stack (
    job_id              uuid NOT NULL,
    cohort_id           uuid NOT NULL,
    series_instance_uid text NOT NULL,
    stack_key           text NOT NULL,
    base_path           text,                  -- planned base path (no extension); NULL when not exported
    stack               jsonb,                 -- services.exporter.bids.ExportStack, without local files
    sources             jsonb NOT NULL DEFAULT '[]',  -- [[sop_instance_uid, object_key, sha256, size], ...]
    classification      jsonb NOT NULL DEFAULT '{}',  -- the sorting.classification_v row used
    not_exported_reason text,                  -- why the stack is left out (localizer, intent filter, ...)
    problem             text,                  -- why the stack cannot be named (its item fails)
    PRIMARY KEY (job_id, series_instance_uid, stack_key)
);

-- what one stack became: the core's ExportedStack record (finalize computes dataset files from it)
CREATE TABLE IF NOT EXISTS export.stack_export (
    job_id              uuid NOT NULL,
    cohort_id           uuid NOT NULL,
    series_instance_uid text NOT NULL,
    stack_key           text NOT NULL,
    base_path           text NOT NULL,
    fingerprint         text NOT NULL,         -- names + inputs + modes: equal means "same output"
    status              text NOT NULL,         -- exported | reused | failed
    reused_from         uuid,                  -- the earlier job whose objects a reused stack lists
    record              jsonb,                 -- services.exporter.bids.ExportedStack
    tool                text,
    tool_version        text,
    error               text,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, series_instance_uid, stack_key)
);
CREATE INDEX IF NOT EXISTS stack_export_fingerprint ON export.stack_export (cohort_id, fingerprint);

-- every file of an export: where it is in the tree, where its bytes are, and what it came from
CREATE TABLE IF NOT EXISTS export.manifest (
    job_id                   uuid NOT NULL,
    cohort_id                uuid NOT NULL,
    path                     text NOT NULL,    -- relative to the dataset root
    object_key               text NOT NULL,    -- in the data bucket (an earlier job's, when reused)
    kind                     text NOT NULL,    -- nifti | sidecar | bval | bvec | tsv | dicom | metadata
    size                     bigint NOT NULL,
    sha256                   text NOT NULL,
    series_instance_uid      text,
    stack_key                text,
    source_sop_instance_uids text[],
    classification           jsonb,
    tool                     text,
    tool_version             text,
    created_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, path)
);
CREATE INDEX IF NOT EXISTS manifest_stack ON export.manifest (job_id, series_instance_uid, stack_key);
CREATE INDEX IF NOT EXISTS manifest_cohort_path ON export.manifest (cohort_id, path, sha256);

-- the view the gateway reads (GET /api/cohorts/{id}/exports/{job_id} and its downloads)
CREATE OR REPLACE VIEW export.manifest_v AS
SELECT cohort_id, job_id, path, object_key, kind, size, sha256, series_instance_uid, stack_key,
       source_sop_instance_uids
FROM export.manifest;
