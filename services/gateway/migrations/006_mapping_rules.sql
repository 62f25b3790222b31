-- A cohort's mapping rules: corrections people make to the sorter's proposed BIDS names, kept as
-- versions (every save is a new row; nothing is updated or deleted but with the cohort), and the
-- current rule per (description, stack key), published for the exporter (shared.mapping_rules).

CREATE TABLE gateway.mapping_rules (
    cohort_id          uuid NOT NULL REFERENCES gateway.cohorts (id) ON DELETE CASCADE,
    version            integer NOT NULL,
    series_description text NOT NULL,
    stack_key          text NOT NULL,
    bids_datatype      text,
    bids_suffix        text,
    entities           jsonb NOT NULL DEFAULT '{}',
    excluded           boolean NOT NULL DEFAULT false,
    -- a withdrawn rule gives the stack back to the sorter
    withdrawn          boolean NOT NULL DEFAULT false,
    author             text NOT NULL,
    note               text NOT NULL DEFAULT '',
    -- the sorter's proposal the person saw when correcting
    proposed           jsonb NOT NULL DEFAULT '{}',
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cohort_id, version)
);
CREATE INDEX mapping_rules_match ON gateway.mapping_rules
    (cohort_id, lower(trim(series_description)), stack_key, version DESC);

CREATE VIEW gateway.mapping_rules_v AS
    SELECT * FROM (
        SELECT DISTINCT ON (cohort_id, lower(trim(series_description)), stack_key) *
        FROM gateway.mapping_rules
        ORDER BY cohort_id, lower(trim(series_description)), stack_key, version DESC
    ) newest
    WHERE NOT withdrawn;
