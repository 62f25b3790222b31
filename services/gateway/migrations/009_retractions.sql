-- Retracted studies: a `study.retracted.v1` notice leaves the study out of its cohort's next export
-- (the exporter reads gateway.retracted_studies_v when it plans); a later `study.available.v1` for
-- the same study takes the retraction back (the row is deleted). docs/adr-0021-study-notices-and-outbound-events.md.
CREATE TABLE gateway.retracted_studies (
    cohort_id          uuid NOT NULL REFERENCES gateway.cohorts (id) ON DELETE CASCADE,
    study_instance_uid text NOT NULL,
    reason             text NOT NULL,
    notice             bigint,                  -- the retraction's row in received_studies
    retracted_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cohort_id, study_instance_uid)
);

CREATE VIEW gateway.retracted_studies_v AS
    SELECT cohort_id, study_instance_uid, reason, retracted_at FROM gateway.retracted_studies;

ALTER TABLE gateway.received_studies
    DROP CONSTRAINT received_studies_outcome_check,
    ADD CONSTRAINT received_studies_outcome_check
        CHECK (outcome IN ('accepted', 'duplicate', 'refused', 'waiting', 'retracted'));
