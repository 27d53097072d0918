-- Repeatable: re-applied by every `autoembed migrate`.

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
    upsert constant text :=
        ' ON CONFLICT (watch_id, lane, pk) DO UPDATE
             SET status = ''pending'', generation = j.generation + 1, attempts = 0,
                 run_after = now(), leased_until = NULL, worker = NULL, last_error = NULL,
                 updated_at = now()';
BEGIN
    SELECT * INTO w FROM autoembed.watches WHERE id = TG_ARGV[0]::integer;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        EXECUTE format(
            'INSERT INTO autoembed.jobs AS j (watch_id, lane, pk)
             SELECT $1, l.lane, n.%1$I::text
               FROM new_rows n CROSS JOIN unnest($2::text[]) AS l(lane)
              WHERE n.%2$I IS NOT NULL', w.pk_column, w.content_column) || upsert
        USING w.id, autoembed.lanes(w.summary_column);
    ELSE
        EXECUTE format(
            'INSERT INTO autoembed.jobs AS j (watch_id, lane, pk)
             SELECT $1, l.lane, n.%1$I::text
               FROM new_rows n
               LEFT JOIN old_rows o ON o.%1$I = n.%1$I
              CROSS JOIN unnest($2::text[]) AS l(lane)
              WHERE o.%1$I IS NULL OR o.%2$I::text IS DISTINCT FROM n.%2$I::text',
            w.pk_column, w.content_column) || upsert
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
