-- Repeatable: re-applied by every `autoembed migrate`.

-- The one definition of "queue these rows (again)": an INSERT into autoembed.jobs from a
-- query of (watch_id, lane, pk) rows; a row already queued goes back to pending with a new
-- generation, so a worker busy with an older text can tell (see queue.py).
CREATE OR REPLACE FUNCTION autoembed._enqueue_sql(rows_query text)
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT 'INSERT INTO autoembed.jobs AS j (watch_id, lane, pk) ' || rows_query ||
           ' ON CONFLICT (watch_id, lane, pk) DO UPDATE
                SET status = ''pending'', generation = j.generation + 1, attempts = 0,
                    run_after = now(), leased_until = NULL, worker = NULL, last_error = NULL,
                    updated_at = now()'
$$;

-- Queue rows of a watch by primary key (text), and wake the workers; returns how many.
-- For callers without triggers, such as the HTTP webhook consumer. SECURITY DEFINER: the
-- role calling it needs no INSERT right on autoembed.jobs.
CREATE OR REPLACE FUNCTION autoembed.enqueue(watch_id integer, pks text[])
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    queued bigint;
BEGIN
    EXECUTE autoembed._enqueue_sql(
        'SELECT w.id, l.lane, p.pk
           FROM autoembed.watches w
          CROSS JOIN unnest($2) AS p(pk)
          CROSS JOIN unnest(autoembed.lanes(w.summary_column)) AS l(lane)
          WHERE w.id = $1')
    USING watch_id, pks;
    GET DIAGNOSTICS queued = ROW_COUNT;
    IF queued > 0 THEN
        PERFORM pg_notify('autoembed', watch_id::text);
    END IF;
    RETURN queued;
END
$$;

-- Statement-level trigger function, installed by autoembed.watch() on INSERT and UPDATE of a
-- watched table. One set-based upsert of the changed primary keys per statement, then one
-- NOTIFY. An UPDATE queues only rows whose watched column changed (or whose key changed).
-- SECURITY DEFINER with a fixed search_path: a role that may write the table needs no
-- grant on the autoembed schema.
CREATE OR REPLACE FUNCTION autoembed.queue_changes()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w autoembed.watches%ROWTYPE;
    queued bigint;
BEGIN
    SELECT * INTO w FROM autoembed.watches WHERE id = TG_ARGV[0]::integer;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        EXECUTE autoembed._enqueue_sql(format(
            'SELECT $1, l.lane, n.%1$I::text
               FROM new_rows n CROSS JOIN unnest($2::text[]) AS l(lane)
              WHERE n.%2$I IS NOT NULL', w.pk_column, w.content_column))
        USING w.id, autoembed.lanes(w.summary_column);
    ELSE
        EXECUTE autoembed._enqueue_sql(format(
            'SELECT $1, l.lane, n.%1$I::text
               FROM new_rows n
               LEFT JOIN old_rows o ON o.%1$I = n.%1$I
              CROSS JOIN unnest($2::text[]) AS l(lane)
              WHERE o.%1$I IS NULL OR o.%2$I::text IS DISTINCT FROM n.%2$I::text',
            w.pk_column, w.content_column))
        USING w.id, autoembed.lanes(w.summary_column);
    END IF;
    GET DIAGNOSTICS queued = ROW_COUNT;
    IF queued > 0 THEN
        PERFORM pg_notify('autoembed', w.id::text);
    END IF;
    RETURN NULL;
END
$$;

-- Called by the worker in the transaction that writes a batch: locks the watch row (so a
-- concurrent set_model waits) and returns the model the lane uses now. SECURITY DEFINER so
-- a least-privilege worker role needs no UPDATE right on autoembed.watches.
CREATE OR REPLACE FUNCTION autoembed.hold_watch(watch_id integer, lane text)
RETURNS text
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE lane WHEN 'embed' THEN w.model ELSE w.llm_model END
      FROM autoembed.watches w
     WHERE w.id = watch_id
       FOR SHARE
$$;
