-- Repeatable: re-applied by every `autoembed migrate`.
--
-- Rules every function here follows:
--   * search_path is pg_catalog, pg_temp (pg_temp is never searched for functions or
--     operators), and pgvector's type and operators are qualified with its schema;
--   * definer code and the worker evaluate no user-defined code: the columns a trigger
--     reads are of built-in types (their casts and operators can be changed by superusers
--     only), checked when the watch is made and again each time the trigger fires;
--   * text forms of keys do not depend on the session: functions that turn keys into text
--     pin DateStyle, IntervalStyle, TimeZone and extra_float_digits.

-- The schema pgvector lives in (public on a plain server, extensions on Supabase).
CREATE OR REPLACE FUNCTION autoembed.vector_schema()
RETURNS name
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT n.nspname
      FROM pg_extension e
      JOIN pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'vector'
$$;

CREATE OR REPLACE FUNCTION autoembed.vector_type(dim integer)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('%I.vector(%s)', autoembed.vector_schema(), dim)
$$;

-- The column type of a storage ('vector', or 'halfvec': half the size) and dimension.
CREATE OR REPLACE FUNCTION autoembed.storage_type(dim integer, storage text)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('%I.%I(%s)', autoembed.vector_schema(), storage, dim)
$$;

CREATE OR REPLACE FUNCTION autoembed.storage_oid(storage text)
RETURNS oid
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.oid FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
     WHERE t.typname = storage AND n.nspname = autoembed.vector_schema()
$$;

-- pgvector's version as a number (0.8.1 -> 801): iterative index scans need 0.8.
CREATE OR REPLACE FUNCTION autoembed.vector_version()
RETURNS integer
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (split_part(extversion, '.', 1)::int * 100 + split_part(extversion, '.', 2)::int) * 100
           + coalesce(nullif(regexp_replace(split_part(extversion, '.', 3), '\D.*', ''), '')::int, 0)
      FROM pg_extension WHERE extname = 'vector'
$$;

-- The lanes a watch queues work on: always 'embed', and 'summary' when it has a summary column.
CREATE OR REPLACE FUNCTION autoembed.lanes(summary_column name)
RETURNS text[]
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN summary_column IS NULL THEN ARRAY['embed'] ELSE ARRAY['embed', 'summary'] END
$$;

