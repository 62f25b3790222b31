-- Studies that arrive in pieces: a notice that does not assert completeness waits until the study's
-- files have not changed for the cohort's quiet period, then starts its run (services/gateway/
-- handlers.py, StudyWatcher). 0 starts at once.
ALTER TABLE gateway.cohorts
    ADD COLUMN study_quiet_period_s integer NOT NULL DEFAULT 60 CHECK (study_quiet_period_s >= 0);

ALTER TABLE gateway.received_studies
    DROP CONSTRAINT received_studies_outcome_check,
    ADD CONSTRAINT received_studies_outcome_check
        CHECK (outcome IN ('accepted', 'duplicate', 'refused', 'waiting')),
    ADD COLUMN last_change_at timestamptz;
CREATE INDEX received_studies_waiting ON gateway.received_studies (cohort_id, study_instance_uid)
    WHERE outcome = 'waiting';
