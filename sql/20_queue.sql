-- Repeatable: re-applied by every `autoembed migrate`.

DROP FUNCTION IF EXISTS autoembed._enqueue_sql(text);

-- The one definition of "queue these rows (again)": an INSERT into autoembed.jobs from a
-- query of (watch_id, lane, pk) rows; a row already queued goes back to pending with a new
-- generation, so a worker busy with an older text can tell (see queue.py). Work the
-- application caused one row at a time is 'fresh' and served first; a pending fresh job
-- stays fresh. A statement that queues more than autoembed.bulk_rows() rows (an import,
-- a mass update) is 'backfill', as autoembed's own work is: it waits behind single writes
-- instead of holding every later one back.
CREATE OR REPLACE FUNCTION autoembed.bulk_rows()
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 64 $$;

CREATE OR REPLACE FUNCTION autoembed._enqueue_sql(rows_query text, kind text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'INSERT INTO autoembed.jobs AS j (watch_id, lane, pk, kind) '
           'SELECT q.*, ' || quote_literal(kind) || ' FROM (' || rows_query || ') AS q '
           'ON CONFLICT (watch_id, lane, pk) DO UPDATE
                SET status = ''pending'', generation = j.generation + 1, attempts = 0,
                    run_after = pg_catalog.now(), leased_until = NULL, worker = NULL,
                    last_error = NULL, updated_at = pg_catalog.now(),
                    kind = CASE WHEN EXCLUDED.kind = ''fresh''
                                  OR (j.status = ''pending'' AND j.kind = ''fresh'')
                                THEN ''fresh'' ELSE EXCLUDED.kind END'
$$;

-- The condition "one of these columns changed" between old row o and new row n, or "one
-- of them is not NULL" for a new row, as SQL text. Columns are compared by their text form
-- in the "C" collation: built-in casts only (see _builtin_type), and a nondeterministic
-- collation cannot hide a change. NULL when a column is gone or of a type autoembed does not
-- read (the lane is then not served).
CREATE OR REPLACE FUNCTION autoembed._inputs_sql(rel oid, inputs smallint[], changed boolean)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a record;
    parts text[] := '{}';
    num smallint;
BEGIN
    FOREACH num IN ARRAY inputs LOOP
        SELECT at.attname, at.atttypid INTO a FROM pg_attribute at
         WHERE at.attrelid = rel AND at.attnum = num AND NOT at.attisdropped;
        IF a.attname IS NULL OR NOT autoembed._builtin_type(a.atttypid) THEN
            RETURN NULL;
        END IF;
        IF changed THEN
            parts := parts || format(
                '(o.%1$I::pg_catalog.text COLLATE pg_catalog."C") IS DISTINCT FROM '
                '(n.%1$I::pg_catalog.text COLLATE pg_catalog."C")', a.attname);
        ELSE
            parts := parts || format('n.%I IS NOT NULL', a.attname);
        END IF;
    END LOOP;
    RETURN '(' || array_to_string(parts, ' OR ') || ')';
END
$$;

-- Queue rows of a watch by primary key (text), and wake the workers; returns how many.
-- For callers without triggers, such as the HTTP webhook consumer (autoembed_workers may
-- call it). SECURITY DEFINER, owned by autoembed_definer: the caller needs no INSERT right
-- on autoembed.jobs.
CREATE OR REPLACE FUNCTION autoembed.enqueue(watch_id integer, pks text[])
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    queued bigint;
BEGIN
    IF cardinality(pks) > 10000 THEN
        RAISE EXCEPTION 'autoembed: at most 10000 keys per call, not %', cardinality(pks)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF EXISTS (SELECT FROM unnest(pks) AS p(pk) WHERE p.pk IS NULL OR octet_length(p.pk) > 1024) THEN
        RAISE EXCEPTION 'autoembed: a key is NULL or longer than 1024 bytes'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE autoembed._enqueue_sql(
        'SELECT w.id, l.lane, p.pk
           FROM autoembed.watches w
          CROSS JOIN unnest($2) AS p(pk)
          CROSS JOIN unnest(autoembed.watch_lanes(w.id)) AS l(lane)
          WHERE w.id = $1',
        CASE WHEN cardinality(pks) > autoembed.bulk_rows() THEN 'backfill' ELSE 'fresh' END)
    USING watch_id, pks;
    GET DIAGNOSTICS queued = ROW_COUNT;
    IF queued > 0 THEN
        PERFORM pg_notify('autoembed', watch_id::text);
    END IF;
    RETURN queued;
END
$$;

-- Statement-level trigger function, installed by autoembed.watch() on INSERT and UPDATE of
-- a watched table: one set-based upsert of the changed primary keys per statement, then one
-- NOTIFY. An UPDATE queues a lane only for rows where one of that lane's input columns (the
-- text, or the columns its template uses) changed, or whose key changed.
--
-- It never makes the application's statement fail for autoembed's sake: columns are found
-- by number (a rename is followed); a dropped or retyped column stops the lane with a
-- WARNING (see autoembed.watch_problem) instead of raising. SECURITY DEFINER owned by
-- autoembed_definer (it may queue jobs, nothing else); it reads only columns of built-in
-- types, and pins the settings that shape a key's text form.
CREATE OR REPLACE FUNCTION autoembed.queue_changes()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET datestyle = 'ISO, YMD'
SET intervalstyle = 'postgres'
SET timezone = 'UTC'
SET extra_float_digits = 1
AS $$
DECLARE
    w autoembed.watches%ROWTYPE;
    pk record;
    embed_cond text;
    summary_cond text;
    query text;
    queued bigint;
