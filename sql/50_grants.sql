-- Repeatable: re-applied by every `autoembed migrate`.

-- What a dedicated least-privilege worker role needs, granted in one call:
--   SELECT autoembed.grant_worker('autoembed_worker');
-- It may read the queue and the watches, take and finish jobs, read the watched text, and
-- write only the vector (and summary) columns. Call it again after watching a new table.
-- Row-level security on a watched table also applies to the worker: give the role
-- BYPASSRLS, or a policy that lets it see and update every row.
CREATE OR REPLACE FUNCTION autoembed.grant_worker(role_name name)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w autoembed.watches%ROWTYPE;
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA autoembed TO %I', role_name);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', autoembed.vector_schema(), role_name);
    EXECUTE format('GRANT SELECT ON autoembed.watches, autoembed.models, autoembed.status, '
                   'autoembed.failed_jobs TO %I', role_name);
    EXECUTE format('GRANT SELECT, UPDATE, DELETE ON autoembed.jobs TO %I', role_name);
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON autoembed.throughput TO %I', role_name);
    FOR w IN SELECT * FROM autoembed.watches LOOP
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I',
                       (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE c.oid = w.source), role_name);
        EXECUTE format('GRANT SELECT (%I, %I) ON %s TO %I',
                       w.pk_column, w.content_column, w.source, role_name);
        EXECUTE format('GRANT UPDATE (%I) ON %s TO %I', w.embedding_column, w.source, role_name);
        IF w.summary_column IS NOT NULL THEN
            -- a prompt template may use any column of the row
            EXECUTE format('GRANT SELECT, UPDATE (%I) ON %s TO %I',
                           w.summary_column, w.source, role_name);
        END IF;
    END LOOP;
END
$$;
