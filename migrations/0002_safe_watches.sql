-- autoembed 0002: watches follow their columns by number (a rename is followed, a drop or a
-- retype stops the watch loudly instead of breaking the table's writes), the columns whose
-- change re-queues each lane, fresh versus backfill work, and per-watch accessor functions.

-- Columns by attribute number: pg_attribute.attnum survives renames.
ALTER TABLE autoembed.watches
    ADD COLUMN pk_attnum        smallint,
    ADD COLUMN content_attnum   smallint,
    ADD COLUMN embedding_attnum smallint,
    ADD COLUMN summary_attnum   smallint,
    -- the columns whose change queues the row again, per lane
    ADD COLUMN embed_inputs     smallint[],
    ADD COLUMN summary_inputs   smallint[],
    -- the text to embed built from several columns ("{title}: {body}"); NULL: the content column
    ADD COLUMN template         text,
    -- every function autoembed generated for this watch (search functions, accessors)
    ADD COLUMN functions        regprocedure[] NOT NULL DEFAULT '{}',
    -- bumped by every change of what the lanes produce (model, template, columns): a worker
    -- holding an older version must not write
    ADD COLUMN version          integer NOT NULL DEFAULT 1;

UPDATE autoembed.watches w
   SET pk_attnum = (SELECT attnum FROM pg_attribute WHERE attrelid = w.source AND attname = w.pk_column),
       content_attnum = (SELECT attnum FROM pg_attribute WHERE attrelid = w.source AND attname = w.content_column),
       embedding_attnum = (SELECT attnum FROM pg_attribute WHERE attrelid = w.source AND attname = w.embedding_column),
       summary_attnum = (SELECT attnum FROM pg_attribute WHERE attrelid = w.source AND attname = w.summary_column);
UPDATE autoembed.watches SET embed_inputs = ARRAY[content_attnum],
                             summary_inputs = CASE WHEN summary_attnum IS NULL THEN NULL
                                                   ELSE ARRAY[content_attnum] END;

-- Fresh work (a row the application inserted or changed) is served before backfill work
-- (rows queued by watch, a model change or a retry), without starving it.
ALTER TABLE autoembed.jobs ADD COLUMN kind text NOT NULL DEFAULT 'fresh'
    CHECK (kind IN ('fresh', 'backfill'));
DROP INDEX autoembed.jobs_claim_idx;
CREATE INDEX jobs_claim_idx ON autoembed.jobs (lane, kind, run_after, id) WHERE status = 'pending';
-- status counts per watch
CREATE INDEX jobs_watch_idx ON autoembed.jobs (watch_id, lane, status);

-- one watch per vector column, whatever it is called now
ALTER TABLE autoembed.watches DROP CONSTRAINT watches_source_embedding_column_key;
CREATE UNIQUE INDEX watches_embedding_idx ON autoembed.watches (source, embedding_attnum);

-- Workers say they are alive, and what keeps them from serving a watch (a model that cannot
-- be loaded, an LLM server that is down): `autoembed status` shows it.
CREATE TABLE autoembed.workers (
    name       text PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now(),
    problems   jsonb NOT NULL DEFAULT '{}'
);