BEGIN
    SELECT * INTO w FROM autoembed.watches WHERE id = TG_ARGV[0]::integer;
    IF NOT FOUND OR w.source <> TG_RELID THEN
        RETURN NULL;
    END IF;
    SELECT a.attname, a.atttypid INTO pk FROM pg_attribute a
     WHERE a.attrelid = TG_RELID AND a.attnum = w.pk_attnum AND NOT a.attisdropped;
    IF pk.attname IS NULL OR NOT autoembed._key_type(pk.atttypid) THEN
        RAISE WARNING 'autoembed: % is not watched any more: %', w.source, autoembed.watch_problem(w.id)
            USING HINT = 'Run `autoembed status`; watch the table again to re-point the watch.';
        RETURN NULL;
    END IF;
    embed_cond := autoembed._inputs_sql(TG_RELID, w.embed_inputs, TG_OP = 'UPDATE');
    summary_cond := CASE WHEN w.summary_attnum IS NULL THEN NULL
                         ELSE autoembed._inputs_sql(TG_RELID, w.summary_inputs, TG_OP = 'UPDATE') END;
    IF embed_cond IS NULL OR (w.summary_attnum IS NOT NULL AND summary_cond IS NULL) THEN
        RAISE WARNING 'autoembed: % is not fully watched any more: %', w.source, autoembed.watch_problem(w.id)
            USING HINT = 'Run `autoembed status`; watch the table again to re-point the watch.';
    END IF;
    -- a lane whose inputs cannot be read: every row written is queued (what changed cannot
    -- be told without reading them), and waits until the watch is served again
    embed_cond := coalesce(embed_cond, 'true');
    IF w.summary_attnum IS NOT NULL THEN
        summary_cond := coalesce(summary_cond, 'true');
    END IF;
    IF TG_OP = 'UPDATE' THEN
        query := format(
            'SELECT $1, l.lane, n.%1$I::pg_catalog.text
               FROM new_rows n
               LEFT JOIN old_rows o ON o.%1$I OPERATOR(pg_catalog.=) n.%1$I
              CROSS JOIN LATERAL (VALUES (''embed'', %2$s), (''summary'', %3$s), (''next'', %4$s))
                      AS l(lane, changed)
              WHERE (l.changed OR o.%1$I IS NULL)', pk.attname,
            coalesce(embed_cond, 'false'), coalesce(summary_cond, 'false'),
            CASE WHEN w.next_attnum IS NULL THEN 'false' ELSE coalesce(embed_cond, 'false') END);
    ELSE
        query := format(
            'SELECT $1, l.lane, n.%1$I::pg_catalog.text
               FROM new_rows n
              CROSS JOIN LATERAL (VALUES (''embed'', %2$s), (''summary'', %3$s), (''next'', %4$s))
                      AS l(lane, changed)
              WHERE l.changed', pk.attname,
            coalesce(embed_cond, 'false'), coalesce(summary_cond, 'false'),
            CASE WHEN w.next_attnum IS NULL THEN 'false' ELSE coalesce(embed_cond, 'false') END);
    END IF;
    IF embed_cond IS NULL THEN
        query := query || ' AND l.lane NOT IN (''embed'', ''next'')';
    END IF;
    IF summary_cond IS NULL THEN
        query := query || ' AND l.lane <> ''summary''';
    END IF;
    -- one row more than the bulk size is enough to tell (the table is not counted through)
    EXECUTE format('SELECT pg_catalog.count(*) FROM (SELECT FROM new_rows LIMIT %s) AS n',
                   autoembed.bulk_rows() + 1) INTO queued;
    EXECUTE autoembed._enqueue_sql(
        query, CASE WHEN queued > autoembed.bulk_rows() THEN 'backfill' ELSE 'fresh' END) USING w.id;
    GET DIAGNOSTICS queued = ROW_COUNT;
    IF queued > 0 THEN
        PERFORM pg_notify('autoembed', w.id::text);
    END IF;
    RETURN NULL;
