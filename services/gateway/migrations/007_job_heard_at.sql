-- when a stage service last reported on the job (progress or heartbeat): a job nobody reported on
-- for COHORTFLOW_STALL_AFTER_S is marked stalled in its status_reason (docs/adr-0019-supervision.md)
ALTER TABLE gateway.jobs ADD COLUMN heard_at timestamptz;
