-- Repeatable: re-applied by every `autoembed migrate`.

-- (Re)create what a watch hangs on its table: the two queue triggers, the HNSW cosine index
-- and the match_<table> search function. Idempotent.
CREATE OR REPLACE FUNCTION autoembed._install(watch_id integer, match_name name)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $install$
DECLARE
    w autoembed.watches%ROWTYPE;
    rel_schema name;
    rel_name name;
    vschema name := autoembed.vector_schema();
    existing regprocedure;
    created regprocedure;
BEGIN
    SELECT * INTO STRICT w FROM autoembed.watches x WHERE x.id = watch_id;
    SELECT n.nspname, c.relname INTO rel_schema, rel_name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = w.source;

    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'autoembed_' || w.id || '_insert', w.source);
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'autoembed_' || w.id || '_update', w.source);
    EXECUTE format(
        'CREATE TRIGGER %I AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows
         FOR EACH STATEMENT EXECUTE FUNCTION autoembed.queue_changes(%L)',
        'autoembed_' || w.id || '_insert', w.source, w.id);
    -- no column list: PostgreSQL allows no transition tables on UPDATE OF col triggers, and
    -- the trigger compares old and new text itself, so other columns never re-embed
    EXECUTE format(
        'CREATE TRIGGER %I AFTER UPDATE ON %s
         REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
         FOR EACH STATEMENT EXECUTE FUNCTION autoembed.queue_changes(%L)',
        'autoembed_' || w.id || '_update', w.source, w.id);

    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON %s USING hnsw (%I %I.vector_cosine_ops)',
        left(rel_name || '_' || w.embedding_column || '_hnsw', 63),
        w.source, w.embedding_column, vschema);

    -- the search function, as Supabase's guides write it (parameter names matter: PostgREST
    -- passes them by name). SECURITY INVOKER: row-level security decides what a caller sees.
    SELECT p.oid::regprocedure INTO existing
      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname = rel_schema AND p.proname = match_name
     LIMIT 1;
    IF existing IS NOT NULL AND existing IS DISTINCT FROM w.match_function THEN
        RAISE EXCEPTION 'autoembed: function %.% exists and was not created by autoembed',
            rel_schema, match_name
            USING HINT = 'Pass match_function => ''another_name'' to autoembed.watch '
                         '(--match-function on the command line), or drop that function.',
                  ERRCODE = 'duplicate_function';
    END IF;
    IF w.match_function IS NOT NULL
       AND EXISTS (SELECT FROM pg_proc WHERE oid = w.match_function::oid)
       AND (SELECT proname FROM pg_proc WHERE oid = w.match_function::oid) <> match_name THEN
        EXECUTE format('DROP FUNCTION %s', w.match_function);
    END IF;
    EXECUTE format(
        $f$CREATE OR REPLACE FUNCTION %1$I.%2$I(
               query_embedding %3$s,
               match_threshold double precision,
               match_count integer)
           RETURNS TABLE (%4$I %5$s, %6$I text, similarity double precision)
           LANGUAGE sql STABLE SECURITY INVOKER PARALLEL SAFE
           AS $body$
               SELECT t.%4$I, t.%6$I::text,
                      1 - (t.%7$I OPERATOR(%8$I.<=>) query_embedding) AS similarity
                 FROM %9$s AS t
                WHERE t.%7$I OPERATOR(%8$I.<=>) query_embedding < 1 - match_threshold
                ORDER BY t.%7$I OPERATOR(%8$I.<=>) query_embedding
                LIMIT match_count
           $body$$f$,
        rel_schema, match_name, autoembed.vector_type(w.dim), w.pk_column, w.pk_type,
        w.content_column, w.embedding_column, vschema, w.source);
    created := format('%I.%I(%s, double precision, integer)',
                      rel_schema, match_name, autoembed.vector_type(w.dim))::regprocedure;
    EXECUTE format(
        'COMMENT ON FUNCTION %s IS %L', created,
        format('autoembed: nearest rows of %s by cosine similarity of %I (model %s)',
               w.source, w.embedding_column, w.model));
    UPDATE autoembed.watches x SET match_function = created WHERE x.id = w.id;
    -- PostgREST (Supabase's REST API) reloads its schema cache on this notification
    PERFORM pg_notify('pgrst', 'reload schema');
END
$install$;

-- Queue every row of a watch again (after a model or column change).
CREATE OR REPLACE FUNCTION autoembed._requeue(watch_id integer, only_missing boolean)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w autoembed.watches%ROWTYPE;
    queued bigint;
BEGIN
    SELECT * INTO STRICT w FROM autoembed.watches x WHERE x.id = watch_id;
    EXECUTE autoembed._enqueue_sql(format(
        'SELECT $1, l.lane, t.%1$I::text
           FROM %2$s t CROSS JOIN unnest($2::text[]) AS l(lane)
          WHERE t.%3$I IS NOT NULL
            AND (NOT $3 OR (l.lane = ''embed'' AND t.%4$I IS NULL)
                        OR (l.lane = ''summary'' AND t.%5$I IS NULL))',
        w.pk_column, w.source, w.content_column, w.embedding_column,
        coalesce(w.summary_column, w.embedding_column)))
    USING w.id, autoembed.lanes(w.summary_column), only_missing;
    GET DIAGNOSTICS queued = ROW_COUNT;
    IF queued > 0 THEN
        PERFORM pg_notify('autoembed', w.id::text);
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
    SELECT * INTO m FROM autoembed.models x WHERE x.name = lower(model_name);
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

-- Change the model of a watch: its vectors are cleared (one vector space per column), the
-- column is retyped if the dimension differs, and every row is queued again.
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
BEGIN
    SELECT * INTO w FROM autoembed.watches x
     WHERE x.source = set_model.source AND x.embedding_column = set_model.embedding_column;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'autoembed: %.% is not watched', set_model.source, set_model.embedding_column
            USING ERRCODE = 'undefined_object';
    END IF;
    IF w.model = m.name THEN
        RETURN w.id;
    END IF;
    IF w.dim <> m.dim THEN
        EXECUTE format('ALTER TABLE %s ALTER COLUMN %I TYPE %s USING NULL',
                       w.source, w.embedding_column, autoembed.vector_type(m.dim));
    ELSE
        EXECUTE format('UPDATE %s SET %I = NULL WHERE %I IS NOT NULL',
                       w.source, w.embedding_column, w.embedding_column);
    END IF;
    UPDATE autoembed.watches x SET model = m.name, dim = m.dim WHERE x.id = w.id;
    DELETE FROM autoembed.jobs j WHERE j.watch_id = w.id AND j.lane = 'embed';
    PERFORM autoembed._install(w.id, (SELECT proname FROM pg_proc WHERE oid = w.match_function::oid));
    PERFORM autoembed._requeue(w.id, false);
    RETURN w.id;
END
$$;

-- Watch a table: keep <embedding_column> in step with <content_column> using <model>.
CREATE OR REPLACE FUNCTION autoembed.watch(
    source regclass,
    content_column name,
    embedding_column name DEFAULT 'embedding',
    model text DEFAULT 'gte-small',
    match_function name DEFAULT NULL,
    summary_column name DEFAULT NULL,
    llm_model text DEFAULT NULL,
    llm_prompt text DEFAULT NULL,
    llm_options jsonb DEFAULT '{}'::jsonb
)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src constant regclass := watch.source;
    emb constant name := watch.embedding_column;
    content constant name := watch.content_column;
    m autoembed.models%ROWTYPE := autoembed._model(watch.model);
    w autoembed.watches%ROWTYPE;
    kind "char";
    pk_cols name[];
    pk_typ text;
    col_type oid;
    col_typmod integer;
    vtype oid;
    columns text;
    fn_name name;
    wid integer;
BEGIN
    SELECT c.relkind INTO kind FROM pg_class c WHERE c.oid = src;
    IF kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'autoembed: % is not a table', src USING ERRCODE = 'wrong_object_type';
    END IF;
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO columns
      FROM pg_attribute a WHERE a.attrelid = src AND a.attnum > 0 AND NOT a.attisdropped;

    SELECT array_agg(a.attname ORDER BY k.ord), min(format_type(a.atttypid, a.atttypmod))
      INTO pk_cols, pk_typ
      FROM pg_index i
     CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = src AND i.indisprimary;
    IF pk_cols IS NULL THEN
        RAISE EXCEPTION 'autoembed: table % has no primary key', src
            USING HINT = format('autoembed finds rows by their primary key. Add one, e.g. '
                                'ALTER TABLE %s ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY', src),
                  ERRCODE = 'invalid_table_definition';
    END IF;
    IF cardinality(pk_cols) > 1 THEN
        RAISE EXCEPTION 'autoembed: table % has a primary key of % columns', src, cardinality(pk_cols)
            USING HINT = 'autoembed needs a single-column primary key; add a surrogate key column.',
                  ERRCODE = 'feature_not_supported';
    END IF;

    IF NOT EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = src AND a.attname = content
                      AND a.attnum > 0 AND NOT a.attisdropped) THEN
        RAISE EXCEPTION 'autoembed: table % has no column "%"', src, content
            USING HINT = format('Its columns are: %s.', columns), ERRCODE = 'undefined_column';
    END IF;
    IF watch.summary_column IS NOT NULL AND NOT EXISTS (
           SELECT FROM pg_attribute a WHERE a.attrelid = src AND a.attname = watch.summary_column
              AND a.attnum > 0 AND NOT a.attisdropped) THEN
        RAISE EXCEPTION 'autoembed: table % has no column "%" for summaries', src, watch.summary_column
            USING HINT = format('Add it (ALTER TABLE %s ADD COLUMN %I text) or pick one of: %s.',
                                src, watch.summary_column, columns),
                  ERRCODE = 'undefined_column';
    END IF;
    IF watch.summary_column IS NOT NULL AND watch.llm_model IS NULL THEN
        RAISE EXCEPTION 'autoembed: a summary column needs an LLM model (llm_model)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    SELECT * INTO w FROM autoembed.watches x WHERE x.source = src AND x.embedding_column = emb;
    IF FOUND AND w.model <> m.name THEN
        PERFORM autoembed.set_model(src, m.name, emb);
        SELECT * INTO w FROM autoembed.watches x WHERE x.id = w.id;
    END IF;

    SELECT t.oid INTO vtype FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
     WHERE t.typname = 'vector' AND n.nspname = autoembed.vector_schema();
    SELECT a.atttypid, a.atttypmod INTO col_type, col_typmod
      FROM pg_attribute a WHERE a.attrelid = src AND a.attname = emb AND a.attnum > 0 AND NOT a.attisdropped;
    IF col_type IS NULL THEN
        EXECUTE format('ALTER TABLE %s ADD COLUMN %I %s', src, emb, autoembed.vector_type(m.dim));
    ELSIF col_type <> vtype THEN
        RAISE EXCEPTION 'autoembed: column %.% is %, not a vector', src, emb, format_type(col_type, col_typmod)
            USING HINT = 'Pass embedding_column => ''another_name'' (--embedding-column).',
                  ERRCODE = 'datatype_mismatch';
    ELSIF col_typmod <> m.dim THEN
        RAISE EXCEPTION 'autoembed: column %.% is %, but model % makes vector(%)',
            src, emb, format_type(col_type, col_typmod), m.name, m.dim
            USING HINT = format('Pick another embedding column, or retype this one: '
                                'ALTER TABLE %s ALTER COLUMN %I TYPE %s USING NULL',
                                src, emb, autoembed.vector_type(m.dim)),
                  ERRCODE = 'datatype_mismatch';
    END IF;

    fn_name := coalesce(watch.match_function,
                        (SELECT proname FROM pg_proc WHERE oid = w.match_function::oid),
                        left('match_' || (SELECT relname FROM pg_class WHERE oid = src), 63));
    IF w.id IS NULL THEN
        INSERT INTO autoembed.watches AS x (source, pk_column, pk_type, content_column,
                embedding_column, model, dim, summary_column, llm_model, llm_prompt, llm_options)
        VALUES (src, pk_cols[1], pk_typ, content, emb, m.name, m.dim, watch.summary_column,
                watch.llm_model, watch.llm_prompt, coalesce(watch.llm_options, '{}'::jsonb))
        RETURNING x.id INTO wid;
    ELSE
        wid := w.id;
        UPDATE autoembed.watches x
           SET content_column = content, pk_column = pk_cols[1], pk_type = pk_typ,
               summary_column = watch.summary_column, llm_model = watch.llm_model,
               llm_prompt = watch.llm_prompt, llm_options = coalesce(watch.llm_options, '{}'::jsonb)
         WHERE x.id = wid;
    END IF;
    PERFORM autoembed._install(wid, fn_name);
    -- a new watch queues the rows that have no vector yet; a changed text column, all rows
    PERFORM autoembed._requeue(wid, w.id IS NULL OR w.content_column = content);
    RETURN wid;
END
$$;

-- Stop watching: drops the triggers, the search function and the queued work. The vector
-- column and its index stay unless drop_column is true.
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
    w autoembed.watches%ROWTYPE;
BEGIN
    SELECT * INTO w FROM autoembed.watches x
     WHERE x.source = unwatch.source AND x.embedding_column = unwatch.embedding_column;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'autoembed_' || w.id || '_insert', w.source);
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'autoembed_' || w.id || '_update', w.source);
    IF w.match_function IS NOT NULL AND EXISTS (SELECT FROM pg_proc WHERE oid = w.match_function::oid) THEN
        EXECUTE format('DROP FUNCTION %s', w.match_function);
    END IF;
    DELETE FROM autoembed.watches x WHERE x.id = w.id;
    IF drop_column THEN
        EXECUTE format('ALTER TABLE %s DROP COLUMN IF EXISTS %I', w.source, w.embedding_column);
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
       SET status = 'pending', attempts = 0, run_after = now(), last_error = NULL, updated_at = now()
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
