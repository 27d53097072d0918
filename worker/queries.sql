-- Static statements of the worker, by name. Statements that need a table's identifiers are
-- composed in queue.py with psycopg.sql instead.

-- name: watches
SELECT w.id, n.nspname AS schema, c.relname AS table_name, w.pk_column, w.pk_type,
       w.content_column, w.embedding_column, w.model, w.dim, w.summary_column,
       w.llm_model, w.llm_prompt, w.llm_options, autoembed.vector_schema() AS vector_schema
  FROM autoembed.watches w
  JOIN pg_class c ON c.oid = w.source
  JOIN pg_namespace n ON n.oid = c.relnamespace
 ORDER BY w.id

-- name: claim
UPDATE autoembed.jobs AS j
   SET status = 'running',
       leased_until = now() + make_interval(secs => %(lease)s),
       worker = %(worker)s
 WHERE j.id IN (SELECT x.id
                  FROM autoembed.jobs x
                 WHERE x.status = 'pending'
                   AND x.lane = %(lane)s
                   AND x.run_after <= now()
                   AND x.watch_id = ANY(%(watches)s)
                 ORDER BY x.run_after, x.id
                 LIMIT %(limit)s
                   FOR UPDATE SKIP LOCKED)
RETURNING j.id, j.watch_id, j.pk, j.generation, j.attempts

-- name: complete
DELETE FROM autoembed.jobs AS j
 USING unnest(%(ids)s::bigint[], %(generations)s::integer[]) AS d(id, generation)
 WHERE j.id = d.id AND j.generation = d.generation

-- name: fail
UPDATE autoembed.jobs AS j
   SET attempts = j.attempts + 1,
       last_error = %(error)s,
       status = CASE WHEN j.attempts + 1 >= %(max_attempts)s THEN 'failed' ELSE 'pending' END,
       run_after = now() + make_interval(secs => %(delay)s),
       leased_until = NULL,
       worker = NULL,
       updated_at = now()
 WHERE j.id = %(id)s AND j.generation = %(generation)s
RETURNING j.status, j.attempts

-- name: release
UPDATE autoembed.jobs
   SET status = 'pending', leased_until = NULL, worker = NULL
 WHERE id = ANY(%(ids)s) AND status = 'running' AND worker = %(worker)s

-- name: heartbeat
UPDATE autoembed.jobs
   SET leased_until = now() + make_interval(secs => %(lease)s)
 WHERE id = ANY(%(ids)s) AND status = 'running' AND worker = %(worker)s

-- name: reap
UPDATE autoembed.jobs
   SET status = 'pending', leased_until = NULL, worker = NULL
 WHERE status = 'running' AND leased_until < now()
RETURNING id

-- name: record_throughput
INSERT INTO autoembed.throughput (watch_id, lane, rows)
SELECT * FROM unnest(%(watches)s::integer[], %(lanes)s::text[], %(rows)s::integer[])

-- name: prune_throughput
DELETE FROM autoembed.throughput WHERE finished_at < now() - interval '1 hour'

-- name: outstanding
SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       extract(epoch FROM min(run_after) FILTER (WHERE status = 'pending') - now())::float8
           AS next_due_seconds
  FROM autoembed.jobs
 WHERE watch_id = ANY(%(watches)s) AND lane = ANY(%(lanes)s)

-- name: status
SELECT watch_id, source, content_column, target_column, model, lane, pending, running, failed,
       extract(epoch FROM oldest_pending_age)::float8 AS oldest_pending_seconds,
       rows_last_minute
  FROM autoembed.status
 ORDER BY watch_id, lane

-- name: failed_jobs
SELECT job_id, source, lane, pk, attempts, last_error, failed_at
  FROM autoembed.failed_jobs
 ORDER BY failed_at DESC
 LIMIT %(limit)s

-- name: enqueue
SELECT autoembed.enqueue(%(watch)s, %(pks)s::text[])

-- name: drop_jobs
DELETE FROM autoembed.jobs WHERE watch_id = %(watch)s AND pk = ANY(%(pks)s::text[])
