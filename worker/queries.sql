-- Static statements of the worker, by name. Every function and operator is qualified (or
-- built in and found first: worker sessions pin search_path to pg_catalog, pg_temp), and
-- statements that touch a watched table go through the watch's accessor functions.

-- name: watches
SELECT w.id, n.nspname AS schema, c.relname AS table_name, c.relowner::regrole::text AS owner,
       coalesce(autoembed._attname(w.source, w.pk_attnum), '') AS pk_column,
       coalesce((SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a
                  WHERE a.attrelid = w.source AND a.attnum = w.pk_attnum), '') AS pk_type,
       coalesce(autoembed._attname(w.source, w.content_attnum), '') AS content_column,
       autoembed._attname(w.source, w.embedding_attnum) AS embedding_column,
       w.model, w.dim,
       autoembed._attname(w.source, w.summary_attnum) AS summary_column,
       w.llm_model, w.llm_prompt, w.llm_options, w.template, w.version,
       w.next_model, w.next_dim, autoembed._attname(w.source, w.next_attnum) AS next_column,
       w.index_state, autoembed.vector_schema() AS vector_schema,
       w.embedding_attnum, w.next_attnum, w.summary_attnum,
       w.chunking, w.chunk_table::pg_catalog.text AS chunk_table, w.chunk_table::pg_catalog.oid AS chunk_oid,
       w.next_chunk_table::pg_catalog.oid AS next_chunk_oid,
       autoembed.watch_problem(w.id) AS problem,
       -- the accessors must still be what autoembed made: definer functions of the owner
       coalesce((SELECT pg_catalog.bool_and(p.prosecdef AND p.proowner = c.relowner)
                   FROM pg_catalog.pg_proc p
                  WHERE p.oid = ANY (w.functions::pg_catalog.oid[])
                    AND p.pronamespace = 'autoembed'::pg_catalog.regnamespace), false)
           AS accessors_ok
  FROM autoembed.watches w
  JOIN pg_catalog.pg_class c ON c.oid = w.source
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 ORDER BY w.id

-- name: unservable
SELECT w.id, w.source::pg_catalog.text AS source FROM autoembed.watches w
 WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.oid = w.source)

-- name: claim
UPDATE autoembed.jobs AS j
   SET status = 'running',
       leased_until = pg_catalog.now() + pg_catalog.make_interval(secs => %(lease)s),
       worker = %(worker)s
 WHERE j.id IN (SELECT x.id
                  FROM autoembed.jobs x
                 WHERE x.status = 'pending'
                   AND x.lane = %(lane)s
                   AND x.kind = %(kind)s
                   AND x.run_after <= pg_catalog.now()
                   AND x.watch_id = ANY (%(watches)s)
                 ORDER BY x.run_after, x.id
                 LIMIT %(limit)s
                   FOR UPDATE SKIP LOCKED)
RETURNING j.id, j.watch_id, j.pk, j.generation, j.attempts, j.kind

-- name: fence
SELECT j.id FROM autoembed.jobs j
 WHERE j.id = ANY (%(ids)s) AND j.status = 'running' AND j.worker = %(worker)s
   FOR UPDATE SKIP LOCKED

-- name: fence_wait
-- the jobs the first pass skipped: another transaction held them for a moment (another
-- worker's claim statement locks rows it then finds running; the application's trigger
-- queueing a row again). Waited for, under the write's lock_timeout: a claim's lock lasts
-- milliseconds, and a job queued again meanwhile no longer matches
SELECT j.id FROM autoembed.jobs j
 WHERE j.id = ANY (%(ids)s) AND j.status = 'running' AND j.worker = %(worker)s
   FOR UPDATE

-- name: complete
DELETE FROM autoembed.jobs AS j WHERE j.id = ANY (%(ids)s)

-- name: fail
UPDATE autoembed.jobs AS j
   SET attempts = j.attempts + 1,
       last_error = %(error)s,
       status = CASE WHEN j.attempts + 1 >= %(max_attempts)s THEN 'failed' ELSE 'pending' END,
       run_after = pg_catalog.now() + pg_catalog.make_interval(secs => %(delay)s),
       leased_until = NULL,
       worker = NULL,
       updated_at = pg_catalog.now()
 WHERE j.id = ANY (%(ids)s) AND j.status = 'running' AND j.worker = %(worker)s
RETURNING j.id, j.status, j.attempts

-- name: release
UPDATE autoembed.jobs
   SET status = 'pending', leased_until = NULL, worker = NULL,
       run_after = pg_catalog.now() + pg_catalog.make_interval(secs => %(delay)s)
 WHERE id = ANY (%(ids)s) AND status = 'running' AND worker = %(worker)s

