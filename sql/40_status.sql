-- Repeatable: re-applied by every `autoembed migrate`. Views are dropped and recreated so a
-- changed column list applies.

DROP VIEW IF EXISTS autoembed.status;
DROP VIEW IF EXISTS autoembed.failed_jobs;

-- Per watch and lane: exact counts, the age of the oldest pending job, recent throughput.
CREATE VIEW autoembed.status AS
SELECT w.id AS watch_id,
       w.source::text AS source,
       w.content_column,
       CASE l.lane WHEN 'embed' THEN w.embedding_column ELSE w.summary_column END AS target_column,
       CASE l.lane WHEN 'embed' THEN w.model ELSE w.llm_model END AS model,
       l.lane,
       coalesce(j.pending, 0) AS pending,
       coalesce(j.running, 0) AS running,
       coalesce(j.failed, 0) AS failed,
       j.oldest_pending_age,
       coalesce(t.rows_last_minute, 0) AS rows_last_minute
  FROM autoembed.watches w
 CROSS JOIN LATERAL unnest(autoembed.lanes(w.summary_column)) AS l(lane)
  LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE x.status = 'pending') AS pending,
               count(*) FILTER (WHERE x.status = 'running') AS running,
               count(*) FILTER (WHERE x.status = 'failed') AS failed,
               now() - min(x.updated_at) FILTER (WHERE x.status = 'pending') AS oldest_pending_age
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
