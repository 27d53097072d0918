-- Repeatable: re-applied by every `autoembed migrate`.
--
-- Chunked watches: the worker cuts each row's text into passages that fit the model (in the
-- model's own tokens, at headings, paragraphs, sentences, words), and each passage has its
-- row in a chunk table next to the source (pages -> pages_chunks):
--
--   source_id     the source row's key
--   chunk_hash    a hash of the text embedded for the passage (template included)
--   seq           0, or 1, 2... for identical passages of one row
--   chunk_index   its position in the text (0, 1, 2...)
--   start_offset, end_offset   characters of the source text it covers
--   tokens        the model's tokens of the passage
--   content       the passage
--   embedding     its vector
--
-- The key is (source_id, chunk_hash, seq), not the position: after an edit, a passage that
-- only moved keeps its row (its position is updated in place, a HOT update that touches no
-- index) and its vector; only passages whose text changed are embedded and written. Rows
-- are removed with their source row (by the delete and truncate triggers, not a foreign key:
-- a foreign key would make the application's TRUNCATE fail, and its key type changes).
-- Row-level security: a passage is visible to whoever can see its source row.

-- The options of a chunked watch, checked: chunk_tokens (256 by default, capped by the
-- model's window), chunk_overlap (0), splitter (markdown, paragraph, sentence, word), max_chunks
-- (per row; the rest is counted and reported), and table (the chunk table's name, not kept
-- in the options).
CREATE OR REPLACE FUNCTION autoembed._chunk_options(given jsonb)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k text;
    out jsonb := given - 'table';
BEGIN
    IF jsonb_typeof(given) <> 'object' THEN
        RAISE EXCEPTION 'autoembed: chunking must be a JSON object, e.g. ''{"chunk_tokens": 256}'''
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR k IN SELECT jsonb_object_keys(given) LOOP
        IF k NOT IN ('chunk_tokens', 'chunk_overlap', 'splitter', 'max_chunks', 'table') THEN
            RAISE EXCEPTION 'autoembed: unknown chunking option "%"', k
                USING HINT = 'Options: chunk_tokens, chunk_overlap, splitter, max_chunks, table.',
                      ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    FOREACH k IN ARRAY ARRAY['chunk_tokens', 'chunk_overlap', 'max_chunks'] LOOP
        IF given ? k AND (jsonb_typeof(given->k) <> 'number' OR (given->>k)::numeric <> floor((given->>k)::numeric)
                          OR (given->>k)::numeric < CASE k WHEN 'chunk_tokens' THEN 16 WHEN 'max_chunks' THEN 1 ELSE 0 END) THEN
            RAISE EXCEPTION 'autoembed: chunking option % must be a whole number of at least %, not %', k,
                CASE k WHEN 'chunk_tokens' THEN 16 WHEN 'max_chunks' THEN 1 ELSE 0 END, given->k
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    IF given ? 'chunk_tokens' AND (given->>'chunk_overlap')::int >= (given->>'chunk_tokens')::int THEN
        RAISE EXCEPTION 'autoembed: chunk_overlap (%) must be less than chunk_tokens (%)',
            given->>'chunk_overlap', given->>'chunk_tokens' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF given ? 'splitter' AND NOT (given->>'splitter' IN ('markdown', 'paragraph', 'sentence', 'word')) THEN
        RAISE EXCEPTION 'autoembed: splitter must be markdown, paragraph, sentence or word, not %', given->'splitter'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF given ? 'table' AND jsonb_typeof(given->'table') <> 'string' THEN
        RAISE EXCEPTION 'autoembed: chunking option table must be a table name'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN out;
END
$$;

-- The next missing index of a chunked watch: HNSW on the passages' vectors (of the table a
-- model change builds, while one is in progress), GIN on their tsvector, GIN on the
-- source's metadata.
CREATE OR REPLACE FUNCTION autoembed._chunk_index_sql(w autoembed.watches, how text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tbl oid := coalesce(w.next_chunk_table, w.chunk_table);
    col name;
BEGIN
    IF tbl IS NULL OR NOT EXISTS (SELECT FROM pg_class WHERE oid = tbl) THEN
        RETURN NULL;
    END IF;
    IF autoembed._hnsw_index(tbl, autoembed._chunk_embedding(tbl)) IS NULL THEN
        RETURN format('CREATE INDEX %s %I ON %s USING hnsw (embedding %I.%I)', how,
                      left((SELECT relname FROM pg_class WHERE oid = tbl), 48) || '_w' || w.id || '_hnsw',
                      tbl::regclass, autoembed.vector_schema(), w.storage || '_cosine_ops');
    END IF;
    IF NOT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = w.chunk_table AND i.indisvalid
                      AND pg_get_expr(i.indexprs, i.indrelid) LIKE '%to_tsvector(%') THEN
        RETURN format('CREATE INDEX %s %I ON %s USING gin ((pg_catalog.to_tsvector(%L::pg_catalog.regconfig, content)))',
                      how, left((SELECT relname FROM pg_class WHERE oid = w.chunk_table), 48) || '_w' || w.id || '_fts',
                      w.chunk_table, w.fts_config);
    END IF;
    col := autoembed._attname(w.source, w.metadata_attnum);
    IF col IS NOT NULL AND NOT EXISTS (
           SELECT FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
            WHERE i.indrelid = w.source AND am.amname = 'gin' AND i.indnkeyatts = 1
              AND i.indkey[0] = w.metadata_attnum AND i.indisvalid) THEN
        RETURN format('CREATE INDEX %s %I ON %s USING gin (%I jsonb_path_ops)', how,
                      left((SELECT relname FROM pg_class WHERE oid = w.source), 48) || '_w' || w.id || '_meta',
                      w.source, col);
    END IF;
    RETURN NULL;
END
$$;

-- Create a chunk table for a watch (owned by the source table's owner).
CREATE OR REPLACE FUNCTION autoembed._make_chunk_table(watch_id integer, tbl_name name, dim integer)
RETURNS regclass
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w autoembed.watches%ROWTYPE;
    rel_schema name;
    owner oid;
    made regclass;
BEGIN
    SELECT * INTO STRICT w FROM autoembed.watches x WHERE x.id = watch_id;
    SELECT n.nspname, c.relowner INTO rel_schema, owner
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = w.source;
    EXECUTE format(
        'CREATE TABLE %I.%I (
             source_id    %s NOT NULL,
             chunk_hash   bigint NOT NULL,
             seq          integer NOT NULL DEFAULT 0,
             chunk_index  integer NOT NULL,
             start_offset integer NOT NULL,
             end_offset   integer NOT NULL,
             tokens       integer NOT NULL,
             content      text NOT NULL,
             embedding    %s,
             PRIMARY KEY (source_id, chunk_hash, seq)
         ) WITH (fillfactor = 90)',
        rel_schema, tbl_name,
        (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
          WHERE a.attrelid = w.source AND a.attnum = w.pk_attnum),
        autoembed.storage_type(dim, w.storage));
    made := format('%I.%I', rel_schema, tbl_name)::regclass;
    EXECUTE format('COMMENT ON TABLE %s IS %L', made,
                   format('autoembed: passages of %s and their vectors (watch %s)', w.source, w.id));
    -- a passage is visible to whoever can see its source row, and to nobody else
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', made);
    EXECUTE format(
        'CREATE POLICY visible_with_source ON %s USING (EXISTS (SELECT FROM %s AS s WHERE s.%I = source_id))',
        made, w.source, autoembed._attname(w.source, w.pk_attnum));
    EXECUTE format('GRANT SELECT ON %s TO PUBLIC', made);
    IF (SELECT relowner FROM pg_class WHERE oid = made) <> owner THEN
        PERFORM autoembed._hand_over('TABLE', made::text, owner, rel_schema);
    END IF;
    RETURN made;
END
$$;

-- The accessors of a chunked watch (besides _read, made by autoembed._accessors): _chunks
-- (the passages a row has), _put (a row's passages, as a whole), _keys (rows to queue),
-- _forget (passages of deleted rows), _swap (the end of a model or chunking change).
CREATE OR REPLACE FUNCTION autoembed._chunk_accessors(watch_id integer, resolve text, as_owner text)
RETURNS regprocedure[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $install$
DECLARE
    w autoembed.watches%ROWTYPE;
    prefix text;
    settings constant text := 'SET search_path = pg_catalog, pg_temp';
    key_settings constant text := $s$
        SET datestyle = 'ISO, YMD'
        SET intervalstyle = 'postgres'
        SET timezone = 'UTC'
        SET extra_float_digits = 1$s$;
    vschema name := autoembed.vector_schema();
    -- the chunk table a call works on: the watch's, or the one a change is building
    pick constant text := $p$
    IF target IS NULL OR NOT (target OPERATOR(pg_catalog.=) ANY (ARRAY[@CHUNKS@, @NEXT_CHUNKS@]::pg_catalog.oid[])) THEN
        RAISE EXCEPTION 'autoembed: watch @ID@ does not write table %', target
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    chunks := target::pg_catalog.regclass::pg_catalog.text;$p$;
    fns regprocedure[] := '{}';
    src text;
BEGIN
    SELECT * INTO STRICT w FROM autoembed.watches x WHERE x.id = watch_id;
    prefix := 'w' || w.id || '_';

    -- the passages rows have now (to embed only the new ones)
    src := $fn$
CREATE OR REPLACE FUNCTION autoembed.@NAME@(target oid, pks text[])
RETURNS TABLE (pk text, chunk_hash bigint, seq integer)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER @SETTINGS@
AS $body$
DECLARE
    src constant oid := @SRC@;
    lane constant text := 'embed';
    pkcol text; pktype text; inputs smallint[]; cols text[]; hash text; rel text; tcol text;
    good text[]; bad text[] := '{}'; why text[] := '{}'; q text; chunks text;
BEGIN
    @RESOLVE@
    @PICK@
    q := pg_catalog.format(
        'SELECT c.source_id::pg_catalog.text, c.chunk_hash, c.seq FROM %s AS c
          WHERE c.source_id OPERATOR(pg_catalog.=) ANY ($1::%s[])', chunks, pktype);
    @AS_OWNER@
    RETURN QUERY EXECUTE q USING good;
END
$body$$fn$;
    src := replace(replace(replace(src, '@NAME@', quote_ident(prefix || 'chunks')), '@RESOLVE@',
                           resolve), '@PICK@', pick);
    EXECUTE autoembed._fill_accessor(replace(src, '@AS_OWNER@', as_owner), w, settings);
    fns := fns || format('autoembed.%I(oid, text[])', prefix || 'chunks')::regprocedure;

    -- put: the passages of each row, as a whole, where the row's inputs still hash as what
    -- was read. A passage with a vector is new (inserted); one without is kept, and its
    -- position updated if it moved; passages not given are deleted.
    src := $fn$
CREATE OR REPLACE FUNCTION autoembed.@NAME@(
    target oid, pks text[], hashes bigint[],
    c_pk text[], c_hash bigint[], c_seq integer[], c_index integer[], c_start integer[],
    c_end integer[], c_tokens integer[], c_text text[], c_vec @VSCHEMA@.vector[])
RETURNS TABLE (pk text, outcome text, error text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER @SETTINGS@
AS $body$
DECLARE
    src constant oid := @SRC@;
    lane constant text := 'embed';
    pkcol text; pktype text; inputs smallint[]; cols text[]; hash text; rel text; tcol text;
    good text[]; bad text[] := '{}'; why text[] := '{}'; q text; chunks text;
    state text[]; ks text[]; ok text[]; g_hash bigint[];
BEGIN
    @RESOLVE@
    @PICK@
    SELECT pg_catalog.array_agg(x.h ORDER BY x.i) INTO g_hash
      FROM ROWS FROM (pg_catalog.unnest(pks), pg_catalog.unnest(hashes)) WITH ORDINALITY AS x(p, h, i)
     WHERE x.p OPERATOR(pg_catalog.=) ANY (good);
    -- each row: written (inputs unchanged), stale, or missing
    q := pg_catalog.format(
        'SELECT pg_catalog.array_agg(p.pk), pg_catalog.array_agg(CASE
                    WHEN t.%1$s IS NULL THEN CASE WHEN pg_catalog.row_security_active(%4$L::pg_catalog.regclass)
                                                  THEN ''hidden'' ELSE ''missing'' END
                    WHEN %2$s IS NOT DISTINCT FROM p.h THEN ''written''
                    ELSE ''stale'' END)
           FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.int8[])) AS p(pk, h)
           LEFT JOIN %4$s AS t ON t.%1$s OPERATOR(pg_catalog.=) p.pk::%3$s',
        pkcol, hash, pktype, rel);
    @AS_OWNER@
    EXECUTE q INTO ks, state USING good, g_hash;
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    SELECT pg_catalog.array_agg(x.k) INTO ok FROM ROWS FROM (pg_catalog.unnest(ks), pg_catalog.unnest(state)) AS x(k, s)
     WHERE x.s OPERATOR(pg_catalog.=) ANY (ARRAY['written', 'missing']);
    q := pg_catalog.format(
        'WITH n AS (SELECT * FROM ROWS FROM (
                        pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.int8[]),
                        pg_catalog.unnest($3::pg_catalog.int4[]), pg_catalog.unnest($4::pg_catalog.int4[]),
                        pg_catalog.unnest($5::pg_catalog.int4[]), pg_catalog.unnest($6::pg_catalog.int4[]),
                        pg_catalog.unnest($7::pg_catalog.int4[]), pg_catalog.unnest($8::pg_catalog.text[]),
                        pg_catalog.unnest($9::%3$I.vector[]))
                        AS n(pk, h, seq, idx, s, e, tok, txt, vec)
                     WHERE n.pk OPERATOR(pg_catalog.=) ANY ($10)),
              gone AS (DELETE FROM %1$s AS c
                        WHERE c.source_id OPERATOR(pg_catalog.=) ANY ($10::%2$s[])
                          AND NOT EXISTS (SELECT FROM n WHERE n.pk::%2$s OPERATOR(pg_catalog.=) c.source_id
                                             AND n.h OPERATOR(pg_catalog.=) c.chunk_hash
                                             AND n.seq OPERATOR(pg_catalog.=) c.seq)
                       RETURNING 1),
              moved AS (UPDATE %1$s AS c
                           SET chunk_index = n.idx, start_offset = n.s, end_offset = n.e, tokens = n.tok
                          FROM n
                         WHERE n.vec IS NULL
                           AND c.source_id OPERATOR(pg_catalog.=) n.pk::%2$s
                           AND c.chunk_hash OPERATOR(pg_catalog.=) n.h AND c.seq OPERATOR(pg_catalog.=) n.seq
                           AND (c.chunk_index, c.start_offset, c.end_offset, c.tokens)
                               IS DISTINCT FROM (n.idx, n.s, n.e, n.tok)
                        RETURNING 1),
              added AS (INSERT INTO %1$s AS c (source_id, chunk_hash, seq, chunk_index, start_offset,
                                               end_offset, tokens, content, embedding)
                        SELECT n.pk::%2$s, n.h, n.seq, n.idx, n.s, n.e, n.tok, n.txt, n.vec
                          FROM n WHERE n.vec IS NOT NULL
                        ON CONFLICT (source_id, chunk_hash, seq) DO UPDATE
                           SET embedding = EXCLUDED.embedding, chunk_index = EXCLUDED.chunk_index,
                               start_offset = EXCLUDED.start_offset, end_offset = EXCLUDED.end_offset,
                               tokens = EXCLUDED.tokens, content = EXCLUDED.content
                        RETURNING 1)
         SELECT (SELECT pg_catalog.count(*) FROM gone) OPERATOR(pg_catalog.+)
                (SELECT pg_catalog.count(*) FROM moved) OPERATOR(pg_catalog.+)
                (SELECT pg_catalog.count(*) FROM added)',
        chunks, pktype, @VSCHEMA_LIT@);
    IF pg_catalog.cardinality(ok) OPERATOR(pg_catalog.>) 0 THEN
        BEGIN
            @AS_OWNER@
            EXECUTE q USING c_pk, c_hash, c_seq, c_index, c_start, c_end, c_tokens, c_text, c_vec, ok;
            PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
        EXCEPTION WHEN OTHERS THEN
            IF @SERVER_FAULT@ THEN
                RAISE;
            END IF;
            -- one row's passages refused: each row alone, so that it fails alone
            FOR i IN 1 .. pg_catalog.cardinality(ok) LOOP
                BEGIN
                    @AS_OWNER@
                    EXECUTE q USING c_pk, c_hash, c_seq, c_index, c_start, c_end, c_tokens, c_text, c_vec, ARRAY[ok[i]];
                    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
                EXCEPTION WHEN OTHERS THEN
                    IF @SERVER_FAULT@ THEN
                        RAISE;
                    END IF;
                    FOR j IN 1 .. pg_catalog.cardinality(ks) LOOP
                        IF ks[j] OPERATOR(pg_catalog.=) ok[i] THEN
                            state[j] := 'error: ' OPERATOR(pg_catalog.||) SQLSTATE OPERATOR(pg_catalog.||) ': '
                                        OPERATOR(pg_catalog.||) SQLERRM;
                        END IF;
                    END LOOP;
                END;
            END LOOP;
        END;
    END IF;
    RETURN QUERY SELECT x.k, CASE WHEN x.s LIKE 'error: %' THEN 'error' ELSE x.s END,
                        CASE WHEN x.s LIKE 'error: %' THEN pg_catalog.substr(x.s, 8) END
                   FROM ROWS FROM (pg_catalog.unnest(ks), pg_catalog.unnest(state)) AS x(k, s);
    RETURN QUERY SELECT b.k, 'error'::text, 'the key does not parse: ' OPERATOR(pg_catalog.||) b.e
                   FROM ROWS FROM (pg_catalog.unnest(bad), pg_catalog.unnest(why)) AS b(k, e);
