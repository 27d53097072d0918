-- Repeatable: re-applied by every `autoembed migrate`.
--
-- A watch hangs these on its table: four queue triggers (insert, update, delete, truncate),
-- an HNSW cosine index, the search function match_<table>, and accessor functions
-- (autoembed.w<id>_read, _write, _keys, _swap) through which the worker reads and writes the
-- table. The accessors are SECURITY DEFINER functions owned by the table's owner: whatever
-- user code a read or write of the table runs (its triggers, constraints, policies,
-- defaults, casts of its own types), it runs as the owner, who could run it anyway, and
-- never as the worker or the admin (a definer function cannot SET ROLE back). Table owners
-- have no USAGE on the autoembed schema, so they cannot alter these functions.

DROP FUNCTION IF EXISTS autoembed._install(integer, name);
DROP FUNCTION IF EXISTS autoembed._install(integer, name, boolean);
DROP FUNCTION IF EXISTS autoembed._requeue(integer, boolean);
DROP FUNCTION IF EXISTS autoembed.watch(regclass, name, name, text, name, name, text, text, jsonb);
DROP FUNCTION IF EXISTS autoembed.watch(regclass, name, name, text, name, name, text, text, jsonb, text, text);
DROP FUNCTION IF EXISTS autoembed.watch(regclass, name, name, text, name, name, text, text, jsonb, text, text, name, text, text);

-- The placeholders of a format template ("{title}: {body}"), in order of first appearance;
-- "{{" and "}}" are literal braces. The worker renders templates with Python's str.format.
CREATE OR REPLACE FUNCTION autoembed._template_columns(template text)
RETURNS name[]
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    plain text := replace(replace(template, '{{', ''), '}}', '');
    m text[];
    out name[] := '{}';
BEGIN
    FOR m IN SELECT regexp_matches(plain, '\{([^{}!:]*)(![rsa])?(:[^{}]*)?\}', 'g') LOOP
        IF m[1] = '' OR m[1] ~ '[.\[\]]' THEN
            RAISE EXCEPTION 'autoembed: template placeholder {%} must name a column', m[1]
                USING HINT = 'Write {column_name}; literal braces are {{ and }}.',
                      ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT (m[1]::name = ANY (out)) THEN
            out := out || m[1]::name;
        END IF;
    END LOOP;
    IF regexp_replace(plain, '\{[^{}]*\}', '', 'g') ~ '[{}]' THEN
        RAISE EXCEPTION 'autoembed: template % has an unmatched brace', quote_literal(template)
            USING HINT = 'Literal braces are written {{ and }}.', ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(out) = 0 THEN
        RAISE EXCEPTION 'autoembed: template % uses no column', quote_literal(template)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN out;
END
$$;

-- The HNSW index on a column (NULL: none).
CREATE OR REPLACE FUNCTION autoembed._hnsw_index(rel oid, num smallint)
RETURNS regclass
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT i.indexrelid::regclass
      FROM pg_index i
      JOIN pg_class c ON c.oid = i.indexrelid
      JOIN pg_am am ON am.oid = c.relam
     WHERE i.indrelid = rel AND am.amname = 'hnsw' AND i.indnkeyatts = 1 AND i.indkey[0] = num
       AND i.indisvalid
     LIMIT 1
$$;

-- The statement that builds a watch's missing HNSW index (on the vector column, or on the
-- shadow column of a model change), with a name of its own (NULL: nothing to build).
CREATE OR REPLACE FUNCTION autoembed.index_sql(watch_id integer, online boolean DEFAULT true)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w autoembed.watches%ROWTYPE;
    num smallint;
    col name;
    rel name;
    how text := CASE WHEN online THEN 'CONCURRENTLY' ELSE '' END;
    p record;
BEGIN
    SELECT * INTO w FROM autoembed.watches x WHERE x.id = watch_id;
    rel := (SELECT relname FROM pg_class WHERE oid = w.source);
    IF rel IS NULL THEN
        RETURN NULL;
    END IF;
    IF w.chunking IS NOT NULL THEN
        RETURN autoembed._chunk_index_sql(w, how);
    END IF;
    -- 1. HNSW on the vector column (or the shadow column of a model change)
    num := coalesce(w.next_attnum, w.embedding_attnum);
    col := autoembed._attname(w.source, num);
    IF col IS NOT NULL AND autoembed._hnsw_index(w.source, num) IS NULL THEN
        RETURN format('CREATE INDEX %s %I ON %s USING hnsw (%I %I.%I)', how,
                      left(rel || '_' || col, 48) || '_w' || w.id || '_hnsw',
                      w.source, col, autoembed.vector_schema(), w.storage || '_cosine_ops');
    END IF;
    -- 2. GIN on the text's tsvector (hybrid search), the expression the functions use
    SELECT * INTO p FROM autoembed._search_parts(w);
    IF NOT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = w.source AND i.indisvalid
                      AND pg_get_expr(i.indexprs, i.indrelid) LIKE '%to_tsvector(%'
                      AND pg_get_indexdef(i.indexrelid) LIKE '%' || quote_ident(autoembed._attname(w.source, w.content_attnum)) || '%'
                      AND pg_get_indexdef(i.indexrelid) LIKE '%' || w.fts_config || '%') THEN
        RETURN format('CREATE INDEX %s %I ON %s USING gin ((pg_catalog.to_tsvector(%s, %I::pg_catalog.text)))',
                      how, left(rel || '_' || autoembed._attname(w.source, w.content_attnum), 44)
                           || '_w' || w.id || '_fts', w.source, p.cfg,
                      autoembed._attname(w.source, w.content_attnum));
    END IF;
    -- 3. GIN on the metadata (filters: metadata @> filter)
    col := autoembed._attname(w.source, w.metadata_attnum);
    IF col IS NOT NULL AND NOT EXISTS (
           SELECT FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
            WHERE i.indrelid = w.source AND am.amname = 'gin' AND i.indnkeyatts = 1
              AND i.indkey[0] = w.metadata_attnum AND i.indisvalid) THEN
        RETURN format('CREATE INDEX %s %I ON %s USING gin (%I jsonb_path_ops)', how,
                      left(rel, 48) || '_w' || w.id || '_meta', w.source, col);
    END IF;
    RETURN NULL;
END
$$;

-- Build every missing index of a watch now (in the caller's transaction: for small tables).
CREATE OR REPLACE FUNCTION autoembed._build_indexes(watch_id integer)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    statement text;
BEGIN
    FOR i IN 1 .. 3 LOOP  -- at most three indexes: vectors, text, metadata
        statement := autoembed.index_sql(watch_id, false);
        EXIT WHEN statement IS NULL;
        EXECUTE statement;
    END LOOP;
END
$$;

-- The worker built a deferred index (CREATE INDEX CONCURRENTLY, outside any function).
CREATE OR REPLACE FUNCTION autoembed.index_built(watch_id integer)
RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE autoembed.watches w SET index_state = 'ready'
     WHERE w.id = watch_id AND w.next_model IS NULL
       AND (autoembed._hnsw_index(w.source, w.embedding_attnum) IS NOT NULL
            OR autoembed._hnsw_index(w.chunk_table, autoembed._chunk_embedding(w.chunk_table)) IS NOT NULL)
    RETURNING true
$$;

-- Hand an object of autoembed's making (a function, a chunk table) to the owner of a
-- watched table. A superuser may do it outright; a member of the owner role may once the
-- owner can create in the object's schema, which it can only inside this transaction (the
-- grant is revoked before anyone else can see it).
CREATE OR REPLACE FUNCTION autoembed._hand_over(kind text, object text, owner oid, in_schema name)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    transient boolean;
BEGIN
    IF NOT pg_has_role(current_user, owner, 'MEMBER') THEN
        RAISE EXCEPTION 'autoembed: % cannot act for %, the owner of the watched table', current_user, owner::regrole
            USING HINT = format('Watch it as a superuser, or as a member of %s (GRANT %s TO %s).',
                                owner::regrole, owner::regrole, current_user),
                  ERRCODE = 'insufficient_privilege';
    END IF;
    transient := NOT has_schema_privilege(owner, in_schema, 'CREATE')
                 AND NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user);
    IF transient THEN
        EXECUTE format('GRANT CREATE ON SCHEMA %I TO %s', in_schema, owner::regrole);
    END IF;
    EXECUTE format('ALTER %s %s OWNER TO %s', kind, object, owner::regrole);
    IF transient THEN
        EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM %s', in_schema, owner::regrole);
    END IF;
