"""The worker in-process against a real PostgreSQL and a real model."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import numpy as np
import psycopg
import pytest
from autoembed.engine import Embedder
from autoembed.queue import WatchChanged
from autoembed.runner import Worker

from .helpers import (
    assert_matches,
    drain,
    fetch,
    make_documents,
    settings,
    vectors,
    wait_for,
    watch_documents,
)


async def test_insert_update_null_delete(db: Any, db_url: str, minilm: Embedder) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute(
        "INSERT INTO documents (content) VALUES ('the quick brown fox'), ('lazy dogs sleep'), "
        "(NULL), ('')"
    )
    await drain(db_url, minilm)
    rows = await vectors(db)
    assert_matches(minilm, "the quick brown fox", rows[1][1])
    assert_matches(minilm, "lazy dogs sleep", rows[2][1])
    assert rows[3][1] is None and rows[4][1] is None

    # an update of the watched column: a new vector that matches the new text
    await db.execute("UPDATE documents SET content = 'foxes are quick and brown' WHERE id = 1")
    # an update of another column queues nothing and writes nothing
    await db.execute("UPDATE documents SET title = 'unrelated' WHERE id = 2")
    queued = await fetch(db, "SELECT pk FROM autoembed.jobs ORDER BY pk")
    assert queued == [("1",)]
    await drain(db_url, minilm)
    rows = await vectors(db)
    assert_matches(minilm, "foxes are quick and brown", rows[1][1])
    writes = dict(await fetch(db, "SELECT id, count(*) FROM documents_writes GROUP BY id"))
    assert writes == {1: 2, 2: 1}

    # text set to NULL clears the vector
    await db.execute("UPDATE documents SET content = NULL WHERE id = 2")
    await drain(db_url, minilm)
    assert (await vectors(db))[2] == (None, None)

    # a deleted row drops its job at once (status never counts work for rows that are gone)
    await db.execute("UPDATE documents SET content = 'soon gone' WHERE id = 1")
    assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(1,)]
    await db.execute("DELETE FROM documents WHERE id = 1")
    assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(0,)]
    # and so does TRUNCATE
    await db.execute("UPDATE documents SET content = 'truncated soon' WHERE id = 2")
    assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(1,)]
    await db.execute("TRUNCATE documents")
    assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(0,)]
    await drain(db_url, minilm)


async def test_backfill_of_existing_rows(db: Any, db_url: str, minilm: Embedder) -> None:
    await make_documents(db)
    await db.execute(
        "INSERT INTO documents (content) "
        "SELECT 'passage number ' || g FROM generate_series(1, 300) g"
    )
    await watch_documents(db)
    assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(300,)]
    worker = await drain(db_url, minilm, batch_size=64)
    assert worker.done_rows == 300
    rows = await vectors(db)
    assert all(v is not None for _, v in rows.values())
    assert_matches(minilm, "passage number 150", rows[150][1])
    status = await fetch(
        db, "SELECT pending, running, failed, rows_last_minute FROM autoembed.status"
    )
    assert status == [(0, 0, 0, 300)]


class EditsWhileEmbedding:
    """Changes a row's text (in another connection) while its old text is being embedded."""

    def __init__(self, inner: Embedder, dsn: str) -> None:
        self.inner, self.dsn, self.fired = inner, dsn, threading.Event()
        self.dim, self.stats, self.name = inner.dim, inner.stats, inner.name
        self.max_tokens, self.encode = inner.max_tokens, inner.encode

    def embed(self, texts: list[str], **kw: Any) -> np.ndarray:
        out = self.inner.embed(texts, **kw)
        if "original text" in texts and not self.fired.is_set():
            self.fired.set()
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute("UPDATE documents SET content = 'edited text' WHERE id = 1")
        return out


async def test_stale_write_guard(db: Any, db_url: str, minilm: Embedder) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute("INSERT INTO documents (content) VALUES ('original text')")
    editor = EditsWhileEmbedding(minilm, db_url)
    await drain(db_url, editor)
    assert editor.fired.is_set()
    content, vector = (await vectors(db))[1]
    assert content == "edited text"
    assert_matches(minilm, "edited text", vector)
    # the vector of the old text was never written: one write, the new text's
    assert await fetch(db, "SELECT count(*) FROM documents_writes") == [(1,)]