END
$body$$fn$;
    src := replace(replace(replace(src, '@NAME@', quote_ident(prefix || 'put')), '@RESOLVE@',
                           resolve), '@PICK@', pick);
    src := replace(src, '@VSCHEMA_LIT@', quote_literal(vschema));
    EXECUTE autoembed._fill_accessor(replace(src, '@AS_OWNER@', as_owner), w, settings);
    fns := fns || format('autoembed.%I(oid, text[], bigint[], text[], bigint[], integer[], integer[], integer[], integer[], integer[], text[], %I.vector[])',
                         prefix || 'put', vschema)::regprocedure;

    -- keys: the rows with text, optionally only those without any passage yet
    src := $fn$
CREATE OR REPLACE FUNCTION autoembed.@NAME@(lane text, target oid, only_missing boolean)
RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER @SETTINGS@
AS $body$
DECLARE
    src constant oid := @SRC@;
    pkcol text; pktype text; inputs smallint[]; cols text[]; hash text; rel text; tcol text;
    pks constant text[] := '{}'; good text[]; bad text[] := '{}'; why text[] := '{}'; q text; chunks text;
BEGIN
    @RESOLVE@
    @PICK@
    q := pg_catalog.format(
        'SELECT t.%s::pg_catalog.text FROM %s AS t WHERE (%s)%s',
        pkcol, rel,
        (SELECT pg_catalog.string_agg(pg_catalog.format('%s IS NOT NULL', c), ' OR ')
           FROM pg_catalog.unnest(cols) AS c),
        CASE WHEN only_missing
             THEN pg_catalog.format(' AND NOT EXISTS (SELECT FROM %s AS c WHERE c.source_id OPERATOR(pg_catalog.=) t.%s)',
                                    chunks, pkcol)
             ELSE '' END);
    @AS_OWNER@
    RETURN QUERY EXECUTE q;
