-- The stage runtime's tables (shared/stage.py), in every stage service's schema: one row per run
-- with its fan-in counters, one row per work item with its attempts.
-- `{schema}` is replaced by the schema's name (shared/db.py, `migrate`).

CREATE TABLE IF NOT EXISTS {schema}.runs (
    job_id           uuid PRIMARY KEY,
    cohort_id        uuid NOT NULL,
    stage            text NOT NULL,
    request          jsonb NOT NULL,
    status           text NOT NULL,
    items_total      integer NOT NULL DEFAULT 0,
    items_done       integer NOT NULL DEFAULT 0,
    items_failed     integer NOT NULL DEFAULT 0,
    errors           jsonb NOT NULL DEFAULT '[]',
    summary          jsonb NOT NULL DEFAULT '{}',
    last_progress_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);

CREATE TABLE IF NOT EXISTS {schema}.run_items (
    job_id     uuid NOT NULL REFERENCES {schema}.runs (job_id) ON DELETE CASCADE,
    item_key   text NOT NULL,
    status     text NOT NULL DEFAULT 'pending',
    attempts   integer NOT NULL DEFAULT 0,
    error      text,
    result     jsonb,
    -- who processed the item (host:pid): replicas sharing a run can be told apart
    worker     text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, item_key)
);
-- schemas created before the column existed
ALTER TABLE {schema}.run_items ADD COLUMN IF NOT EXISTS worker text;
