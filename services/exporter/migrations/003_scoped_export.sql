-- Scoped ("new study") exports re-plan only the subjects of their studies and carry every other
-- subject over from the previous export (ADR 0024).

-- the subject a file belongs to (`sub-<label>` anywhere in its path: raw, derivatives, sourcedata);
-- NULL for the files at the dataset's root, which every export writes itself
ALTER TABLE export.manifest ADD COLUMN IF NOT EXISTS subject text
    GENERATED ALWAYS AS (substring(path from '(?:^|/)sub-([A-Za-z0-9]+)/')) STORED;
CREATE INDEX IF NOT EXISTS manifest_subject ON export.manifest (job_id, subject);

-- one row per export job: the options that shape its tree, the subjects it planned (NULL: the
-- whole cohort), the export it carried the others from, and when its tree was complete
CREATE TABLE IF NOT EXISTS export.tree (
    job_id       uuid PRIMARY KEY,
    cohort_id    uuid NOT NULL,
    options      jsonb NOT NULL,
    subjects     text[],
    carried_from uuid,
    finalized_at timestamptz
);
CREATE INDEX IF NOT EXISTS tree_cohort ON export.tree (cohort_id, finalized_at);

-- what each subject adds to the dataset-level files (services.exporter.bids.SubjectPart), per job
CREATE TABLE IF NOT EXISTS export.subject_part (
    job_id    uuid NOT NULL,
    cohort_id uuid NOT NULL,
    subject   text NOT NULL,
    part      json NOT NULL,
    PRIMARY KEY (job_id, subject)
);