END
$body$$fn$;
    src := replace(replace(replace(src, '@NAME@', quote_ident(prefix || 'keys')), '@RESOLVE@',
                           resolve), '@PICK@', pick);
    EXECUTE autoembed._fill_accessor(replace(src, '@AS_OWNER@', as_owner), w, settings || key_settings);
    fns := fns || format('autoembed.%I(text, oid, boolean)', prefix || 'keys')::regprocedure;

    -- forget: the passages of deleted rows (NULL: every row, after a TRUNCATE); called by
    -- the delete and truncate triggers (autoembed_definer may)
    src := $fn$
CREATE OR REPLACE FUNCTION autoembed.@NAME@(pks text[])
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER @SETTINGS@
AS $body$
DECLARE
    src constant oid := @SRC@;
    t oid;
    pktype text := (SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a
                     WHERE a.attrelid = src AND a.attnum = @PK@ AND NOT a.attisdropped);
BEGIN
    FOREACH t IN ARRAY ARRAY[@CHUNKS@, @NEXT_CHUNKS@]::pg_catalog.oid[] LOOP
        CONTINUE WHEN t IS NULL OR NOT EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.oid = t);
        IF pks IS NULL THEN
            EXECUTE pg_catalog.format('TRUNCATE %s', t::pg_catalog.regclass);
        ELSE
            EXECUTE pg_catalog.format('DELETE FROM %s AS c WHERE c.source_id OPERATOR(pg_catalog.=) ANY ($1::%s[])',
                                      t::pg_catalog.regclass, pktype) USING pks;
        END IF;
    END LOOP;
