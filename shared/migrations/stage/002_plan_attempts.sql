-- Planning attempts are counted before they are made, like items' attempts: a plan that cannot be
-- stored (or a service that dies while planning) fails its run after the maximum.
ALTER TABLE {schema}.runs ADD COLUMN IF NOT EXISTS plan_attempts integer NOT NULL DEFAULT 0;
