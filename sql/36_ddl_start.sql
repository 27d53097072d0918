-- Repeatable: re-applied by every `autoembed migrate`.
--
-- autoembed's indexes on a watched table (HNSW on the vectors, GIN on the text's tsvector
-- and on the metadata) must never make the application's DDL fail: retyping a column they
-- cover would otherwise fail when PostgreSQL rebuilds them ("function to_tsvector(regconfig,
-- newtype) does not exist"). Before an ALTER TABLE that changes a column's type on a
-- watched table, they are dropped; the worker builds them again, CONCURRENTLY, for the
-- table as it is then (searches scan meanwhile). Needs a superuser to migrate (event
-- triggers); see 35_ddl.sql.

CREATE OR REPLACE FUNCTION autoembed.on_ddl_start()
RETURNS event_trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    statement text := current_query();
    w record;
    idx record;
BEGIN
    IF current_setting('autoembed.in_ddl', true) = 'on' OR statement !~* '\mTYPE\M' THEN
        RETURN;
    END IF;
    PERFORM set_config('autoembed.in_ddl', 'on', true);
    -- the statement's target is not known before it runs: any watched table it names
    FOR w IN SELECT x.id, x.source, c.relname FROM autoembed.watches x JOIN pg_class c ON c.oid = x.source
              WHERE statement ~* ('\m' || regexp_replace(c.relname, '([^A-Za-z0-9_])', '\\\1', 'g') || '\M') LOOP
        BEGIN
            FOR idx IN SELECT i.indexrelid::regclass AS name FROM pg_index i
                        JOIN pg_class ic ON ic.oid = i.indexrelid
                       WHERE i.indrelid = w.source
                         AND ic.relname ~ ('_w' || w.id || '_(hnsw|fts|meta)$') LOOP
                EXECUTE format('DROP INDEX %s', idx.name);
            END LOOP;
            UPDATE autoembed.watches x SET index_state = 'deferred' WHERE x.id = w.id;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'autoembed: could not set aside the indexes of %: %', w.source, SQLERRM;
        END;
    END LOOP;
    PERFORM set_config('autoembed.in_ddl', 'off', true);
END
$$;

DO $ddl$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RETURN;  -- said by 35_ddl.sql
    END IF;
    DROP EVENT TRIGGER IF EXISTS autoembed_ddl_start;
    CREATE EVENT TRIGGER autoembed_ddl_start ON ddl_command_start
        WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION autoembed.on_ddl_start();
END
$ddl$;
