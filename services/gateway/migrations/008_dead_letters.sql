-- Dead letters: what the stage services gave up on (cohortflow.dlq.<stage>), kept for a person to
-- list, look at, replay or discard (docs/adr-0022-dead-letters.md). One row per DeadLetter envelope.
CREATE TABLE gateway.dead_letters (
    id               uuid PRIMARY KEY,          -- the DeadLetter envelope's id
    stage            text NOT NULL
                     CHECK (stage IN ('anonymization', 'extraction', 'sorting', 'export')),
    -- item: a work item given up on; plan: a run's request whose plan could not be made or stored;
    -- message: a message that was not a valid envelope or whose payload did not validate
    kind             text NOT NULL CHECK (kind IN ('item', 'plan', 'message')),
    topic            text NOT NULL,             -- where the message given up on was consumed
    cohort_id        uuid REFERENCES gateway.cohorts (id) ON DELETE CASCADE,
    job_id           uuid,
    correlation_id   uuid,
    item_key         text,
    error            text NOT NULL,
    attempts         integer NOT NULL,
    original         jsonb NOT NULL,            -- the payload given up on, as it was sent
    source           text NOT NULL,
    status           text NOT NULL DEFAULT 'open'
                     CHECK (status IN ('open', 'replayed', 'discarded')),
    replay_run_id    uuid REFERENCES gateway.pipeline_runs (id) ON DELETE SET NULL,
    note             text,
    dead_at          timestamptz NOT NULL,      -- when the stage gave up
    received_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at      timestamptz
);
CREATE INDEX dead_letters_listing ON gateway.dead_letters (status, stage, received_at DESC);
CREATE INDEX dead_letters_cohort ON gateway.dead_letters (cohort_id);

-- a replay is a run of its own (docs/adr-0022-dead-letters.md)
ALTER TABLE gateway.pipeline_runs DROP CONSTRAINT pipeline_runs_kind_check;
ALTER TABLE gateway.pipeline_runs
    ADD CONSTRAINT pipeline_runs_kind_check CHECK (kind IN ('stage', 'pipeline', 'study', 'replay'));
