-- Per-cohort routing rules for "new study" notices that do not name their cohort
-- (services/gateway/routing.py): the conditions as JSON, the priority as a column to order by.
CREATE TABLE gateway.routing_rules (
    id         uuid PRIMARY KEY,
    cohort_id  uuid NOT NULL REFERENCES gateway.cohorts (id) ON DELETE CASCADE,
    rule       jsonb NOT NULL,
    priority   integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX routing_rules_cohort ON gateway.routing_rules (cohort_id, priority);