END
$$;

-- Hand an accessor function to the table's owner, executable by the worker group only.
CREATE OR REPLACE FUNCTION autoembed._give(fn regprocedure, owner oid)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- privileges first: ALTER OWNER carries them over to the new owner
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO autoembed_workers', fn);
    IF (SELECT proowner FROM pg_proc WHERE oid = fn) <> owner THEN
        PERFORM autoembed._hand_over('FUNCTION', fn::text, owner, 'autoembed');
    END IF;
END
$$;

-- The search_path a role's sessions start with in this database (its own setting for this
-- database, for any database, the database's, else the server's), behind pg_catalog.
CREATE OR REPLACE FUNCTION autoembed._owner_search_path(owner oid)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'pg_catalog, ' || coalesce(
        (SELECT substr(c, 13) FROM pg_db_role_setting s, unnest(s.setconfig) AS c
          WHERE c LIKE 'search_path=%'
            AND s.setrole IN (owner, 0)
            AND s.setdatabase IN ((SELECT oid FROM pg_database WHERE datname = current_database()), 0)
          ORDER BY s.setrole = 0, s.setdatabase = 0
          LIMIT 1),
        (SELECT boot_val FROM pg_settings WHERE name = 'search_path' AND source = 'default'),
        (SELECT reset_val FROM pg_settings WHERE name = 'search_path'))
$$;

