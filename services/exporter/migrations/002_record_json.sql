-- Keep ExportedStack records as written (json, not jsonb): sidecar key order must survive the
-- round trip, so that finalize recomputes byte-identical sidecars and rewrites none needlessly.
ALTER TABLE export.stack_export ALTER COLUMN record TYPE json USING record::json;
