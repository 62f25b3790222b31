-- A streamed pipeline run (ADR 0023) creates its later stages' runs from the start, open: their
-- studies arrive one by one from the stage before, and a run completes only once that stage
-- closed it (`upstream_open` false) and every item has ended.
ALTER TABLE {schema}.runs ADD COLUMN IF NOT EXISTS upstream_open boolean NOT NULL DEFAULT false;
