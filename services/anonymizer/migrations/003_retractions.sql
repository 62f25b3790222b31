-- Retracted studies of anonymized cohorts (docs/adr-0025-retraction-in-anonymized-cohorts.md): the
-- gateway sends the original StudyInstanceUID, sealed, on cohortflow.anonymization.retractions;
-- only this service can tell which de-identified study it became (`new_uid` under the project's
-- core secret), so it records the retraction under that UID and publishes it to the exporter. The
-- original is not stored: the de-identified UID is itself a keyed hash of it.
CREATE TABLE IF NOT EXISTS anonymizer.retracted_study (
    cohort_id          uuid NOT NULL,
    study_instance_uid text NOT NULL,          -- the de-identified StudyInstanceUID
    retracted          boolean NOT NULL,       -- false: announced available again
    reason             text NOT NULL,          -- `retracted by <source> (notice <n>)`, no free text
    changed_at         timestamptz NOT NULL,   -- the gateway's time: an older message changes nothing
    PRIMARY KEY (cohort_id, study_instance_uid)
);

CREATE OR REPLACE VIEW anonymizer.retracted_studies_v AS
    SELECT cohort_id, study_instance_uid, reason, changed_at AS retracted_at
    FROM anonymizer.retracted_study WHERE retracted;