END
$$;

-- DELETE and TRUNCATE of a watched table drop the queued work of the rows that are gone, so
-- `autoembed status` never counts work for rows that no longer exist.
CREATE OR REPLACE FUNCTION autoembed.forget_rows()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET datestyle = 'ISO, YMD'
SET intervalstyle = 'postgres'
SET timezone = 'UTC'
SET extra_float_digits = 1
AS $$
DECLARE
    w autoembed.watches%ROWTYPE;
    pk record;
BEGIN
    SELECT * INTO w FROM autoembed.watches WHERE id = TG_ARGV[0]::integer;
    IF NOT FOUND OR w.source <> TG_RELID THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM autoembed.jobs j WHERE j.watch_id = w.id;
        IF w.chunking IS NOT NULL THEN  -- the passages go too, as the table's owner
            EXECUTE format('SELECT autoembed.%I(NULL)', 'w' || w.id || '_forget');
        END IF;
        RETURN NULL;
    END IF;
    SELECT a.attname, a.atttypid INTO pk FROM pg_attribute a
     WHERE a.attrelid = TG_RELID AND a.attnum = w.pk_attnum AND NOT a.attisdropped;
    IF pk.attname IS NULL OR NOT autoembed._key_type(pk.atttypid) THEN
        RETURN NULL;  -- the worker drops jobs of missing rows when it reaches them
    END IF;
    IF w.chunking IS NOT NULL THEN
        EXECUTE format('SELECT autoembed.%I(ARRAY(SELECT o.%I::pg_catalog.text FROM old_rows o))',
                       'w' || w.id || '_forget', pk.attname);
    END IF;
    IF NOT EXISTS (SELECT FROM autoembed.jobs j WHERE j.watch_id = w.id) THEN
        RETURN NULL;  -- nothing queued: nothing to look up
    END IF;
    EXECUTE format(
        'DELETE FROM autoembed.jobs j
          USING (SELECT o.%I::pg_catalog.text AS pk FROM old_rows o) AS d
          WHERE j.watch_id = $1 AND j.pk OPERATOR(pg_catalog.=) d.pk', pk.attname)
    USING w.id;
    RETURN NULL;
END
$$;

DROP FUNCTION IF EXISTS autoembed.hold_watch(integer, text);

-- Called by the worker first in the transaction that writes a batch: takes the watch's
-- advisory lock in shared mode (set_model and watch take it exclusively, so a batch is
-- never written across a change of model, template or columns) and returns the watch's
-- version now; a worker whose claim was made under another version must not write.
-- Advisory locks need no privilege: this runs as the worker itself.
CREATE OR REPLACE FUNCTION autoembed.hold_watch(watch_id integer)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v integer;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1635087717, watch_id);  -- 'auto' as int4
    SELECT w.version INTO v FROM autoembed.watches w WHERE w.id = watch_id;
    RETURN v;
END
$$;

-- The exclusive side, for functions that change a watch.
CREATE OR REPLACE FUNCTION autoembed._lock_watch(watch_id integer)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_advisory_xact_lock(1635087717, watch_id)
$$;