-- The accessor functions of a watch (see the top of this file). Their bodies use nothing
-- but pg_catalog and the table, find columns by number at each call (renames are
-- followed), and take keys as text (the queue's form). Their own statements run with
-- search_path pg_catalog, pg_temp; only the statement that reads or writes the table runs
-- with the owner's own search_path (behind pg_catalog), so that the table's code (its
-- triggers, policies, defaults) finds what it finds in the owner's sessions, while every
-- function and operator of that statement is qualified and cannot be shadowed.
CREATE OR REPLACE FUNCTION autoembed._accessors(watch_id integer)
RETURNS regprocedure[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $install$
DECLARE
    w autoembed.watches%ROWTYPE;
    owner oid;
    vschema name := autoembed.vector_schema();
    prefix text;
    settings constant text := 'SET search_path = pg_catalog, pg_temp';
    -- keys are turned into text (by _keys) with the settings the queue trigger pins
    key_settings constant text := $s$
        SET datestyle = 'ISO, YMD'
        SET intervalstyle = 'postgres'
        SET timezone = 'UTC'
        SET extra_float_digits = 1$s$;
    -- shared by every accessor: the key column and the input columns of a lane, by number
    resolve constant text := $r$
    SELECT pg_catalog.quote_ident(a.attname), pg_catalog.format_type(a.atttypid, a.atttypmod)
      INTO pkcol, pktype
      FROM pg_catalog.pg_attribute a WHERE a.attrelid = src AND a.attnum = @PK@ AND NOT a.attisdropped;
    inputs := CASE lane WHEN 'summary' THEN '@SUMMARY_INPUTS@'::pg_catalog.int2[]
                        ELSE '@EMBED_INPUTS@'::pg_catalog.int2[] END;
    SELECT pg_catalog.array_agg(pg_catalog.format('t.%I::pg_catalog.text', a.attname) ORDER BY x.ord)
      INTO cols
      FROM pg_catalog.unnest(inputs) WITH ORDINALITY AS x(num, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = src AND a.attnum = x.num AND NOT a.attisdropped;
    IF pkcol IS NULL OR cols IS NULL OR pg_catalog.cardinality(cols) <> pg_catalog.cardinality(inputs) THEN
        RAISE EXCEPTION 'autoembed: a column of % that watch @ID@ reads was dropped', src::pg_catalog.regclass
            USING ERRCODE = 'undefined_column';
    END IF;
    hash := CASE WHEN pg_catalog.cardinality(cols) = 1
                 THEN pg_catalog.format('pg_catalog.hashtextextended(%s, 0)', cols[1])
                 ELSE pg_catalog.format('pg_catalog.hashtextextended(ARRAY[%s]::pg_catalog.text, 0)',
                                        pg_catalog.array_to_string(cols, ', ')) END;
    rel := src::pg_catalog.regclass::pg_catalog.text;
    -- keys that do not parse as the key type are reported, not cast inside the query
    BEGIN
        EXECUTE pg_catalog.format('SELECT pg_catalog.count(k::%s) FROM pg_catalog.unnest($1) AS k', pktype)
            USING pks;
        good := pks;
    EXCEPTION WHEN data_exception THEN
        good := '{}';
        FOR i IN 1 .. pg_catalog.cardinality(pks) LOOP
            BEGIN
                EXECUTE pg_catalog.format('SELECT $1::%s', pktype) USING pks[i];
                good := good OPERATOR(pg_catalog.||) pks[i];
            EXCEPTION WHEN data_exception THEN
                bad := bad OPERATOR(pg_catalog.||) pks[i];
                why := why OPERATOR(pg_catalog.||) SQLERRM;
            END;
        END LOOP;
    END;$r$;
    -- the column a call writes: one of those the watch writes (checked: the worker says)
    resolve_target constant text := $r$
    IF target IS NOT NULL AND NOT (target OPERATOR(pg_catalog.=) ANY (ARRAY[@EMBEDDING@, @NEXT@, @SUMMARY@]::pg_catalog.int2[])) THEN
        RAISE EXCEPTION 'autoembed: watch @ID@ does not write column number %', target
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    tcol := (SELECT pg_catalog.quote_ident(a.attname) FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = src AND a.attnum = target AND NOT a.attisdropped);$r$;
    as_owner text;
    fns regprocedure[] := '{}';
    src text;
BEGIN
    SELECT * INTO STRICT w FROM autoembed.watches x WHERE x.id = watch_id;
    SELECT c.relowner INTO owner FROM pg_class c WHERE c.oid = w.source;
    prefix := 'w' || w.id || '_';
    as_owner := format('PERFORM pg_catalog.set_config(''search_path'', %L, true);',
                       autoembed._owner_search_path(owner));

    -- read: the lane's input columns (each cut to max_chars), their hash, whether any was
    -- longer, and the row's state: ok, missing, hidden (row-level security hides it from
    -- the owner: FORCE ROW LEVEL SECURITY), or invalid (the key does not parse)
    src := $fn$
CREATE OR REPLACE FUNCTION autoembed.@NAME@(lane text, pks text[], max_chars integer DEFAULT NULL)
RETURNS TABLE (pk text, vals text[], hash bigint, cut boolean, state text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER @SETTINGS@
AS $body$
DECLARE
    src constant oid := @SRC@;
    target constant smallint := NULL;
    pkcol text; pktype text; inputs smallint[]; cols text[]; hash text; rel text; tcol text;
    good text[]; bad text[] := '{}'; why text[] := '{}'; q text;
    lim constant integer := coalesce(max_chars, 2147483647);
BEGIN
    @RESOLVE@
    q := pg_catalog.format(
        'SELECT p.pk, CASE WHEN t.%1$s IS NULL THEN NULL ELSE ARRAY[%2$s] END, %3$s,
                coalesce(%4$s, false),
                CASE WHEN t.%1$s IS NOT NULL THEN ''ok''
                     WHEN pg_catalog.row_security_active(%6$L::pg_catalog.regclass) THEN ''hidden''
                     ELSE ''missing'' END
           FROM pg_catalog.unnest($1::pg_catalog.text[]) AS p(pk)
           LEFT JOIN %6$s AS t ON t.%1$s OPERATOR(pg_catalog.=) p.pk::%5$s',
        pkcol,
        (SELECT pg_catalog.string_agg(pg_catalog.format('pg_catalog.left(%s, $2)', c), ', ')
           FROM pg_catalog.unnest(cols) AS c),
        hash,
        (SELECT pg_catalog.string_agg(pg_catalog.format('pg_catalog.length(%s) OPERATOR(pg_catalog.>) $2', c), ' OR ')
           FROM pg_catalog.unnest(cols) AS c),
        pktype, rel);
    @AS_OWNER@
    RETURN QUERY EXECUTE q USING good, lim;
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    RETURN QUERY SELECT b.k, NULL::text[], NULL::bigint, false, 'invalid: ' OPERATOR(pg_catalog.||) b.e
                   FROM ROWS FROM (pg_catalog.unnest(bad), pg_catalog.unnest(why)) AS b(k, e);
END
$body$$fn$;
    src := replace(replace(src, '@NAME@', quote_ident(prefix || 'read')), '@RESOLVE@', resolve || resolve_target);
    EXECUTE autoembed._fill_accessor(replace(src, '@AS_OWNER@', as_owner), w, settings);
    fns := fns || format('autoembed.%I(text, text[], integer)', prefix || 'read')::regprocedure;

    IF w.chunking IS NOT NULL THEN
        fns := fns || autoembed._chunk_accessors(w.id, resolve, as_owner);
        -- the delete and truncate triggers forget passages; finish_migration swaps tables
        EXECUTE format('GRANT EXECUTE ON FUNCTION autoembed.%I(text[]) TO autoembed_definer', prefix || 'forget');
        EXECUTE format('GRANT EXECUTE ON FUNCTION autoembed.%I(oid, oid) TO autoembed_definer', prefix || 'swap');
        FOR i IN 1 .. cardinality(fns) LOOP
            PERFORM autoembed._give(fns[i], owner);
        END LOOP;
        RETURN fns;
    END IF;

    -- write: store each value (a vector for the embed and next lanes, a text for summaries;
    -- NULL clears) in column number `target` where the row's inputs still hash as what was
    -- read. Rows another transaction holds are skipped, never waited for ('busy'): the
    -- worker never takes part in a deadlock with the application. A row whose write fails
    -- (its own trigger raises, a constraint refuses it) fails alone ('error'); failures of
    -- the server, not of the row, are raised.
    src := $fn$
CREATE OR REPLACE FUNCTION autoembed.@NAME@(
    lane text, target smallint, pks text[], hashes bigint[], vecs @VSCHEMA@.vector[], texts text[])
RETURNS TABLE (pk text, outcome text, error text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER @SETTINGS@
AS $body$
DECLARE
    src constant oid := @SRC@;
    pkcol text; pktype text; inputs smallint[]; cols text[]; hash text; rel text; tcol text;
    good text[]; bad text[] := '{}'; why text[] := '{}';
    q text; ks text[]; outs text[]; g_hash bigint[]; g_vec @VSCHEMA@.vector[]; g_text text[];
    one_hash bigint[]; one_vec @VSCHEMA@.vector[]; one_text text[];
BEGIN
    @RESOLVE@
    IF tcol IS NULL THEN
        RAISE EXCEPTION 'autoembed: the column that watch @ID@ writes (%) was dropped', lane
            USING ERRCODE = 'undefined_column';
    END IF;
    q := pg_catalog.format(
        'WITH v AS (SELECT * FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]),
                                              pg_catalog.unnest($2::pg_catalog.int8[]),
                                              pg_catalog.unnest(%8$s)) AS v(pk, hash, val)),
              locked AS (SELECT t.%1$s AS pk, %3$s AS hash FROM %6$s AS t
                          WHERE t.%1$s OPERATOR(pg_catalog.=) ANY ($1::%5$s[])
                            FOR NO KEY UPDATE OF t SKIP LOCKED),
              seen AS (SELECT t.%1$s AS pk FROM %6$s AS t
                        WHERE t.%1$s OPERATOR(pg_catalog.=) ANY ($1::%5$s[])),
              upd AS (UPDATE %6$s AS t SET %7$s = v.val
                        FROM v JOIN locked AS l ON l.pk OPERATOR(pg_catalog.=) v.pk::%5$s
                       WHERE t.%1$s OPERATOR(pg_catalog.=) v.pk::%5$s
                         AND l.hash IS NOT DISTINCT FROM v.hash
                         AND %3$s IS NOT DISTINCT FROM v.hash
                         AND NOT (t.%7$s IS NULL AND v.val IS NULL)
                      RETURNING 1)
         SELECT pg_catalog.array_agg(v.pk),
                pg_catalog.array_agg(CASE
                    WHEN l.pk IS NOT NULL AND l.hash IS NOT DISTINCT FROM v.hash THEN ''written''
                    WHEN l.pk IS NOT NULL THEN ''stale''
                    WHEN s.pk IS NOT NULL THEN ''busy''
                    WHEN pg_catalog.row_security_active(%6$L::pg_catalog.regclass) THEN ''hidden''
                    ELSE ''missing'' END)
           FROM v LEFT JOIN locked AS l ON l.pk OPERATOR(pg_catalog.=) v.pk::%5$s
                  LEFT JOIN seen AS s ON s.pk OPERATOR(pg_catalog.=) v.pk::%5$s
          WHERE (SELECT pg_catalog.count(*) FROM upd) OPERATOR(pg_catalog.>=) 0',
        pkcol, NULL, hash, NULL, pktype, rel, tcol,
        CASE WHEN lane OPERATOR(pg_catalog.=) 'summary' THEN '$4::pg_catalog.text[]'
             ELSE pg_catalog.format('$3::%I.vector[]', @VSCHEMA_LIT@) END);
    IF pg_catalog.cardinality(good) OPERATOR(pg_catalog.>) 0 THEN
        SELECT pg_catalog.array_agg(x.h ORDER BY x.i), pg_catalog.array_agg(x.v ORDER BY x.i),
               pg_catalog.array_agg(x.t ORDER BY x.i)
          INTO g_hash, g_vec, g_text
          FROM ROWS FROM (pg_catalog.unnest(pks), pg_catalog.unnest(hashes), pg_catalog.unnest(vecs),
                          pg_catalog.unnest(texts)) WITH ORDINALITY AS x(p, h, v, t, i)
         WHERE x.p OPERATOR(pg_catalog.=) ANY (good);
        BEGIN
            @AS_OWNER@
            EXECUTE q INTO ks, outs USING good, g_hash, g_vec, g_text;
            PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
            RETURN QUERY SELECT r.k, r.o, NULL::text FROM ROWS FROM (pg_catalog.unnest(ks), pg_catalog.unnest(outs)) AS r(k, o);
        EXCEPTION WHEN OTHERS THEN
            IF @SERVER_FAULT@ THEN
                RAISE;  -- the server or autoembed, not the row
            END IF;
            -- one row refused: write them one by one, so that it fails alone
            FOR i IN 1 .. pg_catalog.cardinality(good) LOOP
                one_hash := ARRAY[g_hash[i]];
                one_vec := CASE WHEN g_vec IS NULL THEN NULL ELSE ARRAY[g_vec[i]] END;
                one_text := CASE WHEN g_text IS NULL THEN NULL ELSE ARRAY[g_text[i]] END;
                BEGIN
                    @AS_OWNER@
                    EXECUTE q INTO ks, outs USING ARRAY[good[i]], one_hash, one_vec, one_text;
                    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
                    RETURN QUERY SELECT r.k, r.o, NULL::text FROM ROWS FROM (pg_catalog.unnest(ks), pg_catalog.unnest(outs)) AS r(k, o);
                EXCEPTION WHEN OTHERS THEN
                    IF @SERVER_FAULT@ THEN
                        RAISE;
                    END IF;
                    RETURN QUERY SELECT good[i], 'error'::text, SQLSTATE OPERATOR(pg_catalog.||) ': ' OPERATOR(pg_catalog.||) SQLERRM;
                END;
            END LOOP;
        END;
    END IF;
    RETURN QUERY SELECT b.k, 'error'::text, 'the key does not parse: ' OPERATOR(pg_catalog.||) b.e
                   FROM ROWS FROM (pg_catalog.unnest(bad), pg_catalog.unnest(why)) AS b(k, e);
END
$body$$fn$;
    src := replace(replace(src, '@NAME@', quote_ident(prefix || 'write')), '@RESOLVE@', resolve || resolve_target);
    src := replace(src, '@VSCHEMA_LIT@', quote_literal(vschema));
    EXECUTE autoembed._fill_accessor(replace(src, '@AS_OWNER@', as_owner), w, settings);
    fns := fns || format('autoembed.%I(text, smallint, text[], bigint[], %I.vector[], text[])',
                         prefix || 'write', vschema)::regprocedure;

    -- keys: the rows a lane has work for (its inputs are not all NULL), optionally only
    -- those whose target column is still NULL; for queueing a backfill
    src := $fn$
CREATE OR REPLACE FUNCTION autoembed.@NAME@(lane text, target smallint, only_missing boolean)
RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER @SETTINGS@
AS $body$
DECLARE
    src constant oid := @SRC@;
    pkcol text; pktype text; inputs smallint[]; cols text[]; hash text; rel text; tcol text;
    pks constant text[] := '{}'; good text[]; bad text[] := '{}'; why text[] := '{}'; q text;
BEGIN
    @RESOLVE@
    q := pg_catalog.format(
        'SELECT t.%s::pg_catalog.text FROM %s AS t WHERE (%s)%s',
        pkcol, rel,
        (SELECT pg_catalog.string_agg(pg_catalog.format('%s IS NOT NULL', c), ' OR ')
           FROM pg_catalog.unnest(cols) AS c),
        -- every row with text; with only_missing, those without a result yet; without it,
        -- also rows without text that still hold one (it is cleared)
        CASE WHEN tcol IS NULL THEN ''
             WHEN only_missing THEN pg_catalog.format(' AND t.%s IS NULL', tcol)
             ELSE pg_catalog.format(' OR t.%s IS NOT NULL', tcol) END);
    @AS_OWNER@
    RETURN QUERY EXECUTE q;
END
$body$$fn$;
    src := replace(replace(src, '@NAME@', quote_ident(prefix || 'keys')), '@RESOLVE@', resolve || resolve_target);
    EXECUTE autoembed._fill_accessor(replace(src, '@AS_OWNER@', as_owner), w, settings || key_settings);
    fns := fns || format('autoembed.%I(text, smallint, boolean)', prefix || 'keys')::regprocedure;

    -- swap: the end of a model change; the shadow column takes the vector column's name and
    -- place, the old column is dropped (kept, with a notice, if a view of the user's uses it)
    src := $fn$
CREATE OR REPLACE FUNCTION autoembed.@NAME@(current_num smallint, next_num smallint)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER @SETTINGS@
AS $body$
DECLARE
    src constant oid := @SRC@;
    cur name; nxt name; old name;
BEGIN
    IF current_num IS DISTINCT FROM @EMBEDDING@ OR next_num IS DISTINCT FROM @NEXT@ THEN
        RAISE EXCEPTION 'autoembed: watch @ID@ swaps columns % and %, not % and %',
            @EMBEDDING@, @NEXT@, current_num, next_num USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT a.attname INTO cur FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = src AND a.attnum = current_num AND NOT a.attisdropped;
    SELECT a.attname INTO nxt FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = src AND a.attnum = next_num AND NOT a.attisdropped;
    IF cur IS NULL OR nxt IS NULL THEN
        RAISE EXCEPTION 'autoembed: watch @ID@ has no vector column or no shadow column to swap'
            USING ERRCODE = 'undefined_column';
    END IF;
    old := pg_catalog.left(cur, 50) OPERATOR(pg_catalog.||) '__old_@ID@';
    EXECUTE pg_catalog.format('ALTER TABLE %s RENAME COLUMN %I TO %I', src::pg_catalog.regclass, cur, old);
    EXECUTE pg_catalog.format('ALTER TABLE %s RENAME COLUMN %I TO %I', src::pg_catalog.regclass, nxt, cur);
    BEGIN
        EXECUTE pg_catalog.format('ALTER TABLE %s DROP COLUMN %I', src::pg_catalog.regclass, old);
    EXCEPTION WHEN dependent_objects_still_exist THEN
        RETURN pg_catalog.format('the old vectors stay in %s.%I: %s', src::pg_catalog.regclass, old, SQLERRM);
    END;
    RETURN NULL;
END
$body$$fn$;
    src := replace(src, '@NAME@', quote_ident(prefix || 'swap'));
    EXECUTE autoembed._fill_accessor(src, w, settings);
    fns := fns || format('autoembed.%I(smallint, smallint)', prefix || 'swap')::regprocedure;

    -- the swap is called by finish_migration (autoembed_definer) on the worker's behalf
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO autoembed_definer', fns[4]);
    FOR i IN 1 .. cardinality(fns) LOOP
        PERFORM autoembed._give(fns[i], owner);
    END LOOP;
    RETURN fns;
END
$install$;

-- Fill the placeholders of an accessor's source with a watch's numbers.
CREATE OR REPLACE FUNCTION autoembed._fill_accessor(src text, w autoembed.watches, settings text)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    -- @SERVER_FAULT@: an error of the server or of autoembed, not of the row written (it is
    -- raised; a row's own errors fail that row alone)
    SELECT replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(src,
        '@SERVER_FAULT@', '(pg_catalog.left(SQLSTATE, 2) OPERATOR(pg_catalog.=) ANY (ARRAY[''08'', ''40'', ''53'', ''55'', ''57'', ''58'', ''XX'']) '
                          'OR (pg_catalog.left(SQLSTATE, 2) OPERATOR(pg_catalog.=) ''42'' AND SQLSTATE OPERATOR(pg_catalog.<>) ''42501''))'),
        '@NEXT_CHUNKS@', coalesce(w.next_chunk_table::oid::text, 'NULL')),
        '@CHUNKS@', coalesce(w.chunk_table::oid::text, 'NULL')),
        '@SETTINGS@', settings),
        '@SRC@', w.source::oid::text),
        '@PK@', w.pk_attnum::text),
        '@EMBED_INPUTS@', w.embed_inputs::text),
        '@SUMMARY_INPUTS@', coalesce(w.summary_inputs, w.embed_inputs)::text),
        '@EMBEDDING@', coalesce(w.embedding_attnum::text, 'NULL')),
        '@NEXT@', coalesce(w.next_attnum::text, 'NULL')),
        '@SUMMARY@', coalesce(w.summary_attnum::text, 'NULL')),
        '@VSCHEMA@', quote_ident(autoembed.vector_schema())),
        '@ID@', w.id::text)
