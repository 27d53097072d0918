-- Repeatable: re-applied by every `autoembed migrate`.
--
-- Who may run what:
--   PUBLIC             nothing that writes: the read-only helpers only (and no USAGE on
--                      the schema unless an admin grants it).
--   autoembed_definer  owns the SECURITY DEFINER functions; may queue jobs and read watches.
--   autoembed_workers  the worker's group (autoembed.grant_worker(role) adds a role): the
--                      queue, the watches, and each watch's accessor functions (granted as
--                      they are made), never the watched tables themselves.

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA autoembed FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    autoembed.vector_schema(), autoembed.vector_type(integer), autoembed.lanes(name),
    autoembed.storage_type(integer, text), autoembed.storage_oid(text), autoembed.vector_version(),
    autoembed.watch_lanes(integer), autoembed._builtin_type(oid), autoembed._key_type(oid),
    autoembed._text_type(oid), autoembed._attname(oid, smallint), autoembed.watch_problem(integer),
    autoembed._hnsw_index(oid, smallint), autoembed._template_columns(text),
    autoembed._enqueue_sql(text, text), autoembed._inputs_sql(oid, smallint[], boolean),
    autoembed._chunk_embedding(oid), autoembed.bulk_rows()
    TO PUBLIC;

-- the definer functions belong to autoembed_definer, which may do what they do and no more
GRANT USAGE ON SCHEMA autoembed TO autoembed_definer;
GRANT SELECT ON autoembed.watches, autoembed.models TO autoembed_definer;
GRANT UPDATE (model, dim, embedding_attnum, next_model, next_dim, next_attnum, index_note, version,
              chunk_table, next_chunk_table,
              index_state)
    ON autoembed.watches TO autoembed_definer;
GRANT SELECT, INSERT, UPDATE, DELETE ON autoembed.jobs TO autoembed_definer;
GRANT EXECUTE ON FUNCTION autoembed._lock_watch(integer), autoembed._hnsw_index(oid, smallint)
    TO autoembed_definer;
ALTER FUNCTION autoembed.queue_changes() OWNER TO autoembed_definer;
ALTER FUNCTION autoembed.forget_rows() OWNER TO autoembed_definer;
ALTER FUNCTION autoembed.enqueue(integer, text[]) OWNER TO autoembed_definer;
ALTER FUNCTION autoembed.finish_migration(integer) OWNER TO autoembed_definer;
ALTER FUNCTION autoembed.index_built(integer) OWNER TO autoembed_definer;

-- the worker's group
GRANT USAGE ON SCHEMA autoembed TO autoembed_workers;
GRANT SELECT ON autoembed.watches, autoembed.models, autoembed.status, autoembed.failed_jobs
    TO autoembed_workers;
GRANT SELECT, UPDATE, DELETE ON autoembed.jobs TO autoembed_workers;
GRANT SELECT, INSERT, DELETE ON autoembed.throughput TO autoembed_workers;
GRANT SELECT, INSERT, UPDATE, DELETE ON autoembed.workers TO autoembed_workers;
GRANT EXECUTE ON FUNCTION
    autoembed.hold_watch(integer), autoembed.enqueue(integer, text[]),
    autoembed.finish_migration(integer), autoembed.index_sql(integer, boolean),
    autoembed.index_built(integer)
    TO autoembed_workers;
DO $grant$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO autoembed_workers', autoembed.vector_schema());
END
$grant$;

-- What a dedicated least-privilege worker role needs, granted in one call:
--   SELECT autoembed.grant_worker('autoembed_worker');
-- Membership of autoembed_workers: the queue, and each watch's accessor functions (which
-- read and write the table as its owner, so the worker needs no grant on any watched table,
-- and row-level security does not hide rows from it unless FORCE ROW LEVEL SECURITY is on).
-- New watches need no second call.
CREATE OR REPLACE FUNCTION autoembed.grant_worker(role_name name)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('GRANT autoembed_workers TO %I', role_name);
END
$$;
REVOKE EXECUTE ON FUNCTION autoembed.grant_worker(name) FROM PUBLIC;
