-- Every change to a job notifies `cohortflow_jobs` with its run's id, sent by Postgres at commit
-- (never for a change rolled back): requests held until a run's jobs change (`GET /api/jobs` with
-- `Prefer: wait`, services/gateway/job_watch.py) answer at once, whichever replica changed it.
CREATE FUNCTION gateway.notify_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cohortflow_jobs', NEW.run_id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE ON gateway.jobs
    FOR EACH ROW EXECUTE FUNCTION gateway.notify_job_changed();