END
$body$$fn$;
    src := replace(src, '@NAME@', quote_ident(prefix || 'forget'));
    EXECUTE autoembed._fill_accessor(src, w, settings || key_settings);
    fns := fns || format('autoembed.%I(text[])', prefix || 'forget')::regprocedure;

    -- swap: the new chunk table takes the old one's name and place; the old is dropped
    src := $fn$
CREATE OR REPLACE FUNCTION autoembed.@NAME@(current_oid oid, next_oid oid)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER @SETTINGS@
AS $body$
DECLARE
    cur name; nsp name;
BEGIN
    IF current_oid IS DISTINCT FROM @CHUNKS@ OR next_oid IS DISTINCT FROM @NEXT_CHUNKS@ THEN
        RAISE EXCEPTION 'autoembed: watch @ID@ swaps tables % and %, not % and %',
            @CHUNKS@, @NEXT_CHUNKS@, current_oid, next_oid USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT c.relname, n.nspname INTO cur, nsp FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = current_oid;
    EXECUTE pg_catalog.format('ALTER TABLE %s RENAME TO %I', current_oid::pg_catalog.regclass,
                              pg_catalog.left(cur, 50) OPERATOR(pg_catalog.||) '__old_@ID@');
    EXECUTE pg_catalog.format('ALTER TABLE %s RENAME TO %I', next_oid::pg_catalog.regclass, cur);
    BEGIN
        EXECUTE pg_catalog.format('DROP TABLE %s', current_oid::pg_catalog.regclass);
    EXCEPTION WHEN dependent_objects_still_exist THEN
        RETURN pg_catalog.format('the old passages stay in %s: %s', current_oid::pg_catalog.regclass, SQLERRM);
    END;
    RETURN NULL;