$$;

-- (Re)create what a watch hangs on its table: the triggers, the accessors, the HNSW index
-- (unless deferred) and the search function. Idempotent.
CREATE OR REPLACE FUNCTION autoembed._install(watch_id integer, match_name name,
                                              with_index boolean DEFAULT true,
                                              with_triggers boolean DEFAULT true)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $install$
DECLARE
    w autoembed.watches%ROWTYPE;
    rel_schema name;
    vschema name := autoembed.vector_schema();
    created regprocedure;
    searches regprocedure[];
    states text[];
    pk_name name;
    content_name name;
    emb_name name;
    statement text;
    fns regprocedure[];
BEGIN
    SELECT * INTO STRICT w FROM autoembed.watches x WHERE x.id = watch_id;
    SELECT n.nspname INTO rel_schema
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = w.source;
    pk_name := autoembed._attname(w.source, w.pk_attnum);
    content_name := autoembed._attname(w.source, w.content_attnum);
    emb_name := autoembed._attname(w.source, w.embedding_attnum);

    IF with_triggers THEN
    -- made again as they were: a trigger the user disabled (ALTER TABLE ... DISABLE TRIGGER)
    -- stays disabled
    SELECT array_agg(t.tgname::text || '=' || t.tgenabled::text) INTO states
      FROM pg_trigger t WHERE t.tgrelid = w.source AND t.tgname LIKE 'autoembed\_' || w.id || '\_%';
    FOREACH statement IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'autoembed_' || w.id || '_' || statement, w.source);
    END LOOP;
    EXECUTE format(
        'CREATE TRIGGER %I AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows
         FOR EACH STATEMENT EXECUTE FUNCTION autoembed.queue_changes(%L)',
        'autoembed_' || w.id || '_insert', w.source, w.id);
    -- no column list: PostgreSQL allows no transition tables on UPDATE OF col triggers, and
    -- the trigger compares old and new inputs itself, so other columns never re-embed
    EXECUTE format(
        'CREATE TRIGGER %I AFTER UPDATE ON %s
         REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
         FOR EACH STATEMENT EXECUTE FUNCTION autoembed.queue_changes(%L)',
        'autoembed_' || w.id || '_update', w.source, w.id);
    EXECUTE format(
        'CREATE TRIGGER %I AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows
         FOR EACH STATEMENT EXECUTE FUNCTION autoembed.forget_rows(%L)',
        'autoembed_' || w.id || '_delete', w.source, w.id);
    EXECUTE format(
        'CREATE TRIGGER %I AFTER TRUNCATE ON %s
         FOR EACH STATEMENT EXECUTE FUNCTION autoembed.forget_rows(%L)',
        'autoembed_' || w.id || '_truncate', w.source, w.id);
    FOREACH statement IN ARRAY coalesce(states, '{}') LOOP
        CONTINUE WHEN split_part(statement, '=', 2) = 'O';
        EXECUTE format('ALTER TABLE %s %s TRIGGER %I', w.source,
                       CASE split_part(statement, '=', 2) WHEN 'D' THEN 'DISABLE'
                            WHEN 'R' THEN 'ENABLE REPLICA' ELSE 'ENABLE ALWAYS' END,
                       split_part(statement, '=', 1));
    END LOOP;
    END IF;

    IF w.index_state = 'ready' AND with_index THEN
        PERFORM autoembed._build_indexes(w.id);
    END IF;

    -- a function of this watch under another name (match_function => 'new_name') goes
    IF w.match_function IS NOT NULL AND EXISTS (SELECT FROM pg_proc WHERE oid = w.match_function::oid)
       AND (SELECT proname FROM pg_proc WHERE oid = w.match_function::oid) <> match_name THEN
        EXECUTE format('DROP FUNCTION %s', w.match_function);
    END IF;
    searches := CASE WHEN w.chunking IS NULL THEN autoembed._search_functions(w.id, match_name)
                     ELSE autoembed._chunk_search_functions(w.id, match_name) END;
    created := searches[1];

    fns := autoembed._accessors(w.id);
    UPDATE autoembed.watches x
       SET match_function = created, functions = fns || searches,
           pk_column = pk_name, content_column = content_name,
           embedding_column = coalesce(emb_name, (SELECT relname FROM pg_class WHERE oid = w.chunk_table),
                                       x.embedding_column),
           pk_type = (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                       WHERE a.attrelid = w.source AND a.attnum = w.pk_attnum),
           summary_column = autoembed._attname(w.source, w.summary_attnum)
     WHERE x.id = w.id;
    -- PostgREST (Supabase's REST API) reloads its schema cache on this notification
    PERFORM pg_notify('pgrst', 'reload schema');
END
$install$;

-- Queue every row of a watch's lane(s) again (after a watch, a model or column change).
CREATE OR REPLACE FUNCTION autoembed._requeue(watch_id integer, lanes text[], only_missing boolean)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    queued bigint := 0;
    n bigint;
    lane text;
BEGIN
    FOREACH lane IN ARRAY lanes LOOP
        EXECUTE autoembed._enqueue_sql(format(
            'SELECT %s, %L, k FROM autoembed.%I(%L, %s, %L) AS k',
            watch_id, lane, 'w' || watch_id || '_keys', lane,
            (SELECT CASE WHEN x.chunking IS NOT NULL AND lane <> 'summary'
                         THEN coalesce((CASE lane WHEN 'next' THEN x.next_chunk_table
                                                  ELSE x.chunk_table END)::oid::text, 'NULL') || '::oid'
                         ELSE coalesce((CASE lane WHEN 'embed' THEN x.embedding_attnum
                                                  WHEN 'next' THEN x.next_attnum
                                                  ELSE x.summary_attnum END)::text, 'NULL') || '::smallint' END
               FROM autoembed.watches x WHERE x.id = watch_id),
            only_missing), 'backfill');
        GET DIAGNOSTICS n = ROW_COUNT;
        queued := queued + n;
    END LOOP;
    IF queued > 0 THEN
        PERFORM pg_notify('autoembed', watch_id::text);
    END IF;
    RETURN queued;
END
$$;

CREATE OR REPLACE FUNCTION autoembed._model(model_name text)
RETURNS autoembed.models
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m autoembed.models%ROWTYPE;
BEGIN
    SELECT * INTO m FROM autoembed.models x WHERE x.name = lower(model_name) OR x.name = model_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'autoembed: unknown model "%"', model_name
            USING HINT = format('Known models: %s. A model directory is registered by '
                                '`autoembed watch --model PATH` or autoembed.register_model().',
                                (SELECT string_agg(name, ', ' ORDER BY name) FROM autoembed.models)),
                  ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN m;
END
$$;

-- Change the model of a watch without a search gap: the new vectors are built in a shadow
-- column beside the old ones (searches keep using the old vectors, consistent with each
-- other), and swapped in by finish_migration once they cover every row. Changing back to
-- the current model cancels a change in progress.
CREATE OR REPLACE FUNCTION autoembed.set_model(
    source regclass,
    model text,
    embedding_column name DEFAULT 'embedding'
)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w autoembed.watches%ROWTYPE;
    m autoembed.models%ROWTYPE := autoembed._model(set_model.model);
    shadow name;
BEGIN
    SELECT * INTO w FROM autoembed.watches x
     WHERE x.source = set_model.source
       AND (autoembed._attname(x.source, x.embedding_attnum) = set_model.embedding_column
            OR (SELECT relname FROM pg_class WHERE oid = x.chunk_table) = set_model.embedding_column);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'autoembed: %.% is not watched', set_model.source, set_model.embedding_column
            USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM autoembed._lock_watch(w.id);
    IF w.next_model IS NOT NULL THEN  -- a change in progress is replaced
        IF w.chunking IS NOT NULL THEN
            EXECUTE format('DROP TABLE IF EXISTS %s', w.next_chunk_table);
            UPDATE autoembed.watches x SET next_chunk_table = NULL WHERE x.id = w.id;
        ELSE
            EXECUTE format('ALTER TABLE %s DROP COLUMN IF EXISTS %I', w.source,
                           autoembed._attname(w.source, w.next_attnum));
        END IF;
        DELETE FROM autoembed.jobs j WHERE j.watch_id = w.id AND j.lane = 'next';
        UPDATE autoembed.watches x SET next_model = NULL, next_dim = NULL, next_attnum = NULL,
                                       version = x.version + 1 WHERE x.id = w.id;
    END IF;
    IF w.model = m.name THEN
        PERFORM autoembed._install(w.id, (SELECT proname FROM pg_proc WHERE oid = w.match_function::oid));
        RETURN w.id;
    END IF;
    shadow := left(set_model.embedding_column, 50) || '__next_' || w.id;
    IF w.chunking IS NOT NULL THEN
        UPDATE autoembed.watches x SET next_model = m.name, next_dim = m.dim, version = x.version + 1
         WHERE x.id = w.id;
        UPDATE autoembed.watches x SET next_chunk_table = autoembed._make_chunk_table(w.id, shadow, m.dim)
         WHERE x.id = w.id;
    ELSE
        EXECUTE format('ALTER TABLE %s ADD COLUMN %I %s', w.source, shadow, autoembed.storage_type(m.dim, w.storage));
        UPDATE autoembed.watches x
           SET next_model = m.name, next_dim = m.dim,
               next_attnum = (SELECT attnum FROM pg_attribute WHERE attrelid = w.source AND attname = shadow),
               version = x.version + 1
         WHERE x.id = w.id;
    END IF;
    PERFORM autoembed._install(w.id, (SELECT proname FROM pg_proc WHERE oid = w.match_function::oid));
    PERFORM autoembed._requeue(w.id, ARRAY['next'], false);
    RETURN w.id;
END
$$;

-- The end of a model change, called by a worker once the shadow column has a vector for
-- every row (no 'next' job left): the shadow column becomes the vector column in one
-- transaction (a rename: no row is rewritten), the watch records the new model, and work
-- queued for the old model is dropped. SECURITY DEFINER (autoembed_definer): a worker role
-- needs no right on the table or on autoembed.watches; the column swap itself runs as the
-- table's owner (its accessor). Returns NULL when done, else why not (yet).
CREATE OR REPLACE FUNCTION autoembed.finish_migration(watch_id integer)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w autoembed.watches%ROWTYPE;
    note text;
BEGIN
    PERFORM autoembed._lock_watch(watch_id);
    SELECT * INTO w FROM autoembed.watches x WHERE x.id = watch_id;
    IF NOT FOUND OR w.next_model IS NULL THEN
        RETURN 'no model change in progress';
    END IF;
    IF EXISTS (SELECT FROM autoembed.jobs j WHERE j.watch_id = w.id AND j.lane = 'next'
                                              AND j.status <> 'failed') THEN
        RETURN 'new vectors are still being made';
    END IF;
    IF EXISTS (SELECT FROM autoembed.jobs j WHERE j.watch_id = w.id AND j.lane = 'next') THEN
        RETURN 'some rows failed with the new model: see autoembed status, retry them';
    END IF;
    PERFORM set_config('autoembed.in_ddl', 'on', true);  -- no refresh by the event trigger
    IF w.chunking IS NOT NULL THEN
        EXECUTE format('SELECT autoembed.%I(%s::oid, %s::oid)', 'w' || w.id || '_swap',
                       w.chunk_table::oid, w.next_chunk_table::oid) INTO note;
    ELSE
        EXECUTE format('SELECT autoembed.%I(%s::smallint, %s::smallint)', 'w' || w.id || '_swap',
                       w.embedding_attnum, w.next_attnum) INTO note;
    END IF;
    PERFORM set_config('autoembed.in_ddl', 'off', true);
    DELETE FROM autoembed.jobs j WHERE j.watch_id = w.id AND j.lane = 'embed';
    UPDATE autoembed.watches x
       SET model = w.next_model, dim = w.next_dim,
           embedding_attnum = CASE WHEN w.chunking IS NULL THEN w.next_attnum END,
           chunk_table = coalesce(w.next_chunk_table, w.chunk_table),
           next_model = NULL, next_dim = NULL, next_attnum = NULL, next_chunk_table = NULL,
           index_note = note, version = x.version + 1
     WHERE x.id = w.id;
    PERFORM pg_notify('autoembed', w.id::text);
    RETURN NULL;
END
$$;

-- Watch a table: keep <embedding_column> in step with <content_column> (or with a template
-- over several columns) using <model>.
CREATE OR REPLACE FUNCTION autoembed.watch(
    source regclass,
    content_column name,
    embedding_column name DEFAULT 'embedding',
    model text DEFAULT NULL,
    match_function name DEFAULT NULL,
    summary_column name DEFAULT NULL,
    llm_model text DEFAULT NULL,
    llm_prompt text DEFAULT NULL,
    llm_options jsonb DEFAULT '{}'::jsonb,
    template text DEFAULT NULL,
    index text DEFAULT 'auto',
    metadata_column name DEFAULT NULL,
    language text DEFAULT 'english',
    storage text DEFAULT 'vector',
    chunking jsonb DEFAULT NULL
)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src constant regclass := watch.source;
    emb constant name := watch.embedding_column;
    content constant name := watch.content_column;
    -- no model named: the watch's own (re-pointing a watch keeps its model), else gte-small
    m autoembed.models%ROWTYPE := autoembed._model(coalesce(watch.model,
        (SELECT x.model FROM autoembed.watches x
          WHERE x.source = watch.source
            AND (autoembed._attname(x.source, x.embedding_attnum) = watch.embedding_column
                 OR x.chunk_table::text = coalesce(watch.chunking->>'table', '-'))
          LIMIT 1),
        'gte-small'));
    w autoembed.watches%ROWTYPE;
    kind "char";
    pk_nums smallint[];
    pk_typ oid;
    col_type oid;
    col_typmod integer;
    emb_num smallint;
    vtype oid;
    fn_name name;
    longer text;
    meta_num smallint;
    wid integer;
    content_num smallint;
    embed_in smallint[];
    summary_in smallint[];
    summary_num smallint;
    queued bigint;
    statement text;
    changed boolean;
    chunk_name name;
    chunks regclass;
    opts jsonb;
    switch boolean := false;
BEGIN
    SELECT c.relkind INTO kind FROM pg_class c WHERE c.oid = src;
    IF kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'autoembed: % is not a table', src USING ERRCODE = 'wrong_object_type';
    END IF;
    IF index NOT IN ('auto', 'now', 'deferred') THEN
        RAISE EXCEPTION 'autoembed: index must be auto, now or deferred, not %', index
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF storage NOT IN ('vector', 'halfvec') OR autoembed.storage_oid(storage) IS NULL THEN
        RAISE EXCEPTION 'autoembed: storage must be vector or halfvec (pgvector 0.7 or later), not %', storage
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF to_regclass('pg_catalog.pg_ts_config') IS NOT NULL
       AND NOT EXISTS (SELECT FROM pg_ts_config WHERE cfgname = language) THEN
        RAISE EXCEPTION 'autoembed: no text search configuration "%"', language
            USING HINT = format('Configurations: %s.', (SELECT string_agg(cfgname, ', ' ORDER BY cfgname) FROM pg_ts_config)),
                  ERRCODE = 'invalid_parameter_value';
    END IF;
    IF metadata_column IS NOT NULL THEN
        SELECT a.attnum, a.atttypid INTO meta_num, col_type FROM pg_attribute a
         WHERE a.attrelid = src AND a.attname = metadata_column AND a.attnum > 0 AND NOT a.attisdropped;
        IF meta_num IS NULL THEN
            RAISE EXCEPTION 'autoembed: table % has no column "%" for metadata', src, metadata_column
                USING HINT = format('Add it: ALTER TABLE %s ADD COLUMN %I jsonb NOT NULL DEFAULT ''{}''',
                                    src, metadata_column),
                      ERRCODE = 'undefined_column';
        END IF;
        IF col_type <> 'jsonb'::regtype THEN
            RAISE EXCEPTION 'autoembed: metadata column %.% is %, not jsonb', src, metadata_column,
                format_type(col_type, NULL) USING ERRCODE = 'datatype_mismatch';
        END IF;
    END IF;

    SELECT array_agg(k.attnum ORDER BY k.ord) INTO pk_nums
      FROM pg_index i
     CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
     WHERE i.indrelid = src AND i.indisprimary;
    IF pk_nums IS NULL THEN
        RAISE EXCEPTION 'autoembed: table % has no primary key', src
            USING HINT = format('autoembed finds rows by their primary key. Add one, e.g. '
                                'ALTER TABLE %s ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY', src),
                  ERRCODE = 'invalid_table_definition';
    END IF;
    IF cardinality(pk_nums) > 1 THEN
        RAISE EXCEPTION 'autoembed: table % has a primary key of % columns', src, cardinality(pk_nums)
            USING HINT = 'autoembed needs a single-column primary key; add a surrogate key column.',
                  ERRCODE = 'feature_not_supported';
    END IF;
    SELECT a.atttypid INTO pk_typ FROM pg_attribute a WHERE a.attrelid = src AND a.attnum = pk_nums[1];
    IF NOT autoembed._key_type(pk_typ) THEN
        RAISE EXCEPTION 'autoembed: the primary key of % is of type %, which autoembed does not accept',
            src, format_type(pk_typ, NULL)
            USING HINT = 'Keys may be smallint, integer, bigint, numeric, text, varchar, char, uuid, '
                         'date, timestamp or timestamptz: add a surrogate key column of one of them.',
                  ERRCODE = 'datatype_mismatch';
    END IF;

    content_num := (autoembed._attnums(src, ARRAY[content], 'the text to embed'))[1];
    IF watch.chunking IS NULL THEN
        IF watch.template IS NOT NULL AND 'chunk' = ANY (autoembed._template_columns(watch.template)) THEN
            RAISE EXCEPTION 'autoembed: {chunk} is the passage of a chunked watch; this watch is not chunked'
                USING HINT = 'Pass chunking => ''{}'' (--chunk), or use column names only.',
                      ERRCODE = 'invalid_parameter_value';
        END IF;
        embed_in := CASE WHEN watch.template IS NULL THEN ARRAY[content_num]
                         ELSE autoembed._attnums(src, autoembed._template_columns(watch.template),
                                                 'used by the template') END;
    ELSE
        opts := autoembed._chunk_options(watch.chunking);
        -- against the model's window (the defaults: 256 tokens capped by it, no overlap)
        IF coalesce((opts->>'chunk_tokens')::int, 0) > coalesce(m.max_tokens, 512) - 2 THEN
            RAISE EXCEPTION 'autoembed: chunk_tokens (%) must be at most %: model % reads % tokens, 2 of them special',
                opts->>'chunk_tokens', coalesce(m.max_tokens, 512) - 2, m.name, coalesce(m.max_tokens, 512)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF coalesce((opts->>'chunk_overlap')::int, 0)
           >= coalesce((opts->>'chunk_tokens')::int, least(256, coalesce(m.max_tokens, 512) - 2)) THEN
            RAISE EXCEPTION 'autoembed: chunk_overlap (%) must be less than the passages'' % tokens',
                opts->>'chunk_overlap', coalesce((opts->>'chunk_tokens')::int, least(256, coalesce(m.max_tokens, 512) - 2))
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF watch.template IS NOT NULL AND NOT ('chunk' = ANY (autoembed._template_columns(watch.template))) THEN
            RAISE EXCEPTION 'autoembed: the template of a chunked watch must place the passage: {chunk}'
                USING HINT = 'For example: ''{title}\n\n{chunk}''.', ERRCODE = 'invalid_parameter_value';
        END IF;
        -- the text to cut first, then the template's other columns, in order
        embed_in := ARRAY[content_num]
                    || CASE WHEN watch.template IS NULL THEN '{}'::smallint[]
                            ELSE coalesce(autoembed._attnums(src, array_remove(
                                     autoembed._template_columns(watch.template), 'chunk'::name),
                                     'used by the template'), '{}') END;
        chunk_name := coalesce(watch.chunking->>'table',
                               left((SELECT relname FROM pg_class WHERE oid = src), 56) || '_chunks');
        chunks := to_regclass(format('%I.%I', (SELECT n.nspname FROM pg_class c JOIN pg_namespace n
                                                ON n.oid = c.relnamespace WHERE c.oid = src), chunk_name));
    END IF;
    IF watch.summary_column IS NOT NULL THEN
        IF watch.llm_model IS NULL THEN
            RAISE EXCEPTION 'autoembed: a summary column needs an LLM model (llm_model)'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT a.attnum, a.atttypid INTO summary_num, col_type FROM pg_attribute a
         WHERE a.attrelid = src AND a.attname = watch.summary_column AND a.attnum > 0 AND NOT a.attisdropped;
        IF summary_num IS NULL THEN
            RAISE EXCEPTION 'autoembed: table % has no column "%" for summaries', src, watch.summary_column
                USING HINT = format('Add it: ALTER TABLE %s ADD COLUMN %I text', src, watch.summary_column),
                      ERRCODE = 'undefined_column';
        END IF;
        IF NOT autoembed._text_type(col_type) THEN
            RAISE EXCEPTION 'autoembed: summary column %.% is %, not text', src, watch.summary_column,
                format_type(col_type, NULL) USING ERRCODE = 'datatype_mismatch';
        END IF;
        summary_in := CASE WHEN watch.llm_prompt IS NULL THEN ARRAY[content_num]
                           ELSE autoembed._attnums(src, autoembed._template_columns(watch.llm_prompt),
                                                   'used by the prompt') END;
    END IF;

    vtype := autoembed.storage_oid(storage);
    IF watch.chunking IS NOT NULL THEN
        SELECT * INTO w FROM autoembed.watches x WHERE x.source = src AND x.chunk_table = chunks;
        IF NOT FOUND AND chunks IS NOT NULL THEN
            RAISE EXCEPTION 'autoembed: table % exists and is not the chunk table of a watch', chunks
                USING HINT = 'Pass chunking => ''{"table": "another_name"}'' (--chunk-table).',
                      ERRCODE = 'duplicate_table';
        END IF;
    ELSE
        SELECT a.attnum, a.atttypid, a.atttypmod INTO emb_num, col_type, col_typmod
          FROM pg_attribute a WHERE a.attrelid = src AND a.attname = emb AND a.attnum > 0 AND NOT a.attisdropped;
        SELECT * INTO w FROM autoembed.watches x WHERE x.source = src AND x.embedding_attnum = emb_num;
    END IF;
    IF FOUND AND w.chunking IS NOT NULL THEN
        PERFORM autoembed._lock_watch(w.id);
        IF w.storage <> storage THEN
            RAISE EXCEPTION 'autoembed: % stores %, not %', chunks, w.storage, storage
                USING ERRCODE = 'feature_not_supported';
        END IF;
        -- another model: new passages in a table beside the old ones, swapped in at the end;
        -- other chunking or template (same model, same vector space): rows re-chunked in place
        switch := w.model <> m.name AND w.next_model IS DISTINCT FROM m.name;
    ELSIF FOUND THEN
        PERFORM autoembed._lock_watch(w.id);
        IF w.storage <> storage THEN
            RAISE EXCEPTION 'autoembed: %.% stores %, not %', src, emb, w.storage, storage
                USING HINT = 'Watch another embedding column with the new storage (and unwatch this one).',
                      ERRCODE = 'feature_not_supported';
        END IF;
        switch := w.model <> m.name AND w.next_model IS DISTINCT FROM m.name;
    ELSIF watch.chunking IS NULL THEN
        IF emb_num IS NULL THEN
            EXECUTE format('ALTER TABLE %s ADD COLUMN %I %s', src, emb, autoembed.storage_type(m.dim, storage));
            SELECT a.attnum INTO emb_num FROM pg_attribute a
             WHERE a.attrelid = src AND a.attname = emb AND NOT a.attisdropped;
        ELSIF col_type <> vtype THEN
            RAISE EXCEPTION 'autoembed: column %.% is %, not a %', src, emb, format_type(col_type, col_typmod), storage
                USING HINT = 'Pass embedding_column => ''another_name'' (--embedding-column).',
                      ERRCODE = 'datatype_mismatch';
        ELSIF col_typmod <> m.dim THEN
            RAISE EXCEPTION 'autoembed: column %.% is %, but model % makes %(%)',
                src, emb, format_type(col_type, col_typmod), m.name, storage, m.dim
                USING HINT = format('Pick another embedding column, or retype this one: '
                                    'ALTER TABLE %s ALTER COLUMN %I TYPE %s USING NULL',
                                    src, emb, autoembed.storage_type(m.dim, storage)),
                      ERRCODE = 'datatype_mismatch';
        END IF;
    END IF;

    -- the search function's name: asked for, or the watch's own, or match_<table> unless
    -- another watch of the table has it (then match_<table>_<column>)
    fn_name := coalesce(watch.match_function,
                        (SELECT proname FROM pg_proc WHERE oid = w.match_function::oid));
    IF fn_name IS NULL THEN
        fn_name := left('match_' || (SELECT relname FROM pg_class WHERE oid = src), 63);
        IF EXISTS (SELECT FROM autoembed.watches x JOIN pg_proc p ON p.oid = x.match_function::oid
                    WHERE p.proname = fn_name
                      AND p.pronamespace = (SELECT relnamespace FROM pg_class WHERE oid = src)
                      AND EXISTS (SELECT FROM pg_class c WHERE c.oid = x.source)) THEN
            -- another watch has it (of this table, or of one whose long name starts alike)
            longer := 'match_' || CASE WHEN watch.chunking IS NOT NULL THEN chunk_name
                                       ELSE (SELECT relname FROM pg_class WHERE oid = src) || '_' || emb END;
            fn_name := CASE WHEN length(longer) <= 63 THEN longer
                            ELSE left(longer, 52) || '_' || left(md5(src::oid::text || emb), 10) END;
        END IF;
    END IF;
    -- a watch left behind by a dropped table of the same name gives its function up
    PERFORM autoembed.drop_watch(x.id) FROM autoembed.watches x
     WHERE NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = x.source)
       AND x.match_function::oid IN (SELECT p.oid FROM pg_proc p
                                      WHERE p.proname = fn_name
                                        AND p.pronamespace = (SELECT relnamespace FROM pg_class WHERE oid = src));

    IF w.id IS NULL THEN
        INSERT INTO autoembed.watches AS x (source, pk_column, pk_type, content_column,
                embedding_column, model, dim, summary_column, llm_model, llm_prompt, llm_options,
                pk_attnum, content_attnum, embedding_attnum, summary_attnum, embed_inputs,
                summary_inputs, template, index_state, metadata_attnum, fts_config, storage,
                chunking)
        VALUES (src, autoembed._attname(src, pk_nums[1]), format_type(pk_typ, NULL), content,
                CASE WHEN watch.chunking IS NULL THEN emb ELSE chunk_name END,
                m.name, m.dim, watch.summary_column, watch.llm_model, watch.llm_prompt,
                coalesce(watch.llm_options, '{}'::jsonb), pk_nums[1], content_num, emb_num,
                summary_num, embed_in, summary_in, watch.template,
                CASE WHEN index = 'now' THEN 'ready' ELSE 'deferred' END, meta_num, language, storage,
                opts)
        RETURNING x.id INTO wid;
        IF opts IS NOT NULL THEN
            UPDATE autoembed.watches x SET chunk_table = autoembed._make_chunk_table(wid, chunk_name, m.dim)
             WHERE x.id = wid;
        END IF;
        PERFORM autoembed._install(wid, fn_name);
        queued := autoembed._requeue(wid, ARRAY['embed'], true);
        IF summary_num IS NOT NULL THEN
            PERFORM autoembed._requeue(wid, ARRAY['summary'], true);
        END IF;
        -- 'auto': a backfill of more than 10,000 rows is embedded first and indexed once
        -- (CREATE INDEX CONCURRENTLY by the worker when it is done) instead of paying an
        -- HNSW insert per row; a smaller one is indexed now
        IF index = 'auto' AND queued <= 10000 THEN
            UPDATE autoembed.watches x SET index_state = 'ready' WHERE x.id = wid;
            PERFORM autoembed._build_indexes(wid);
        END IF;
        RETURN wid;
    END IF;

    wid := w.id;
    -- other inputs, or a watch that could not be served (rows changed unseen): every row
    changed := w.embed_inputs IS DISTINCT FROM embed_in OR w.template IS DISTINCT FROM watch.template
               OR w.chunking IS DISTINCT FROM opts OR autoembed.watch_problem(w.id) IS NOT NULL;
    IF changed THEN  -- a full-text index on a column the watch no longer reads goes
        FOR statement IN SELECT i.indexrelid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                          WHERE i.indrelid = src AND c.relname LIKE '%\_w' || wid || '\_fts'
                            AND pg_get_indexdef(i.indexrelid) NOT LIKE '%' || quote_ident(content) || '%' LOOP
            EXECUTE format('DROP INDEX %s', statement);
        END LOOP;
    END IF;
    UPDATE autoembed.watches x
       SET content_column = content, content_attnum = content_num, pk_attnum = pk_nums[1],
           summary_column = watch.summary_column, summary_attnum = summary_num,
           llm_model = watch.llm_model, llm_prompt = watch.llm_prompt,
           llm_options = coalesce(watch.llm_options, '{}'::jsonb),
           embed_inputs = embed_in, summary_inputs = summary_in, template = watch.template,
           metadata_attnum = meta_num, fts_config = language, chunking = opts,
           version = x.version + CASE WHEN changed OR x.summary_inputs IS DISTINCT FROM summary_in
                                           OR x.llm_prompt IS DISTINCT FROM watch.llm_prompt
                                           OR x.llm_model IS DISTINCT FROM watch.llm_model
                                      THEN 1 ELSE 0 END
     WHERE x.id = wid;
    IF switch THEN  -- another model: after the columns are re-pointed
        PERFORM autoembed.set_model(src, m.name, CASE WHEN opts IS NULL THEN emb ELSE chunk_name END);
    END IF;
    PERFORM autoembed._install(wid, fn_name);
    -- the same inputs: queue what has no vector yet; other inputs (another column or
    -- template): every row, its vector is made from other text now
    PERFORM autoembed._requeue(wid, ARRAY['embed'], NOT changed);
    IF summary_num IS NOT NULL THEN
        PERFORM autoembed._requeue(wid, ARRAY['summary'],
                                   w.summary_inputs IS NOT DISTINCT FROM summary_in
                                   AND w.llm_prompt IS NOT DISTINCT FROM watch.llm_prompt
                                   AND w.llm_model IS NOT DISTINCT FROM watch.llm_model);
    END IF;
    RETURN wid;
