-- A scoped export reads a few subjects' studies and stacks (ADR 0024): look them up by subject and
-- by study without scanning the cohort.
CREATE INDEX IF NOT EXISTS study_subject ON catalog.study (cohort_id, subject_id);
CREATE INDEX IF NOT EXISTS series_study ON catalog.series (cohort_id, study_instance_uid);