class Poisoned:
    """A real embedder that raises on one text, as a broken model or input would."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.dim, self.stats, self.name = inner.dim, inner.stats, inner.name
        self.max_tokens, self.encode = inner.max_tokens, inner.encode

    def embed(self, texts: list[str], **kw: Any) -> np.ndarray:
        if any("POISON" in t for t in texts):
            raise ValueError("cannot embed a poisoned text")
        return self.inner.embed(texts, **kw)


async def test_a_failing_text_fails_alone(db: Any, db_url: str, minilm: Embedder) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute(
        "INSERT INTO documents (content) SELECT 'fine text ' || g FROM generate_series(1, 20) g"
    )
    await db.execute("INSERT INTO documents (id, content) VALUES (1000, 'POISON pill')")
    worker = await drain(db_url, Poisoned(minilm), max_attempts=3)
    assert worker.failed_jobs == 1
    rows = await vectors(db)
    assert sum(1 for _, v in rows.values() if v is not None) == 20
    failed = await fetch(db, "SELECT pk, attempts, last_error FROM autoembed.failed_jobs")
    assert failed == [("1000", 3, "ValueError: cannot embed a poisoned text")]
    status = await fetch(db, "SELECT pending, failed FROM autoembed.status")
    assert status == [(0, 1)]
    # fixed and retried: the job runs again and succeeds
    from autoembed.watches import retry

    assert await retry(db, "documents") == 1
    await drain(db_url, minilm)
    assert_matches(minilm, "POISON pill", (await vectors(db))[1000][1])
    assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(0,)]


async def test_running_worker_wakes_on_notify(db: Any, db_url: str, minilm: Embedder) -> None:
    await make_documents(db)
    await watch_documents(db)
    # a poll interval longer than the test: only the notification can wake the worker
    worker = Worker(
        settings(db_url, poll_seconds=3600), progress=False, embedder_factory=lambda _n: minilm
    )
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.listener.ready.wait(), 30)
        await asyncio.sleep(0.3)  # the worker has claimed nothing and is idle
        await db.execute("INSERT INTO documents (content) VALUES ('wake up')")

        async def embedded() -> bool:
            return (await vectors(db))[1][1] is not None

        await wait_for(embedded, timeout=120)  # far below the hour's poll
        assert worker.listener.notifications >= 1
    finally:
        worker.request_stop("test done")
        assert await asyncio.wait_for(task, 30) == 0


async def test_model_change_without_a_search_gap(db: Any, db_url: str, minilm: Embedder) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute("INSERT INTO documents (content) VALUES ('one'), ('two')")
    await drain(db_url, minilm)
    before = await vectors(db)
    await db.execute("SELECT autoembed.register_model('other-384', 384)")
    await db.execute("SELECT autoembed.set_model('documents', 'other-384')")
    # the old vectors stay, consistent with each other, until the new ones cover every row
    assert {k: v[0] for k, v in (await vectors(db)).items()} == {1: "one", 2: "two"}
    assert all(v is not None for _, v in (await vectors(db)).values())
    lanes = await fetch(db, "SELECT lane, count(*) FROM autoembed.jobs GROUP BY lane")
    assert lanes == [("next", 2)]
    # a worker holding the watch as it was refuses to write into it
    worker = Worker(settings(db_url), progress=False, embedder_factory=lambda _n: minilm)
    await worker.pool.open()
    try:
        current = next(iter((await worker.queue.watches()).values()))
        old = dataclasses.replace(current, version=current.version - 1)  # what it read before
        jobs = await worker.queue.claim("next", "backfill", [old.id], 10, 30)
        rows = await worker.queue.read(old, "next", [j.pk for j in jobs])
        vecs = {p: minilm.embed([r.vals[0]])[0] for p, r in rows.items() if r.vals}
        with pytest.raises(WatchChanged, match="not writing them"):
            await worker.queue.finish(old, "next", jobs, rows, vecs)
        await worker.queue.release(jobs)
    finally:
        await worker.pool.close()
    # the new model's vectors are made beside the old ones, then swapped in at once
    flipped = Flipped(minilm)
    await drain(db_url, flipped)
    watch = await fetch(db, "SELECT model, next_model FROM autoembed.watches")
    assert watch == [("other-384", None)]
    after = await vectors(db)
    for pk, (text, vector) in after.items():
        assert np.allclose(vector, -before[pk][1], atol=1e-6), text  # the new model's vectors
    # the swap renames columns (no row is rewritten); the old column is dropped unless
    # something of the user's depends on it (here: a trigger on UPDATE OF embedding)
    columns = await fetch(
        db,
        "SELECT attname FROM pg_attribute WHERE attrelid = 'documents'::regclass "
        "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    assert [c[0] for c in columns] == ["id", "content", "title", "embedding__old_1", "embedding"]
    note = await fetch(db, "SELECT index_note FROM autoembed.status")
    assert "the old vectors stay in public.documents.embedding__old_1" in note[0][0]
    # searching works on the new vectors, through the same function
    q = -minilm.embed(["one"])[0]
    hits = await fetch(db, "SELECT id FROM match_documents(%s, 0.5, 5)", q)
    assert hits[0] == (1,)


class Flipped:
    """A second 'model': all-MiniLM-L6-v2's vectors negated (another vector space)."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.dim, self.stats, self.name = inner.dim, inner.stats, "other-384"
        self.max_tokens, self.encode = inner.max_tokens, inner.encode

    def embed(self, texts: list[str], **kw: Any) -> np.ndarray:
        out: np.ndarray = -self.inner.embed(texts, **kw)
        return out


