-- The gateway's schema: cohorts, pipeline runs and their jobs, the job transition log, received
-- studies, and the inbox that makes event handling idempotent. `gateway.outbox` is created by
-- shared.db.migrate. Secrets never land here: job configs are stored redacted.

CREATE TABLE gateway.cohorts (
    id                    uuid PRIMARY KEY,
    name                  text NOT NULL,
    source_path           text NOT NULL,
    description           text NOT NULL DEFAULT '',
    owner                 text NOT NULL DEFAULT '',
    tags                  jsonb NOT NULL DEFAULT '[]',
    anonymization_enabled boolean NOT NULL DEFAULT false,
    status                text NOT NULL DEFAULT 'idle'
                          CHECK (status IN ('idle', 'in_progress', 'completed')),
    total_subjects        integer NOT NULL DEFAULT 0,
    total_sessions        integer NOT NULL DEFAULT 0,
    total_series          integer NOT NULL DEFAULT 0,
    total_instances       bigint NOT NULL DEFAULT 0,
    completion_percentage double precision NOT NULL DEFAULT 0,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
-- names are unique regardless of case: "MS_Study" and "ms_study" would be the same cohort to people
CREATE UNIQUE INDEX cohorts_name_key ON gateway.cohorts (lower(name));

-- one request to run stages: a single stage, a pipeline, or a scoped run for a received study
CREATE TABLE gateway.pipeline_runs (
    id                  uuid PRIMARY KEY,
    cohort_id           uuid NOT NULL REFERENCES gateway.cohorts (id) ON DELETE CASCADE,
    kind                text NOT NULL CHECK (kind IN ('stage', 'pipeline', 'study')),
    study_instance_uids text[] NOT NULL DEFAULT '{}',
    location            text,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE gateway.jobs (
    id                  uuid PRIMARY KEY,
    cohort_id           uuid NOT NULL REFERENCES gateway.cohorts (id) ON DELETE CASCADE,
    run_id              uuid NOT NULL REFERENCES gateway.pipeline_runs (id) ON DELETE CASCADE,
    position            integer NOT NULL,
    stage               text NOT NULL
                        CHECK (stage IN ('anonymization', 'extraction', 'sorting', 'export')),
    scoped              boolean NOT NULL DEFAULT false,
    status              text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    status_reason       text,
    config              jsonb NOT NULL DEFAULT '{}',
    progress            double precision NOT NULL DEFAULT 0,
    items_total         integer NOT NULL DEFAULT 0,
    items_done          integer NOT NULL DEFAULT 0,
    items_failed        integer NOT NULL DEFAULT 0,
    errors              jsonb NOT NULL DEFAULT '[]',
    summary             jsonb NOT NULL DEFAULT '{}',
    output_prefix       text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, position)
);
CREATE INDEX jobs_cohort_stage ON gateway.jobs (cohort_id, stage, created_at DESC);
CREATE INDEX jobs_status ON gateway.jobs (status);

-- every status transition of every job, with what caused it
CREATE TABLE gateway.job_events (
    seq         bigserial PRIMARY KEY,
    job_id      uuid NOT NULL REFERENCES gateway.jobs (id) ON DELETE CASCADE,
    cohort_id   uuid NOT NULL,
    from_status text,
    to_status   text NOT NULL,
    reason      text,
    event_id    uuid,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_events_job ON gateway.job_events (job_id, seq);

-- "new study" notices from other systems (Kafka or HTTP), accepted or refused
CREATE TABLE gateway.received_studies (
    seq                bigserial PRIMARY KEY,
    event_id           uuid,
    cohort_id          uuid REFERENCES gateway.cohorts (id) ON DELETE CASCADE,
    study_instance_uid text NOT NULL,
    location           text NOT NULL,
    origin             text NOT NULL CHECK (origin IN ('http', 'kafka')),
    run_id             uuid,
    refused_reason     text,
    received_at        timestamptz NOT NULL DEFAULT now()
);

-- consumed events already applied (at-least-once delivery: a redelivery is a no-op)
CREATE TABLE gateway.inbox (
    event_id    uuid PRIMARY KEY,
    type        text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- published for the stage workers, which read it between items: stop when cancelled
CREATE VIEW gateway.job_control_v AS
    SELECT id AS job_id, status = 'cancelled' AS cancelled FROM gateway.jobs;
