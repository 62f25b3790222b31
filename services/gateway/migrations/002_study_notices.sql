-- "new study" notices as CloudEvents: who sent it (the CloudEvent source and id, the sending system
-- and its AE titles), what the study held when it was announced (a fingerprint of its files), and
-- what came of it: accepted (a run started or none asked), a duplicate of an earlier notice (same
-- source and id, or the same files of the same study in the same cohort), or refused with a reason.
ALTER TABLE gateway.received_studies
    ADD COLUMN outcome text NOT NULL DEFAULT 'accepted'
        CHECK (outcome IN ('accepted', 'duplicate', 'refused')),
    ADD COLUMN notice_source text,
    ADD COLUMN notice_id text,
    ADD COLUMN notice_type text,
    ADD COLUMN sender jsonb,
    ADD COLUMN expected_instances integer,
    ADD COLUMN complete boolean,
    ADD COLUMN files integer,
    ADD COLUMN content_fingerprint text,
    ADD COLUMN duplicate_of bigint REFERENCES gateway.received_studies (seq) ON DELETE SET NULL;

UPDATE gateway.received_studies SET outcome = 'refused' WHERE refused_reason IS NOT NULL;

CREATE INDEX received_studies_notice ON gateway.received_studies (notice_source, notice_id)
    WHERE notice_id IS NOT NULL;
CREATE INDEX received_studies_content ON gateway.received_studies
    (cohort_id, study_instance_uid, content_fingerprint) WHERE outcome = 'accepted';