-- The lanes a watch queues work on now: 'next' while a model change builds new vectors.
CREATE OR REPLACE FUNCTION autoembed.watch_lanes(watch_id integer)
RETURNS text[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY['embed']
           || CASE WHEN w.summary_attnum IS NULL THEN '{}'::text[] ELSE ARRAY['summary'] END
           || CASE WHEN w.next_attnum IS NULL THEN '{}'::text[] ELSE ARRAY['next'] END
      FROM autoembed.watches w WHERE w.id = watch_id
$$;

-- A built-in base type (or an array of one): its casts to text and its operators belong
-- to the bootstrap superuser, so comparing and printing it runs no user-defined code.
CREATE OR REPLACE FUNCTION autoembed._builtin_type(typ oid)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT typ < 16384 AND EXISTS (SELECT FROM pg_type t WHERE t.oid = typ AND t.typtype = 'b')
$$;

-- The key types a watch accepts: built-in, with an exact, session-independent text form
-- (given the settings the queue functions pin) and a default btree equality.
CREATE OR REPLACE FUNCTION autoembed._key_type(typ oid)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT typ = ANY (ARRAY['int2', 'int4', 'int8', 'numeric', 'text', 'varchar', 'bpchar',
                            'uuid', 'date', 'timestamp', 'timestamptz']::regtype[]::oid[])
$$;

-- The text types a summary may be written to.
CREATE OR REPLACE FUNCTION autoembed._text_type(typ oid)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT typ = ANY (ARRAY['text', 'varchar', 'bpchar']::regtype[]::oid[])
$$;

-- The current name of a column (NULL when it was dropped, or the table is gone).
CREATE OR REPLACE FUNCTION autoembed._attname(rel oid, num smallint)
RETURNS name
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT a.attname FROM pg_attribute a
     WHERE a.attrelid = rel AND a.attnum = num AND a.attnum > 0 AND NOT a.attisdropped
$$;

-- The attribute number of a chunk table's embedding column.
CREATE OR REPLACE FUNCTION autoembed._chunk_embedding(tbl oid)
RETURNS smallint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = 'embedding' AND NOT a.attisdropped
$$;

-- The attribute numbers of columns given by name, in order; an unknown name is refused.
CREATE OR REPLACE FUNCTION autoembed._attnums(rel regclass, names name[], what text)
RETURNS smallint[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n name;
    num smallint;
    typ oid;
    out smallint[] := '{}';
BEGIN
    FOREACH n IN ARRAY names LOOP
        SELECT a.attnum, a.atttypid INTO num, typ FROM pg_attribute a
         WHERE a.attrelid = rel AND a.attname = n AND a.attnum > 0 AND NOT a.attisdropped;
        IF num IS NULL THEN
            RAISE EXCEPTION 'autoembed: table % has no column "%" (%)', rel, n, what
                USING HINT = format('Its columns are: %s.', (
                    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
                      FROM pg_attribute a WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped)),
                      ERRCODE = 'undefined_column';
        END IF;
        IF NOT autoembed._builtin_type(typ) THEN
            RAISE EXCEPTION 'autoembed: column %.% is of type %, which autoembed does not read (%)',
                rel, n, format_type(typ, NULL), what
                USING HINT = 'A watched column must be of a built-in type (text, varchar, jsonb, '
                             'numbers, dates...): its text form and comparisons then run no '
                             'user-defined code. Watch a generated column or a view of it cast to text.',
                      ERRCODE = 'datatype_mismatch';
        END IF;
        out := out || num;
    END LOOP;
    RETURN out;
END
$$;

-- What is wrong with a watch now (NULL: nothing): its table, key or columns were dropped or
-- retyped after it was made. Such a watch is not served, its triggers queue the rows written
-- meanwhile (and warn), and `autoembed status` shows this text.
CREATE OR REPLACE FUNCTION autoembed.watch_problem(watch_id integer)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w autoembed.watches%ROWTYPE;
    a record;
    num smallint;
    vtype oid;
BEGIN
    SELECT * INTO w FROM autoembed.watches x WHERE x.id = watch_id;
    IF NOT FOUND THEN
        RETURN 'no such watch';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = w.source) THEN
        RETURN format('table %s was dropped: `autoembed unwatch %s` removes the watch', w.source::oid, w.id);
    END IF;
    SELECT at.attname, at.atttypid INTO a FROM pg_attribute at
     WHERE at.attrelid = w.source AND at.attnum = w.pk_attnum AND NOT at.attisdropped;
    IF a.attname IS NULL THEN
        RETURN format('its key column %I was dropped', w.pk_column);
    END IF;
    IF NOT autoembed._key_type(a.atttypid) THEN
        RETURN format('its key column %I is now of type %s, which autoembed does not accept',
                      a.attname, format_type(a.atttypid, NULL));
    END IF;
    IF NOT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = w.source AND i.indisprimary
                      AND i.indnkeyatts = 1 AND i.indkey[0] = w.pk_attnum) THEN
        RETURN format('%I is no longer its primary key', a.attname);
    END IF;
    FOREACH num IN ARRAY w.embed_inputs || coalesce(w.summary_inputs, '{}') LOOP
        SELECT at.attname, at.atttypid INTO a FROM pg_attribute at
         WHERE at.attrelid = w.source AND at.attnum = num AND NOT at.attisdropped;
        IF a.attname IS NULL THEN
            RETURN 'a column it reads was dropped: watch the table again with the column it should read';
        END IF;
        IF NOT autoembed._builtin_type(a.atttypid) THEN
            RETURN format('column %I is now of type %s, which autoembed does not read',
                          a.attname, format_type(a.atttypid, NULL));
        END IF;
    END LOOP;
    IF w.embedding_attnum IS NOT NULL THEN
        vtype := autoembed.storage_oid(w.storage);
        SELECT at.attname, at.atttypid, at.atttypmod INTO a FROM pg_attribute at
         WHERE at.attrelid = w.source AND at.attnum = w.embedding_attnum AND NOT at.attisdropped;
        IF a.attname IS NULL THEN
            RETURN format('its vector column %I was dropped', w.embedding_column);
        END IF;
        IF a.atttypid <> vtype OR a.atttypmod <> w.dim THEN
            RETURN format('its vector column %I is now %s, not %s(%s)',
                          a.attname, format_type(a.atttypid, a.atttypmod), w.storage, w.dim);
        END IF;
    END IF;
    IF w.chunking IS NOT NULL AND (w.chunk_table IS NULL OR NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = w.chunk_table)) THEN
        RETURN 'its chunk table was dropped: `autoembed unwatch` it, then watch the table again';
    END IF;
    IF w.metadata_attnum IS NOT NULL THEN
        SELECT at.attname, at.atttypid INTO a FROM pg_attribute at
         WHERE at.attrelid = w.source AND at.attnum = w.metadata_attnum AND NOT at.attisdropped;
        IF a.attname IS NULL OR a.atttypid <> 'jsonb'::regtype THEN
            RETURN 'its metadata column was dropped or is no longer jsonb';
        END IF;
    END IF;
    IF w.summary_attnum IS NOT NULL THEN
        SELECT at.attname, at.atttypid INTO a FROM pg_attribute at
         WHERE at.attrelid = w.source AND at.attnum = w.summary_attnum AND NOT at.attisdropped;
        IF a.attname IS NULL OR NOT autoembed._text_type(a.atttypid) THEN
            RETURN format('its summary column %I was dropped or is no longer text', w.summary_column);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

-- Register (or update) a model that is not in the registry, e.g. a model directory.
CREATE OR REPLACE FUNCTION autoembed.register_model(
    model_name text,
    dim integer,
    max_tokens integer DEFAULT NULL,
    description text DEFAULT NULL
)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    known autoembed.models%ROWTYPE;
BEGIN
    SELECT * INTO known FROM autoembed.models m WHERE m.name = model_name;
    IF FOUND AND known.dim <> dim THEN
        RAISE EXCEPTION 'autoembed: model "%" is registered with % dimensions, not %',
            model_name, known.dim, dim
            USING HINT = 'Give the model directory another name, or unwatch the tables that use it first.',
                  ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO autoembed.models AS m (name, dim, max_tokens, description)
    VALUES (model_name, dim, max_tokens, description)
    ON CONFLICT (name) DO UPDATE
        SET max_tokens = EXCLUDED.max_tokens,
            description = coalesce(EXCLUDED.description, m.description);
END
$$;
