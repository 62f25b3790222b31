-- Sorting results: one fingerprint and one classification per stack and rule version.

CREATE TABLE IF NOT EXISTS sorting.stack_fingerprint (
    cohort_id           uuid NOT NULL,
    series_instance_uid text NOT NULL,
    stack_key           text NOT NULL,
    fingerprint_version text NOT NULL,
    features            jsonb NOT NULL,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cohort_id, series_instance_uid, stack_key)
);

CREATE TABLE IF NOT EXISTS sorting.series_classification (
    cohort_id           uuid NOT NULL,
    series_instance_uid text NOT NULL,
    stack_key           text NOT NULL,
    rule_version        text NOT NULL,
    study_instance_uid  text NOT NULL,
    base                text,
    technique           text,
    modifiers           text[] NOT NULL DEFAULT '{}',
    constructs          text[] NOT NULL DEFAULT '{}',
    provenance          text,
    acceleration        text[] NOT NULL DEFAULT '{}',
    post_contrast       boolean,
    localizer           boolean,
    spinal_cord         boolean,
    intent              text NOT NULL,
    bids_datatype       text,
    bids_suffix         text,
    entities            jsonb NOT NULL DEFAULT '{}',
    confidence          float8 NOT NULL,
    review_required     boolean NOT NULL,
    review_reasons      text[] NOT NULL DEFAULT '{}',
    excluded_reason     text,
    evidence            jsonb NOT NULL DEFAULT '[]',
    detail              jsonb NOT NULL DEFAULT '{}',
    job_id              uuid,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cohort_id, series_instance_uid, stack_key, rule_version)
);

-- the current classification of every stack: the newest rule version that classified it
CREATE OR REPLACE VIEW sorting.classification_v AS
SELECT DISTINCT ON (cohort_id, series_instance_uid, stack_key)
       cohort_id, series_instance_uid, stack_key, rule_version, study_instance_uid, base, technique,
       modifiers, constructs, provenance, acceleration, post_contrast, localizer, spinal_cord, intent,
       bids_datatype, bids_suffix, entities, confidence, review_required, review_reasons,
       excluded_reason, updated_at
FROM sorting.series_classification
ORDER BY cohort_id, series_instance_uid, stack_key, updated_at DESC;
