"""A backlog never hides fresh rows (issue 13): progressive writes, fresh work first,
the backlog still finishes, and HNSW indexes built once a backfill is done."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import numpy as np
from autoembed.engine import Embedder
from autoembed.gate import Gate
from autoembed.lanes import CPU_TURN, EMBED_CHUNK
from autoembed.runner import Worker
from autoembed.watches import watch

from .helpers import (
    drain,
    fetch,
    make_documents,
    settings,
    wait_for,
    watch_documents,
    worker_pool,
)


class Paused:
    """A real embedder that stops before its ``pause_at``-th call until the test lets it
    go, and records what each call embedded."""

    def __init__(self, inner: Embedder, pause_at: int) -> None:
        self.inner, self.pause_at = inner, pause_at
        self.calls: list[list[str]] = []
        self.paused, self.go = threading.Event(), threading.Event()
        self.dim, self.stats, self.name = inner.dim, inner.stats, inner.name
        self.max_tokens, self.encode, self.files = inner.max_tokens, inner.encode, inner.files

    def embed(self, texts: list[str], **kw: Any) -> np.ndarray:
        self.calls.append(list(texts))
        if len(self.calls) == self.pause_at:
            self.paused.set()
            if not self.go.wait(120):
                raise TimeoutError("the test never let the embedder go on")
        return self.inner.embed(texts, **kw)


async def hnsw_indexes(db: Any, table: str) -> int:
    rows = await fetch(
        db,
        "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_am am ON am.oid = c.relam WHERE i.indrelid = %s::regclass AND am.amname = 'hnsw'",
        table,
    )
    return int(rows[0][0])


async def test_vectors_appear_while_the_claim_is_still_in_flight(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_documents(db)
    await db.execute(
        "INSERT INTO documents (content) SELECT 'backlog row ' || g FROM generate_series(1, 200) g"
    )
    await watch_documents(db, index="deferred")
    # the second chunk of the one claim waits (a chunk runs as several turns at the engine)
    paused = Paused(minilm, pause_at=EMBED_CHUNK // CPU_TURN + 1)
    worker = Worker(
        settings(db_url, batch_size=200, concurrency=1),
        progress=False,
        embedder_factory=lambda _n: paused,
    )
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.to_thread(paused.paused.wait, 120)

        async def first_chunk_written() -> bool:
            return (await fetch(db, "SELECT count(embedding) FROM documents"))[0][0] == 64

        await wait_for(first_chunk_written)
        running = await fetch(db, "SELECT count(*) FROM autoembed.jobs WHERE status = 'running'")
        assert running == [(136,)]  # the rest of the claim is still in flight
    finally:
        paused.go.set()
        worker.request_stop("test done")
        assert await task == 0


async def test_a_fresh_row_overtakes_a_backlog_which_still_finishes(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_documents(db)
    await make_documents(db, "live")
    await db.execute(
        "INSERT INTO documents (content) SELECT 'backlog row ' || g FROM generate_series(1, 300) g"
    )
    await watch_documents(db, index="deferred")
    await watch_documents(db, "live")
    paused = Paused(minilm, pause_at=1)  # the backlog's first chunk holds the engine
    worker = Worker(
        settings(db_url, batch_size=300, concurrency=2),
        progress=False,
        embedder_factory=lambda _n: paused,
    )
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.to_thread(paused.paused.wait, 120)
        await db.execute("INSERT INTO live (content) VALUES ('written by the application')")

        async def fresh_waits_for_the_engine() -> bool:
            return worker.gate.waiting(True) == 1

        await wait_for(fresh_waits_for_the_engine)  # claimed at once, queued first
        paused.go.set()

        async def fresh_written() -> bool:
            return (await fetch(db, "SELECT count(embedding) FROM live"))[0][0] == 1

        await wait_for(fresh_written)
        # the fresh row was embedded right after the chunk in flight: second call
        assert paused.calls[1] == ["written by the application"]
        left = await fetch(db, "SELECT count(*) FROM autoembed.jobs WHERE watch_id = 1")
        assert left[0][0] > 0  # while the backlog was still draining

        async def backlog_done() -> bool:
            return (await fetch(db, "SELECT count(embedding) FROM documents"))[0][0] == 300

        await wait_for(backlog_done, timeout=300)
    finally:
        paused.go.set()
        worker.request_stop("test done")
        assert await task == 0


async def test_the_index_is_built_after_the_backfill_and_search_works_before(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_documents(db)
    await db.execute(
        "INSERT INTO documents (content) "
        "SELECT 'row about topic ' || g FROM generate_series(1, 150) g"
    )
    await watch_documents(db, index="deferred")
    assert await hnsw_indexes(db, "documents") == 0
    paused = Paused(minilm, pause_at=EMBED_CHUNK // CPU_TURN + 1)  # after the first chunk
    worker = Worker(
        settings(db_url, batch_size=64, concurrency=1),
        progress=False,
        embedder_factory=lambda _n: paused,
    )
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.to_thread(paused.paused.wait, 120)
        # part of the backfill is written: no index yet, and search works (an exact scan)
        assert await hnsw_indexes(db, "documents") == 0
        q = minilm.embed(["row about topic 7"])[0]
        hits = await fetch(db, "SELECT id FROM match_documents(%s, -1, 3)", q)
        assert len(hits) == 3
        status = await fetch(db, "SELECT index FROM autoembed.status")
        assert status[0][0].startswith("deferred")
        paused.go.set()

        async def indexed() -> bool:
            state = await fetch(db, "SELECT index_state FROM autoembed.watches")
            return state == [("ready",)]

        await wait_for(indexed, timeout=300)  # built by the worker once the backfill is done
        assert await hnsw_indexes(db, "documents") == 1
        assert await fetch(db, "SELECT count(embedding) FROM documents") == [(150,)]
    finally:
        paused.go.set()
        worker.request_stop("test done")
        assert await task == 0
    # and it is an HNSW index the search can use (150 rows: the planner prefers a scan)
    await db.execute("SET enable_seqscan = off")
    plan = await fetch(db, "EXPLAIN SELECT id FROM documents ORDER BY embedding <=> %s LIMIT 3", q)
    assert "hnsw" in str(plan).lower()


async def test_a_drain_whose_index_cannot_be_built_says_so(
    db: Any, db_url: str, minilm: Embedder, caplog: Any
) -> None:
    """Every row gets its vector, but the deferred HNSW index fails (here an operator's event
    trigger refuses CREATE INDEX): a backfill script must not read exit 0 as success."""
    await make_documents(db)
    await db.execute(
        "INSERT INTO documents (content) SELECT 'backfill row ' || g FROM generate_series(1, 20) g"
    )
    await watch_documents(db, index="deferred")
    await db.execute(
        "CREATE FUNCTION no_indexes() RETURNS event_trigger LANGUAGE plpgsql AS "
        "$$BEGIN RAISE EXCEPTION 'indexes are built by the DBA on Sundays'; END$$"
    )
    await db.execute(
        "CREATE EVENT TRIGGER no_indexes ON ddl_command_start WHEN TAG IN ('CREATE INDEX') "
        "EXECUTE FUNCTION no_indexes()"
    )
    try:
        await drain(db_url, minilm, expect=3)
    finally:
        await db.execute("DROP EVENT TRIGGER no_indexes")
    assert await fetch(db, "SELECT count(embedding) FROM documents") == [(20,)]
    assert await fetch(db, "SELECT index_state FROM autoembed.watches") == [("deferred",)]
    assert "indexes are built by the DBA on Sundays" in caplog.text
    assert "left unserved: the HNSW index of public.documents" in caplog.text
    # once the obstacle is gone, the next run builds it and exits 0
    await drain(db_url, minilm)
    assert await fetch(db, "SELECT index_state FROM autoembed.watches") == [("ready",)]
    assert await hnsw_indexes(db, "documents") == 1


async def test_a_large_backfill_defers_its_index(db: Any) -> None:
    await db.execute("CREATE TABLE big (id int PRIMARY KEY, content text)")
    await db.execute("INSERT INTO big SELECT g, 'text ' || g FROM generate_series(1, 10001) g")
    await watch(db, "big", "content", model="all-minilm-l6-v2")
    assert await fetch(db, "SELECT index_state FROM autoembed.watches") == [("deferred",)]
    assert await hnsw_indexes(db, "big") == 0
    await db.execute("CREATE TABLE small (id int PRIMARY KEY, content text)")
    await db.execute("INSERT INTO small SELECT g, 'text ' || g FROM generate_series(1, 10) g")
    await watch(db, "small", "content", model="all-minilm-l6-v2")
    assert await hnsw_indexes(db, "small") == 1  # a small one is indexed at once


# ---------------------------------------------------------------------------- the gate


async def test_gate_serves_fresh_first_without_starving_backfill() -> None:
    gate = Gate(fairness=2)
    order: list[str] = []
    release = asyncio.Event()

    async def take(kind: str) -> None:
        async with gate.turn(kind == "fresh"):
            order.append(kind)
            await release.wait()

    holder = asyncio.create_task(take("backfill"))
    await asyncio.sleep(0)
    waiters = [
        asyncio.create_task(take(k)) for k in ("backfill", "fresh", "fresh", "fresh", "fresh")
    ]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(holder, *waiters)
    # fresh first, but after `fairness` fresh turns in a row a waiting backfill gets one
    assert order == ["backfill", "fresh", "fresh", "backfill", "fresh", "fresh"]


async def test_gate_passes_a_cancelled_turn_on() -> None:
    gate = Gate()
    async with gate.turn(False):
        waiter = asyncio.create_task(gate._acquire(True))
        other = asyncio.create_task(gate._acquire(False))
        await asyncio.sleep(0)
        waiter.cancel()
    await asyncio.wait_for(other, 5)  # the cancelled waiter did not keep the turn
    gate._release()
    assert not gate._busy


async def test_a_heartbeat_never_makes_a_write_skip_its_own_jobs(db: Any, db_url: str) -> None:
    """The heartbeat renews leases by locking the job rows for a moment; a write's fence,
    which skips rows that another transaction holds (the application queueing them
    again), must not take the heartbeat's lock for a takeover and leave its own jobs
    unwritten until their lease runs out. Here the heartbeat holds its row locks until the
    test lets it go."""
    from autoembed import queue as queue_module
    from autoembed.db import connect
    from autoembed.queue import Claims, Queue
    from psycopg import sql

    await make_documents(db)
    await db.execute(
        "INSERT INTO documents (content) SELECT 'text ' || i FROM generate_series(1, 20) i"
    )
    await watch_documents(db)
    shipped = queue_module.q

    def held_heartbeat(name: str) -> sql.SQL:
        statement = shipped(name)
        if name != "heartbeat":
            return statement
        # every renewal done, then wait (row locks held) for the test's advisory lock
        return sql.SQL(
            "WITH h AS ({}), c AS (SELECT pg_catalog.array_agg(h.id) AS ids FROM h) "
            "SELECT pg_catalog.unnest(c.ids) FROM c WHERE c.ids IS NOT NULL AND "
            "(SELECT 1 FROM pg_catalog.pg_advisory_xact_lock(4242 + 0 * "
            "pg_catalog.cardinality(c.ids))) = 1"
        ).format(statement)

    holder = await connect(db_url)
    async with worker_pool(db_url) as pool:
        try:
            queue = Queue(pool, "test-worker")
            watches = await queue.watches()
            (w,) = watches.values()
            jobs = await queue.claim("embed", "backfill", [w.id], 20, 60.0)
            assert len(jobs) == 20
            rows = await queue.read(w, "embed", [j.pk for j in jobs])
            claims = Claims()
            claims.add(jobs)
            queue_module.q = held_heartbeat  # type: ignore[assignment]
            await holder.execute("SELECT pg_advisory_lock(4242)")
            beat = asyncio.create_task(queue.heartbeat(claims, 60.0))
            await wait_for(
                lambda: fetch(
                    db,
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND wait_event = 'advisory'",
                )
            )
            fenced = asyncio.Event()
            shipped_fence = queue._fence

            async def fence(*args: Any) -> set[int]:
                fenced.set()
                return await shipped_fence(*args)

            queue._fence = fence  # type: ignore[method-assign]
            vector = np.ones(384, np.float32) / np.sqrt(384)
            write = asyncio.create_task(
                queue.finish(w, "embed", jobs, rows, {j.pk: vector for j in jobs})
            )
            await fenced.wait()
            # not a wait for the correct code (which waits for the heartbeat whatever the
            # time): a moment in which a fence that did not wait would skip every job
            await asyncio.sleep(0.5)
            await holder.execute("SELECT pg_advisory_unlock(4242)")
            lost = await beat
            out = await write
            assert lost == set()
            assert out.lost == [] and sorted(out.written) == sorted(j.pk for j in jobs)
            left = await fetch(db, "SELECT count(*) FROM autoembed.jobs")
            assert left == [(0,)]
        finally:
            queue_module.q = shipped
            await holder.close()


async def test_a_job_row_held_for_a_moment_by_another_worker_is_still_written(
    db: Any, db_url: str
) -> None:
    """Another worker's claim statement locks, for a few milliseconds, rows it then finds
    already running; a fence that skipped them took them for lost, and they stayed running,
    unwritten, until their lease ran out and were charged an attempt (multi-worker drains
    stalled for a whole lease). The fence waits for such a lock. Here the other transaction
    holds the rows until the fence waits for it, then lets go at once."""
    from autoembed.db import connect
    from autoembed.queue import Queue

    await make_documents(db)
    await db.execute(
        "INSERT INTO documents (content) SELECT 'text ' || i FROM generate_series(1, 20) i"
    )
    await watch_documents(db)
    holder = await connect(db_url)
    holding: asyncio.Task[None] | None = None
    async with worker_pool(db_url, max_size=2) as pool:
        try:
            queue = Queue(pool, "test-worker")
            (w,) = (await queue.watches()).values()
            jobs = await queue.claim("embed", "backfill", [w.id], 20, 60.0)
            assert len(jobs) == 20
            rows = await queue.read(w, "embed", [j.pk for j in jobs])

            async def hold() -> None:
                # lock the rows, then wait (in the server) until some backend waits for this
                # one, and commit at once; bounded, in case no one ever waits
                async with holder.transaction():
                    await holder.execute(
                        "SELECT id FROM autoembed.jobs WHERE id = ANY(%s) FOR UPDATE",
                        ([j.id for j in jobs],),
                    )
                    held.set()
                    await holder.execute(
                        "DO $$BEGIN FOR i IN 1..60000 LOOP EXIT WHEN EXISTS ("
                        "SELECT 1 FROM pg_catalog.pg_locks l WHERE NOT l.granted AND "
                        "pg_catalog.pg_blocking_pids(l.pid) "
                        "&& ARRAY[pg_catalog.pg_backend_pid()]); "
                        "PERFORM pg_catalog.pg_sleep(0.001); END LOOP; END$$"
                    )

            held = asyncio.Event()
            holding = asyncio.create_task(hold())
            await held.wait()
            vector = np.ones(384, np.float32) / np.sqrt(384)
            out = await queue.finish(w, "embed", jobs, rows, {j.pk: vector for j in jobs})
            assert out.lost == [] and sorted(out.written) == sorted(j.pk for j in jobs)
            await holding
            assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(0,)]
            assert await fetch(db, "SELECT count(embedding) FROM documents") == [(20,)]
        finally:
            if (
                holding is not None and not holding.done()
            ):  # a failed test: no one waited for the lock
                await holder.cancel_safe()
                with contextlib.suppress(Exception):
                    await holding
            await holder.close()


async def test_a_bulk_statement_waits_behind_single_writes(db: Any) -> None:
    """An import (a statement of more than bulk_rows() rows) is queued as backfill, so the
    single-row writes after it are served first; a row the import queues again while it
    is pending fresh stays fresh; the webhook's enqueue() follows the same rule."""
    await make_documents(db)
    await watch_documents(db)
    bulk = int((await fetch(db, "SELECT autoembed.bulk_rows()"))[0][0])
    await db.execute("INSERT INTO documents (id, content) VALUES (1, 'one row')")
    await db.execute(
        "INSERT INTO documents (id, content) SELECT i, 'imported ' || i "
        "FROM generate_series(2, %s) i",
        (bulk + 10,),
    )
    await db.execute("INSERT INTO documents (id, content) VALUES (100000, 'after the import')")
    kinds = dict(await fetch(db, "SELECT pk, kind FROM autoembed.jobs WHERE lane = 'embed'"))
    assert kinds["1"] == "fresh" and kinds["100000"] == "fresh"
    assert {kinds[str(i)] for i in range(2, bulk + 11)} == {"backfill"}
    # a statement of exactly bulk_rows() rows is still fresh; one that re-queues a pending
    # fresh row keeps it fresh
    await db.execute(
        "UPDATE documents SET content = content || '!' WHERE id = 1 OR id BETWEEN 2 AND %s",
        (bulk,),
    )
    kinds = dict(await fetch(db, "SELECT pk, kind FROM autoembed.jobs WHERE lane = 'embed'"))
    assert kinds["1"] == "fresh" and kinds["2"] == "fresh"
    await db.execute("UPDATE documents SET content = content || '?'")  # every row: bulk
    kinds = dict(await fetch(db, "SELECT pk, kind FROM autoembed.jobs WHERE lane = 'embed'"))
    assert kinds["1"] == "fresh" and kinds["100000"] == "fresh"  # pending fresh stays fresh
    assert kinds[str(bulk + 5)] == "backfill"
    wid = (await fetch(db, "SELECT id FROM autoembed.watches"))[0][0]
    await db.execute("DELETE FROM autoembed.jobs")
    await db.execute("SELECT autoembed.enqueue(%s, ARRAY['1'])", (wid,))
    await db.execute(
        "SELECT autoembed.enqueue(%s, array(SELECT i::text FROM generate_series(2, %s) i))",
        (wid, bulk + 2),
    )
    kinds = dict(await fetch(db, "SELECT pk, kind FROM autoembed.jobs WHERE lane = 'embed'"))
    assert kinds["1"] == "fresh" and kinds["2"] == "backfill"
