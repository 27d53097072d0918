-- Repeatable: re-applied by every `autoembed migrate`. Views are dropped and recreated so a
-- changed column list applies.

DROP VIEW IF EXISTS autoembed.status;
DROP VIEW IF EXISTS autoembed.failed_jobs;

-- Per watch and lane: exact counts (fresh work the application caused versus backfill),
-- the age of the oldest pending job of each, recent throughput, and what is wrong with the
-- watch, if anything (a dropped or retyped column, a dropped table).
CREATE VIEW autoembed.status AS
SELECT w.id AS watch_id,
       CASE WHEN c.oid IS NULL THEN format('(dropped table %s)', w.source::oid) ELSE w.source::text END AS source,
       coalesce(autoembed._attname(w.source, w.content_attnum), w.content_column) AS content_column,
       CASE l.lane
           WHEN 'summary' THEN coalesce(autoembed._attname(w.source, w.summary_attnum), w.summary_column)
           WHEN 'next' THEN coalesce(autoembed._attname(w.source, w.next_attnum), w.next_chunk_table::text)
           ELSE coalesce(autoembed._attname(w.source, w.embedding_attnum), w.chunk_table::text,
                         w.embedding_column) END
           AS target_column,
       CASE l.lane WHEN 'embed' THEN w.model WHEN 'next' THEN w.next_model ELSE w.llm_model END AS model,
       l.lane,
       coalesce(j.pending, 0) AS pending,
       coalesce(j.running, 0) AS running,
       coalesce(j.failed, 0) AS failed,
       coalesce(j.fresh_pending, 0) AS fresh_pending,
       coalesce(j.backfill_pending, 0) AS backfill_pending,
       j.oldest_pending_age,
       j.oldest_fresh_age,
       j.oldest_backfill_age,
       coalesce(t.rows_last_minute, 0) AS rows_last_minute,
       autoembed.watch_problem(w.id) AS problem,
       CASE WHEN l.lane = 'summary' THEN NULL
            WHEN w.index_state = 'deferred' THEN 'deferred: built once the backfill is done'
            WHEN (w.chunking IS NULL AND autoembed._hnsw_index(w.source, CASE l.lane WHEN 'next' THEN w.next_attnum
                                                              ELSE w.embedding_attnum END) IS NULL)
              OR (w.chunking IS NOT NULL AND autoembed._hnsw_index(
                      CASE l.lane WHEN 'next' THEN w.next_chunk_table ELSE w.chunk_table END,
                      autoembed._chunk_embedding(CASE l.lane WHEN 'next' THEN w.next_chunk_table
                                                             ELSE w.chunk_table END)) IS NULL)
                 THEN CASE l.lane WHEN 'next' THEN 'building once the new vectors are done'
                                  ELSE 'none (search scans the table)' END
            ELSE 'ready' END AS index,
       w.index_note,
       -- passages of a chunked watch (the planner's estimate: exact counts cost a scan)
       CASE WHEN w.chunking IS NOT NULL AND l.lane <> 'summary' THEN
           (SELECT greatest(c.reltuples, 0)::bigint FROM pg_class c
             WHERE c.oid = CASE l.lane WHEN 'next' THEN w.next_chunk_table ELSE w.chunk_table END) END
           AS chunks
  FROM autoembed.watches w
  LEFT JOIN pg_class c ON c.oid = w.source
 CROSS JOIN LATERAL unnest(coalesce(autoembed.watch_lanes(w.id), ARRAY['embed'])) AS l(lane)
  LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE x.status = 'pending') AS pending,
               count(*) FILTER (WHERE x.status = 'running') AS running,
               count(*) FILTER (WHERE x.status = 'failed') AS failed,
               count(*) FILTER (WHERE x.status = 'pending' AND x.kind = 'fresh') AS fresh_pending,
               count(*) FILTER (WHERE x.status = 'pending' AND x.kind = 'backfill') AS backfill_pending,
               now() - min(x.updated_at) FILTER (WHERE x.status = 'pending') AS oldest_pending_age,
               now() - min(x.updated_at) FILTER (WHERE x.status = 'pending' AND x.kind = 'fresh') AS oldest_fresh_age,
               now() - min(x.updated_at) FILTER (WHERE x.status = 'pending' AND x.kind = 'backfill') AS oldest_backfill_age
          FROM autoembed.jobs x
         WHERE x.watch_id = w.id AND x.lane = l.lane
       ) j ON true
  LEFT JOIN LATERAL (
        SELECT sum(r.rows) AS rows_last_minute
          FROM autoembed.throughput r
         WHERE r.watch_id = w.id AND r.lane = l.lane
           AND r.finished_at > now() - interval '1 minute'
       ) t ON true;

CREATE VIEW autoembed.failed_jobs AS
SELECT j.id AS job_id,
       w.source::text AS source,
       j.lane,
       j.pk,
       j.attempts,
       j.last_error,
       j.updated_at AS failed_at
  FROM autoembed.jobs j
  JOIN autoembed.watches w ON w.id = j.watch_id
 WHERE j.status = 'failed';
