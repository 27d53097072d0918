-- Repeatable: re-applied by every `autoembed migrate`.
--
-- autoembed's indexes on a watched table (HNSW on the vectors, GIN on the text's tsvector
-- and on the metadata) must never make the application's DDL fail: retyping a column they
-- cover would otherwise fail when PostgreSQL rebuilds them ("functions in index expression
-- must be marked IMMUTABLE" for an enum, "operator class vector_cosine_ops does not accept
-- data type halfvec"). Before an ALTER TABLE that may change the type of a column one of
-- them covers, that index is dropped; the worker builds it again, CONCURRENTLY, for the
-- table as it is then (searches scan meanwhile). A ddl_command_start trigger sees only the
-- statement's text: an index is dropped when the text says TYPE and names both a watched
-- table and a column the index depends on (pg_depend), so retyping another column costs no
-- rebuild, and a false match costs one rebuild, never a failed statement. Needs a
-- superuser to migrate (event triggers); see 35_ddl.sql.

-- Whether a statement's text may name an object called ``name``: as a word (any case) for
-- a name that needs no quotes, anywhere (any case, as written or quoted) for others.
CREATE OR REPLACE FUNCTION autoembed._may_name(statement text, name text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN name ~ '^[a-z_][a-z0-9_$]*$'
                THEN statement ~* ('\m' || regexp_replace(name, '([^A-Za-z0-9_])', '\\\1', 'g') || '(?![A-Za-z0-9_$])')
                ELSE strpos(lower(statement), lower(name)) > 0
                  OR strpos(lower(statement), lower(quote_ident(name))) > 0 END
$$;

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
    dropped boolean;
BEGIN
    IF current_setting('autoembed.in_ddl', true) = 'on' OR statement !~* '\mTYPE\M' THEN
        RETURN;
    END IF;
    PERFORM set_config('autoembed.in_ddl', 'on', true);
    -- the statement's target is not known before it runs: any watched table it names, and
    -- of its indexes those that depend on a column it names
    FOR w IN SELECT x.id, x.source FROM autoembed.watches x JOIN pg_class c ON c.oid = x.source
              WHERE autoembed._may_name(statement, c.relname) LOOP
        BEGIN
            dropped := false;
            FOR idx IN SELECT i.indexrelid::regclass AS name FROM pg_index i
                        JOIN pg_class ic ON ic.oid = i.indexrelid
                       WHERE i.indrelid = w.source
                         AND ic.relname ~ ('_w' || w.id || '_(hnsw|fts|meta)$')
                         AND EXISTS (SELECT FROM pg_depend d
                                       JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                                      WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                                        AND d.refclassid = 'pg_class'::regclass AND d.refobjid = w.source
                                        AND d.refobjsubid > 0
                                        AND autoembed._may_name(statement, a.attname)) LOOP
                EXECUTE format('DROP INDEX %s', idx.name);
                dropped := true;
            END LOOP;
            IF dropped THEN
                UPDATE autoembed.watches x SET index_state = 'deferred' WHERE x.id = w.id;
            END IF;
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