-- name: heartbeat
-- rows another transaction holds are skipped, never waited for: a write of this worker is
-- finishing them (or the application is queueing them again); `not_ours` tells lost ones
UPDATE autoembed.jobs AS j
   SET leased_until = pg_catalog.now() + pg_catalog.make_interval(secs => %(lease)s)
 WHERE j.id IN (SELECT x.id FROM autoembed.jobs x
                 WHERE x.id = ANY (%(ids)s) AND x.status = 'running' AND x.worker = %(worker)s
                   FOR UPDATE SKIP LOCKED)
RETURNING j.id

-- name: not_ours
-- of these jobs, the ones that still exist but are no longer running under this claim
-- (taken over after their lease ran out, or queued again); finished ones are gone
SELECT j.id FROM autoembed.jobs j
 WHERE j.id = ANY (%(ids)s)
   AND (j.status <> 'running' OR j.worker IS DISTINCT FROM %(worker)s)

-- name: reap
UPDATE autoembed.jobs
   SET status = CASE WHEN attempts + 1 >= %(max_attempts)s THEN 'failed' ELSE 'pending' END,
       attempts = attempts + 1,
       last_error = 'the worker holding it (' || worker || ') stopped renewing its lease: '
                    'killed, or crashed on this row',
       leased_until = NULL, worker = NULL, updated_at = pg_catalog.now()
 WHERE status = 'running' AND leased_until < pg_catalog.now()
RETURNING id, status

-- name: record_throughput
INSERT INTO autoembed.throughput (watch_id, lane, rows)
SELECT * FROM ROWS FROM (pg_catalog.unnest(%(watches)s::integer[]), pg_catalog.unnest(%(lanes)s::text[]),
                        pg_catalog.unnest(%(rows)s::integer[]))

-- name: prune_throughput
DELETE FROM autoembed.throughput WHERE finished_at < pg_catalog.now() - interval '1 hour'

-- name: outstanding
SELECT pg_catalog.count(*) FILTER (WHERE status = 'pending') AS pending,
       pg_catalog.count(*) FILTER (WHERE status = 'running') AS running,
       pg_catalog.count(*) FILTER (WHERE status = 'failed') AS failed,
       pg_catalog.count(*) FILTER (WHERE status = 'pending' AND kind = 'backfill') AS backfill,
       extract(epoch FROM pg_catalog.min(run_after) FILTER (WHERE status = 'pending')
                          - pg_catalog.now())::pg_catalog.float8 AS next_due_seconds
  FROM autoembed.jobs
 WHERE watch_id = ANY (%(watches)s) AND lane = ANY (%(lanes)s)

-- name: backfill_left
SELECT pg_catalog.count(*) FROM autoembed.jobs
 WHERE watch_id = %(watch)s AND lane = %(lane)s AND kind = 'backfill' AND status <> 'failed'

-- name: lane_left
SELECT pg_catalog.count(*) FROM autoembed.jobs
 WHERE watch_id = %(watch)s AND lane = %(lane)s

-- name: index_built
SELECT autoembed.index_built(%(watch)s)

-- name: status
SELECT watch_id, source, content_column, target_column, model, lane, pending, running, failed,
       fresh_pending, backfill_pending,
       extract(epoch FROM oldest_pending_age)::pg_catalog.float8 AS oldest_pending_seconds,
       extract(epoch FROM oldest_fresh_age)::pg_catalog.float8 AS oldest_fresh_seconds,
       extract(epoch FROM oldest_backfill_age)::pg_catalog.float8 AS oldest_backfill_seconds,
       rows_last_minute, problem, index, index_note
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
DELETE FROM autoembed.jobs WHERE watch_id = %(watch)s AND pk = ANY (%(pks)s::text[])

-- name: worker_seen
INSERT INTO autoembed.workers AS w (name, problems) VALUES (%(name)s, %(problems)s)
ON CONFLICT (name) DO UPDATE SET seen_at = pg_catalog.now(), problems = EXCLUDED.problems

-- name: worker_gone
DELETE FROM autoembed.workers WHERE name = %(name)s OR seen_at < pg_catalog.now() - interval '1 hour'

-- name: workers
SELECT name, started_at,
       extract(epoch FROM pg_catalog.now() - seen_at)::pg_catalog.float8 AS seen_seconds_ago,
       problems
  FROM autoembed.workers
 WHERE seen_at > pg_catalog.now() - interval '5 minutes'
 ORDER BY name

-- name: invalid_indexes
SELECT i.indexrelid::pg_catalog.regclass::pg_catalog.text
  FROM pg_catalog.pg_index i
  JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
  JOIN autoembed.watches w ON i.indrelid IN (w.source, w.chunk_table, w.next_chunk_table)
 WHERE w.id = %(watch)s AND NOT i.indisvalid
   AND c.relname ~ ('_w' || w.id || '_(hnsw|fts|meta)$')