END
$body$$fn$;
    src := replace(src, '@NAME@', quote_ident(prefix || 'swap'));
    EXECUTE autoembed._fill_accessor(src, w, settings);
    fns := fns || format('autoembed.%I(oid, oid)', prefix || 'swap')::regprocedure;
    RETURN fns;
END
$install$;

-- The search functions of a chunked watch:
--   match_<table>(query_embedding, match_threshold, match_count, filter)
--       -> (id, content, metadata, similarity, chunk_index): one row per source row, its
--          best passage (content is the passage)
--   match_<table>_chunks(...) -> every matching passage
--   hybrid_<table>(query_text, query_embedding, match_count, full_text_weight,
--                  semantic_weight, rrf_k, filter) -> per source row, passages fused
CREATE OR REPLACE FUNCTION autoembed._chunk_search_functions(watch_id integer, match_name name)
RETURNS regprocedure[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $search$
DECLARE
    w autoembed.watches%ROWTYPE;
    rel_schema name;
    vschema name := autoembed.vector_schema();
    iterative text := CASE WHEN autoembed.vector_version() >= 800
                           THEN 'SET hnsw.iterative_scan = relaxed_order' ELSE '' END;
    pk text;
    pk_type text;
    meta text;
    distance text;
    cfg text;
    chunks text;
    names name[];
    existing regprocedure;
    statement text;
    created regprocedure[] := '{}';
    fn regprocedure;
    i integer;
BEGIN
    SELECT * INTO STRICT w FROM autoembed.watches x WHERE x.id = watch_id;
    SELECT n.nspname INTO rel_schema
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = w.source;
    pk := format('t.%I', autoembed._attname(w.source, w.pk_attnum));
    pk_type := (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                 WHERE a.attrelid = w.source AND a.attnum = w.pk_attnum);
    meta := CASE WHEN w.metadata_attnum IS NULL THEN '''{}''::pg_catalog.jsonb'
                 ELSE format('t.%I', autoembed._attname(w.source, w.metadata_attnum)) END;
    chunks := w.chunk_table::text;
    distance := format('(c.embedding OPERATOR(%I.<=>) query_embedding::%I.%I)', vschema, vschema, w.storage);
    cfg := format('%L::pg_catalog.regconfig', w.fts_config);
    names := ARRAY[match_name, left(match_name, 56) || '_chunks',
                   CASE WHEN match_name LIKE 'match\_%' THEN left('hybrid_' || substr(match_name, 7), 63)
                        ELSE left('hybrid_' || match_name, 63) END];

    -- every matching passage (the source table joined: its row-level security applies)
    statement := format(
        $f$CREATE OR REPLACE FUNCTION %1$I.%2$I(
               query_embedding %3$I.vector,
               match_threshold double precision DEFAULT -1,
               match_count integer DEFAULT NULL,
               filter jsonb DEFAULT '{}')
           RETURNS TABLE (id %4$s, chunk_index integer, content text, metadata jsonb,
                          similarity double precision)
           LANGUAGE sql STABLE SECURITY INVOKER PARALLEL SAFE
           SET search_path = pg_catalog, pg_temp %5$s
           AS $body$
               WITH hits AS MATERIALIZED (/*<filtered*/
                   SELECT c.source_id AS id, c.chunk_index, c.content, %6$s AS metadata, %7$s AS distance
                     FROM %8$s AS c JOIN %9$s AS t ON %10$s OPERATOR(pg_catalog.=) c.source_id
                    WHERE %7$s OPERATOR(pg_catalog.<) (1::double precision OPERATOR(pg_catalog.-) match_threshold)
                      AND @FILTER@
                    ORDER BY %7$s
                    LIMIT match_count/*filtered>*/)
               SELECT h.id, h.chunk_index, h.content, h.metadata,
                      1::double precision OPERATOR(pg_catalog.-) h.distance
                 FROM hits AS h ORDER BY h.distance
           $body$$f$,
        rel_schema, names[2], vschema, pk_type, iterative, meta, distance, chunks, w.source, pk);
    statement := autoembed._filter_regions(statement, meta, '$4');
    SELECT f INTO existing FROM unnest(w.functions) AS f
     WHERE EXISTS (SELECT FROM pg_proc x WHERE x.oid = f::oid AND x.proname = names[2]);
    created := created || autoembed._replace_function(w.id, statement, existing, rel_schema, names[2]);

    -- one row per source row: its best passage, among the nearest passages
    statement := format(
        $f$CREATE OR REPLACE FUNCTION %1$I.%2$I(
               query_embedding %3$I.vector,
               match_threshold double precision DEFAULT -1,
               match_count integer DEFAULT NULL,
               filter jsonb DEFAULT '{}')
           RETURNS TABLE (id %4$s, content text, metadata jsonb, similarity double precision,
                          chunk_index integer)
           LANGUAGE sql STABLE SECURITY INVOKER PARALLEL SAFE
           SET search_path = pg_catalog, pg_temp %5$s
           AS $body$
               WITH hits AS MATERIALIZED (/*<filtered*/
                   SELECT c.source_id AS id, c.chunk_index, c.content, %6$s AS metadata, %7$s AS distance
                     FROM %8$s AS c JOIN %9$s AS t ON %10$s OPERATOR(pg_catalog.=) c.source_id
                    WHERE %7$s OPERATOR(pg_catalog.<) (1::double precision OPERATOR(pg_catalog.-) match_threshold)
                      AND @FILTER@
                    ORDER BY %7$s
                    LIMIT least(coalesce(match_count, 1000) OPERATOR(pg_catalog.*) 8, 10000)/*filtered>*/),
               best AS (
                   SELECT DISTINCT ON (h.id) h.id, h.content, h.metadata, h.distance, h.chunk_index
                     FROM hits AS h ORDER BY h.id, h.distance)
               SELECT b.id, b.content, b.metadata,
                      1::double precision OPERATOR(pg_catalog.-) b.distance, b.chunk_index
                 FROM best AS b ORDER BY b.distance LIMIT match_count
           $body$$f$,
        rel_schema, names[1], vschema, pk_type, iterative, meta, distance, chunks, w.source, pk);
    statement := autoembed._filter_regions(statement, meta, '$4');
    created := created || autoembed._replace_function(
        w.id, statement,
        CASE WHEN (SELECT proname FROM pg_proc WHERE oid = w.match_function::oid) = names[1]
             THEN w.match_function END,
        rel_schema, names[1]);

    -- hybrid over passages, fused per source row
    statement := format(
        $f$CREATE OR REPLACE FUNCTION %1$I.%2$I(
               query_text text,
               query_embedding %3$I.vector,
               match_count integer DEFAULT 10,
               full_text_weight double precision DEFAULT 1,
               semantic_weight double precision DEFAULT 1,
               rrf_k integer DEFAULT 50,
               filter jsonb DEFAULT '{}')
           RETURNS TABLE (id %4$s, content text, metadata jsonb, similarity double precision,
                          score double precision, chunk_index integer)
           LANGUAGE sql STABLE SECURITY INVOKER PARALLEL SAFE
           SET search_path = pg_catalog, pg_temp %5$s
           AS $body$
               WITH q AS (SELECT pg_catalog.websearch_to_tsquery(%11$s, query_text) AS tsq),
               full_text AS MATERIALIZED (
                   SELECT x.id, x.chunk_index, x.content, x.metadata, x.distance,
                          pg_catalog.row_number() OVER (ORDER BY x.rank DESC) AS rank_ix
                     FROM (SELECT DISTINCT ON (y.id) y.* FROM (/*<filtered*/
                             SELECT c.source_id AS id, c.chunk_index, c.content, %6$s AS metadata,
                                    %7$s AS distance,
                                    pg_catalog.ts_rank_cd(pg_catalog.to_tsvector(%11$s, c.content), q.tsq) AS rank
                               FROM %8$s AS c JOIN %9$s AS t ON %10$s OPERATOR(pg_catalog.=) c.source_id, q
                              WHERE pg_catalog.to_tsvector(%11$s, c.content) OPERATOR(pg_catalog.@@) q.tsq
                                AND @FILTER@
                              ORDER BY rank DESC
                              LIMIT match_count OPERATOR(pg_catalog.*) 8/*filtered>*/) AS y
                           ORDER BY y.id, y.rank DESC) AS x
                    ORDER BY x.rank DESC LIMIT match_count OPERATOR(pg_catalog.*) 2),
               semantic AS MATERIALIZED (
                   SELECT x.id, x.chunk_index, x.content, x.metadata, x.distance,
                          pg_catalog.row_number() OVER (ORDER BY x.distance) AS rank_ix
                     FROM (SELECT DISTINCT ON (y.id) y.* FROM (/*<filtered*/
                             SELECT c.source_id AS id, c.chunk_index, c.content, %6$s AS metadata,
                                    %7$s AS distance
                               FROM %8$s AS c JOIN %9$s AS t ON %10$s OPERATOR(pg_catalog.=) c.source_id
                              WHERE @FILTER@
                              ORDER BY %7$s
                              LIMIT match_count OPERATOR(pg_catalog.*) 8/*filtered>*/) AS y
                           ORDER BY y.id, y.distance) AS x
                    ORDER BY x.distance LIMIT match_count OPERATOR(pg_catalog.*) 2)
               SELECT coalesce(s.id, f.id), coalesce(s.content, f.content), coalesce(s.metadata, f.metadata),
                      1::double precision OPERATOR(pg_catalog.-) coalesce(s.distance, f.distance),
                      (coalesce(1::double precision OPERATOR(pg_catalog./) (rrf_k OPERATOR(pg_catalog.+) f.rank_ix), 0)
                          OPERATOR(pg_catalog.*) full_text_weight)
                      OPERATOR(pg_catalog.+)
                      (coalesce(1::double precision OPERATOR(pg_catalog./) (rrf_k OPERATOR(pg_catalog.+) s.rank_ix), 0)
                          OPERATOR(pg_catalog.*) semantic_weight) AS score,
                      coalesce(s.chunk_index, f.chunk_index)
                 FROM full_text AS f FULL JOIN semantic AS s ON f.id OPERATOR(pg_catalog.=) s.id
                ORDER BY score DESC, 1
                LIMIT match_count
           $body$$f$,
        rel_schema, names[3], vschema, pk_type, iterative, meta, distance, chunks, w.source, pk, cfg);
    statement := autoembed._filter_regions(statement, meta, '$7');
    SELECT f INTO existing FROM unnest(w.functions) AS f
     WHERE EXISTS (SELECT FROM pg_proc x WHERE x.oid = f::oid AND x.proname = names[3]);
    created := created || autoembed._replace_function(w.id, statement, existing, rel_schema, names[3]);
    -- the best-passage function first: it is the watch's match function
    PERFORM pg_notify('pgrst', 'reload schema');
    RETURN ARRAY[created[2], created[1], created[3]];
END
$search$;