END
$$;

-- Remove a watch's triggers, search function and accessors (whatever still exists).
CREATE OR REPLACE FUNCTION autoembed._uninstall(watch_id integer)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w autoembed.watches%ROWTYPE;
    fn regprocedure;
    t text;
BEGIN
    SELECT * INTO STRICT w FROM autoembed.watches x WHERE x.id = watch_id;
    IF EXISTS (SELECT FROM pg_class c WHERE c.oid = w.source) THEN
        FOREACH t IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'autoembed_' || w.id || '_' || t, w.source);
        END LOOP;
    END IF;
    FOREACH fn IN ARRAY w.functions || w.match_function LOOP
        IF fn IS NOT NULL AND EXISTS (SELECT FROM pg_proc WHERE oid = fn::oid) THEN
            EXECUTE format('DROP FUNCTION %s', fn);
        END IF;
    END LOOP;
END
$$;

-- Stop watching: drops the triggers, the search function, the accessors and the queued
-- work. The vector column and its index stay unless drop_column is true.
CREATE OR REPLACE FUNCTION autoembed.unwatch(
    source regclass,
    embedding_column name DEFAULT 'embedding',
    drop_column boolean DEFAULT false
)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    wid integer;
BEGIN
    SELECT x.id INTO wid FROM autoembed.watches x
     WHERE x.source = unwatch.source
       AND (autoembed._attname(x.source, x.embedding_attnum) = unwatch.embedding_column
            OR (SELECT relname FROM pg_class WHERE oid = x.chunk_table) = unwatch.embedding_column);
    IF wid IS NULL THEN
        RETURN false;
    END IF;
    RETURN autoembed.drop_watch(wid, drop_column);
