-- Repeatable: re-applied by every `autoembed migrate`.
--
-- The search functions a watch makes next to its table, SECURITY INVOKER (row-level
-- security decides what each caller sees), with parameter and result names that Supabase's
-- guides and LangChain's Supabase stores call by:
--
--   match_<table>(query_embedding, match_threshold = -1, match_count = NULL, filter = '{}')
--       -> (id, content, metadata, similarity), nearest first
--   hybrid_<table>(query_text, query_embedding, match_count = 10, full_text_weight = 1,
--                  semantic_weight = 1, rrf_k = 50, filter = '{}')
--       -> (id, content, metadata, similarity, score): full text and vector ranks fused by
--          reciprocal rank (Supabase's hybrid-search recipe)
--
-- `filter` is jsonb containment on the watch's metadata column (metadata @> filter),
-- applied inside the nearest-neighbour search: with pgvector 0.8 the HNSW scan goes on
-- (hnsw.iterative_scan) until match_count rows pass it. A watch without a metadata column
-- has metadata '{}', which only an empty filter matches. Every function and operator is
-- qualified, so nothing on a caller's search_path can shadow them.

-- The statements shared by the search functions: the table's columns as the functions use
-- them, and a guard that the key and text columns are still of the types the functions
-- were made for (a column retyped to a type with a cast of someone else's is never read).
CREATE OR REPLACE FUNCTION autoembed._search_parts(w autoembed.watches)
RETURNS TABLE (pk text, pk_type text, content text, emb text, meta text, distance text,
               guard text, tsv text, cfg text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    vschema name := autoembed.vector_schema();
BEGIN
    pk := format('t.%I', autoembed._attname(w.source, w.pk_attnum));
    pk_type := (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                 WHERE a.attrelid = w.source AND a.attnum = w.pk_attnum);
    content := format('t.%I::pg_catalog.text', autoembed._attname(w.source, w.content_attnum));
    emb := format('t.%I', autoembed._attname(w.source, w.embedding_attnum));
    meta := CASE WHEN w.metadata_attnum IS NULL THEN '''{}''::pg_catalog.jsonb'
                 ELSE format('t.%I', autoembed._attname(w.source, w.metadata_attnum)) END;
    distance := format('(%s OPERATOR(%I.<=>) query_embedding::%I.%I)', emb, vschema, vschema, w.storage);
    guard := format(
        '(SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute a
           WHERE a.attrelid OPERATOR(pg_catalog.=) %s::pg_catalog.oid AND NOT a.attisdropped
             AND ((a.attnum OPERATOR(pg_catalog.=) %s AND a.atttypid OPERATOR(pg_catalog.=) %s::pg_catalog.oid)
               OR (a.attnum OPERATOR(pg_catalog.=) %s AND a.atttypid OPERATOR(pg_catalog.=) %s::pg_catalog.oid)))
         OPERATOR(pg_catalog.=) 2',
        w.source::oid, w.pk_attnum,
        (SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = w.source AND a.attnum = w.pk_attnum),
        w.content_attnum,
        (SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = w.source AND a.attnum = w.content_attnum));
    cfg := format('%L::pg_catalog.regconfig', w.fts_config);
    -- the expression the GIN index of the watch is built on (see autoembed.index_sql)
    tsv := format('pg_catalog.to_tsvector(%s, %s)', cfg, content);
    RETURN NEXT;
END
$$;

-- A SELECT of a search function (with its ORDER BY and LIMIT) whose WHERE clause holds the
-- placeholder @FILTER@, made into two branches of a UNION ALL: one without the metadata
-- clause, run when the filter is empty, and one with it, run otherwise. The branch's gate
-- refers to the arguments only, so the executor runs one branch and skips the other, and
-- the planner plans each for what it does: the unfiltered nearest-row search uses the
-- HNSW index, rather than a scan of the metadata index that every row passes ('{}').
-- `filter_arg` is the argument's position ($4), which no column name can shadow.
CREATE OR REPLACE FUNCTION autoembed._filtered(query text, meta text, filter_arg text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('(%s) UNION ALL (%s)',
                  replace(query, '@FILTER@',
                          format('(%1$s IS NULL OR %1$s OPERATOR(pg_catalog.=) ''{}''::pg_catalog.jsonb)',
                                 filter_arg)),
                  replace(query, '@FILTER@',
                          format('%1$s IS NOT NULL AND %1$s OPERATOR(pg_catalog.<>) ''{}''::pg_catalog.jsonb'
                                 ' AND %2$s OPERATOR(pg_catalog.@>) %1$s', filter_arg, meta)))
$$;

-- The same for each region of a statement marked /*<filtered*/ ... /*filtered>*/.
CREATE OR REPLACE FUNCTION autoembed._filter_regions(statement text, meta text, filter_arg text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    open_at integer;
    close_at integer;
BEGIN
    LOOP
        open_at := strpos(statement, '/*<filtered*/');
        EXIT WHEN open_at = 0;
        close_at := strpos(statement, '/*filtered>*/');
        IF close_at < open_at THEN
            RAISE EXCEPTION 'autoembed: unbalanced filtered region in a search function';
        END IF;
        statement := substr(statement, 1, open_at - 1)
                     || autoembed._filtered(substr(statement, open_at + 13, close_at - open_at - 13),
                                            meta, filter_arg)
                     || substr(statement, close_at + 13);
    END LOOP;
    RETURN statement;
END
$$;

-- Create (or replace) the search functions of a watch; returns them.
CREATE OR REPLACE FUNCTION autoembed._search_functions(watch_id integer, match_name name)
RETURNS regprocedure[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $search$
DECLARE
    w autoembed.watches%ROWTYPE;
    p record;
    rel_schema name;
    vschema name := autoembed.vector_schema();
    iterative text := CASE WHEN autoembed.vector_version() >= 800
                           THEN 'SET hnsw.iterative_scan = relaxed_order' ELSE '' END;
    hybrid_name name;
    existing regprocedure;
    statement text;
    created regprocedure[] := '{}';
    fn regprocedure;
BEGIN
    SELECT * INTO STRICT w FROM autoembed.watches x WHERE x.id = watch_id;
    SELECT * INTO p FROM autoembed._search_parts(w);
    SELECT n.nspname INTO rel_schema
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = w.source;

    -- nearest rows by cosine similarity
    statement := format(
        $f$CREATE OR REPLACE FUNCTION %1$I.%2$I(
               query_embedding %3$I.vector,
               match_threshold double precision DEFAULT -1,
               match_count integer DEFAULT NULL,
               filter jsonb DEFAULT '{}')
           RETURNS TABLE (id %4$s, content text, metadata jsonb, similarity double precision)
           LANGUAGE sql STABLE SECURITY INVOKER PARALLEL SAFE
           SET search_path = pg_catalog, pg_temp %5$s
           AS $body$
               WITH hits AS MATERIALIZED (%6$s)
               SELECT h.id, h.content, h.metadata,
                      1::double precision OPERATOR(pg_catalog.-) h.distance
                 FROM hits AS h
                ORDER BY h.distance
           $body$$f$,
        rel_schema, match_name, vschema, p.pk_type, iterative,
        autoembed._filtered(format(
            $q$SELECT %1$s AS id, %2$s AS content, %3$s AS metadata, %4$s AS distance
                 FROM %5$s AS t
                WHERE %4$s OPERATOR(pg_catalog.<) (1::double precision OPERATOR(pg_catalog.-) match_threshold)
                  AND @FILTER@
                  AND %6$s
                ORDER BY %4$s
                LIMIT match_count$q$,
            p.pk, p.content, p.meta, p.distance, w.source, p.guard), p.meta, '$4'));
    fn := autoembed._replace_function(w.id, statement,
                                      CASE WHEN (SELECT proname FROM pg_proc WHERE oid = w.match_function::oid)
                                                = match_name THEN w.match_function END,
                                      rel_schema, match_name);
    EXECUTE format('COMMENT ON FUNCTION %s IS %L', fn,
                   format('autoembed: nearest rows of %s by cosine similarity (model %s)', w.source, w.model));
    created := created || fn;

    -- hybrid: full text and vector ranks fused by reciprocal rank
    hybrid_name := CASE WHEN match_name LIKE 'match\_%' THEN left('hybrid_' || substr(match_name, 7), 63)
                        ELSE left('hybrid_' || match_name, 63) END;
    SELECT f INTO existing FROM unnest(w.functions) AS f
     WHERE EXISTS (SELECT FROM pg_proc x WHERE x.oid = f::oid AND x.proname LIKE 'hybrid\_%');
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
                          score double precision)
           LANGUAGE sql STABLE SECURITY INVOKER PARALLEL SAFE
           SET search_path = pg_catalog, pg_temp %5$s
           AS $body$
               WITH q AS (SELECT pg_catalog.websearch_to_tsquery(%12$s, query_text) AS tsq),
               full_text AS MATERIALIZED (
                   SELECT x.id, pg_catalog.row_number() OVER (ORDER BY x.rank DESC) AS rank_ix
                     FROM (%14$s) AS x),
               semantic AS MATERIALIZED (
                   SELECT x.id, pg_catalog.row_number() OVER (ORDER BY x.distance) AS rank_ix
                     FROM (%15$s) AS x),
               fused AS (
                   SELECT coalesce(f.id, s.id) AS id,
                          (coalesce(1::double precision OPERATOR(pg_catalog./) (rrf_k OPERATOR(pg_catalog.+) f.rank_ix), 0)
                              OPERATOR(pg_catalog.*) full_text_weight)
                          OPERATOR(pg_catalog.+)
                          (coalesce(1::double precision OPERATOR(pg_catalog./) (rrf_k OPERATOR(pg_catalog.+) s.rank_ix), 0)
                              OPERATOR(pg_catalog.*) semantic_weight) AS score
                     FROM full_text AS f FULL JOIN semantic AS s ON f.id OPERATOR(pg_catalog.=) s.id)
               SELECT %6$s, %7$s, %8$s,
                      1::double precision OPERATOR(pg_catalog.-) %9$s, fused.score
                 FROM fused JOIN %10$s AS t ON %6$s OPERATOR(pg_catalog.=) fused.id
                ORDER BY fused.score DESC, %6$s
                LIMIT match_count
           $body$$f$,
        rel_schema, hybrid_name, vschema, p.pk_type, iterative, p.pk, p.content, p.meta,
        p.distance, w.source, p.guard, p.cfg, p.tsv,
        autoembed._filtered(format(
            $q$SELECT %1$s AS id, pg_catalog.ts_rank_cd(%2$s, q.tsq) AS rank
                 FROM %3$s AS t, q
                WHERE %2$s OPERATOR(pg_catalog.@@) q.tsq
                  AND @FILTER@
                  AND %4$s
                ORDER BY 2 DESC
                LIMIT match_count OPERATOR(pg_catalog.*) 2$q$,
            p.pk, p.tsv, w.source, p.guard), p.meta, '$7'),
        autoembed._filtered(format(
            $q$SELECT %1$s AS id, %2$s AS distance
                 FROM %3$s AS t
                WHERE @FILTER@
                  AND %4$s
                ORDER BY %2$s
                LIMIT match_count OPERATOR(pg_catalog.*) 2$q$,
            p.pk, p.distance, w.source, p.guard), p.meta, '$7'));
    fn := autoembed._replace_function(w.id, statement, existing, rel_schema, hybrid_name);
    EXECUTE format('COMMENT ON FUNCTION %s IS %L', fn,
                   format('autoembed: hybrid (full text + vector, reciprocal rank fusion) search of %s',
                          w.source));
    created := created || fn;
    -- PostgREST (Supabase's REST API) reloads its schema cache on this notification
    PERFORM pg_notify('pgrst', 'reload schema');
    RETURN created;
END
$search$;

-- Run a CREATE OR REPLACE FUNCTION of a watch; when the function's arguments or result
-- changed (an older autoembed's signature, another key type), the old one (`previous`) is
-- dropped. Refuses to touch a function of that name that autoembed did not make, or that
-- belongs to another watch.
CREATE OR REPLACE FUNCTION autoembed._replace_function(
    watch_id integer, statement text, previous regprocedure, fn_schema name, fn_name name)
RETURNS regprocedure
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    same regprocedure;
    other integer;
    made regprocedure;
BEGIN
    FOR same IN SELECT p.oid::regprocedure FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname = fn_schema AND p.proname = fn_name LOOP
        CONTINUE WHEN same = previous;
        SELECT x.id INTO other FROM autoembed.watches x
         WHERE same = ANY (x.functions) OR x.match_function = same LIMIT 1;
        IF other IS NULL THEN
            RAISE EXCEPTION 'autoembed: function %.% exists and was not created by autoembed', fn_schema, fn_name
                USING HINT = 'Pass match_function => ''another_name'' to autoembed.watch '
                             '(--match-function on the command line), or drop that function.',
                      ERRCODE = 'duplicate_function';
        ELSIF other <> watch_id THEN
            RAISE EXCEPTION 'autoembed: function %.% is a search function of another watch (%)',
                fn_schema, fn_name, other
                USING HINT = 'Pass match_function => ''another_name'' (--match-function).',
                      ERRCODE = 'duplicate_function';
        END IF;
    END LOOP;
    BEGIN
        EXECUTE statement;
    EXCEPTION WHEN invalid_function_definition THEN
        -- other parameter names, defaults or result columns: made again
        EXECUTE format('DROP FUNCTION %s', previous);
        EXECUTE statement;
    END;
    SELECT p.oid::regprocedure INTO made FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname = fn_schema AND p.proname = fn_name
     ORDER BY p.oid = previous::oid, p.oid DESC LIMIT 1;
    IF previous IS NOT NULL AND previous <> made AND EXISTS (SELECT FROM pg_proc WHERE oid = previous::oid) THEN
        -- another argument list made a second function beside the first
        EXECUTE format('DROP FUNCTION %s', previous);
    END IF;
    RETURN made;
END
$$;