async def test_claim_uses_the_partial_index(db: Any) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute("SET enable_seqscan = off")
    from autoembed.db import queries

    plan = await fetch(
        db,
        "EXPLAIN (FORMAT JSON) "
        + queries()["claim"]
        .replace("%(lease)s", "30")
        .replace("%(worker)s", "'w'")
        .replace("%(lane)s", "'embed'")
        .replace("%(kind)s", "'backfill'")
        .replace("%(watches)s", "ARRAY[1]")
        .replace("%(limit)s", "10"),
    )
    assert "jobs_claim_idx" in str(plan[0][0])


async def test_long_texts_read_only_as_much_as_the_model_takes(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_documents(db)
    await watch_documents(db)
    long_text = " ".join(f"word{i}" for i in range(20000))  # 150 kB, far past 256 tokens
    spaced = "start" + " " * 20000 + " ".join(["finish"] * 300)  # one token in the prefix
    for text in (long_text, spaced):
        await db.execute("INSERT INTO documents (content) VALUES (%s)", (text,))
    await drain(db_url, minilm)
    rows = await vectors(db)
    assert_matches(minilm, long_text, rows[1][1])
    assert_matches(minilm, spaced, rows[2][1])  # read again whole: the prefix was not enough


class Slow:
    """A real embedder that takes its time, and says when it has begun."""

    def __init__(self, inner: Embedder) -> None:
        self.inner, self.started = inner, threading.Event()
        self.dim, self.stats, self.name = inner.dim, inner.stats, inner.name
        self.max_tokens, self.encode = inner.max_tokens, inner.encode

    def embed(self, texts: list[str], **kw: Any) -> np.ndarray:
        self.started.set()
        time.sleep(0.5)
        return self.inner.embed(texts, **kw)


async def test_shutdown_mid_claim_keeps_the_rest_queued(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute(
        "INSERT INTO documents (content) SELECT 'row ' || g FROM generate_series(1, 500) g"
    )
    slow = Slow(minilm)
    worker = Worker(
        settings(db_url, batch_size=500, concurrency=1),
        progress=False,
        embedder_factory=lambda _n: slow,
    )
    task = asyncio.create_task(worker.run())
    await asyncio.to_thread(slow.started.wait, 60)
    worker.request_stop("test")
    assert await asyncio.wait_for(task, 30) == 0
    done = (await fetch(db, "SELECT count(embedding) FROM documents"))[0][0]
    assert 0 < done < 500  # the chunk in flight was finished and written
    status = await fetch(db, "SELECT status, count(*) FROM autoembed.jobs GROUP BY status")
    assert status == [("pending", 500 - done)]  # the rest released at once, none failed
    await drain(db_url, minilm)
    assert await fetch(db, "SELECT count(embedding) FROM documents") == [(500,)]