END
$$;

-- Stop watching by watch id (as `autoembed status` lists them): also for a watch whose
-- table was dropped.
CREATE OR REPLACE FUNCTION autoembed.drop_watch(watch_id integer, drop_column boolean DEFAULT false)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w autoembed.watches%ROWTYPE;
    col name;
BEGIN
    SELECT * INTO w FROM autoembed.watches x WHERE x.id = watch_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM autoembed._lock_watch(w.id);
    PERFORM autoembed._uninstall(w.id);
    DELETE FROM autoembed.watches x WHERE x.id = w.id;
    IF w.next_chunk_table IS NOT NULL AND EXISTS (SELECT FROM pg_class c WHERE c.oid = w.next_chunk_table) THEN
        EXECUTE format('DROP TABLE %s', w.next_chunk_table);
    END IF;
    IF drop_column AND w.chunk_table IS NOT NULL AND EXISTS (SELECT FROM pg_class c WHERE c.oid = w.chunk_table) THEN
        EXECUTE format('DROP TABLE %s', w.chunk_table);
    END IF;
    IF EXISTS (SELECT FROM pg_class c WHERE c.oid = w.source) THEN
        col := autoembed._attname(w.source, w.next_attnum);
        IF col IS NOT NULL THEN
            EXECUTE format('ALTER TABLE %s DROP COLUMN %I', w.source, col);
        END IF;
        col := autoembed._attname(w.source, w.embedding_attnum);
        IF drop_column AND col IS NOT NULL THEN
            EXECUTE format('ALTER TABLE %s DROP COLUMN %I', w.source, col);
        END IF;
    END IF;
    PERFORM pg_notify('pgrst', 'reload schema');
    RETURN true;
END
$$;

-- Failed jobs back to pending (all, or one table's). Returns how many.
CREATE OR REPLACE FUNCTION autoembed.retry(source regclass DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE autoembed.jobs j
       SET status = 'pending', attempts = 0, run_after = now(), last_error = NULL,
           updated_at = now(), kind = 'backfill'
     WHERE j.status = 'failed'
       AND (retry.source IS NULL
            OR j.watch_id IN (SELECT x.id FROM autoembed.watches x WHERE x.source = retry.source));
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('autoembed', 'retry');
    END IF;
    RETURN n;
END
$$;

-- Re-point a watch after a schema change the event trigger could not follow (or without
-- one): re-creates its triggers, accessors and search function for the table as it is now.
CREATE OR REPLACE FUNCTION autoembed.refresh(watch_id integer)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := autoembed.watch_problem(watch_id);
BEGIN
    IF problem IS NULL THEN
        PERFORM autoembed._install(watch_id, (SELECT p.proname FROM autoembed.watches x
                                                JOIN pg_proc p ON p.oid = x.match_function::oid
                                               WHERE x.id = watch_id), false, false);
    END IF;
    RETURN problem;
END
$$;
