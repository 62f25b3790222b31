-- Which subject each study belongs to and its original StudyDate (encrypted), recorded when the
-- plan first reads the study's files: timepoint labels (M00, M06, ...) count months from the
-- subject's earliest recorded study, so every study of a run is labelled against the same baseline.
CREATE TABLE IF NOT EXISTS anonymizer.study_subject (
    study_key   text PRIMARY KEY,          -- HMAC of the original StudyInstanceUID
    subject_key text NOT NULL,             -- HMAC(secret, issuer \ PatientID)
    study_date  bytea,                     -- encrypted YYYYMMDD, NULL when the study has none
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS study_subject_subject ON anonymizer.study_subject (subject_key);
