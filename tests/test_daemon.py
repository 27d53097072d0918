"""The daemon under changes and faults (issue 10): it never stalls or loops silently, every
job ends written, cleared or failed with a reason, and it is charged once."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import numpy as np
import psycopg
import pytest
from autoembed.engine import Embedder
from autoembed.errors import ConfigError, LLMModelMissing, LLMUnavailable, ModelNotAvailable
from autoembed.outcomes import Outcome, classify, is_outage
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


class Negated:
    """Another 'model': all-MiniLM-L6-v2's vectors negated (another vector space)."""

    def __init__(self, inner: Embedder, name: str) -> None:
        self.inner = inner
        self.dim, self.stats, self.name = inner.dim, inner.stats, name
        self.max_tokens, self.encode = inner.max_tokens, inner.encode

    def embed(self, texts: list[str], **kw: Any) -> np.ndarray:
        out: np.ndarray = -self.inner.embed(texts, **kw)
        return out


class Gated:
    """A real embedder that waits at a gate the test opens (and says it got there)."""

    def __init__(self, inner: Embedder) -> None:
        self.inner, self.arrived, self.gate = inner, threading.Event(), threading.Event()
        self.dim, self.stats, self.name = inner.dim, inner.stats, inner.name
        self.max_tokens, self.encode = inner.max_tokens, inner.encode

    def embed(self, texts: list[str], **kw: Any) -> np.ndarray:
        self.arrived.set()
        if not self.gate.wait(120):
            raise TimeoutError("the test never opened the gate")
        return self.inner.embed(texts, **kw)


def factory(minilm: Embedder, **others: Any) -> Any:
    def load(name: str) -> Any:
        if name in others:
            made = others[name]
            if isinstance(made, BaseException):
                raise made
            return made
        return minilm

    return load


async def run_in_background(worker: Worker) -> asyncio.Task[int]:
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0)
    return task


async def stop(worker: Worker, task: asyncio.Task[int]) -> int:
    worker.request_stop("test done")
    return await asyncio.wait_for(task, 120)


# ---------------------------------------------------------------------------- stalls and loops


async def test_a_running_worker_serves_a_model_change(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute("INSERT INTO documents (content) VALUES ('one'), ('two'), ('three')")
    await db.execute("SELECT autoembed.register_model('other-384', 384)")
    other = Negated(minilm, "other-384")
    worker = Worker(
        settings(db_url), progress=False, embedder_factory=factory(minilm, **{"other-384": other})
    )
    task = await run_in_background(worker)
    try:

        async def embedded() -> bool:
            return all(v is not None for _, v in (await vectors(db)).values())

        await wait_for(embedded)
        q = minilm.embed(["one"])[0]
        await db.execute("SELECT autoembed.set_model('documents', 'other-384')")

        async def swapped() -> bool:
            # search never comes back empty while the new vectors are being made
            hits = await fetch(db, "SELECT id FROM match_documents(%s, -2, 10)", q)
            assert len(hits) == 3
            return (await fetch(db, "SELECT model FROM autoembed.watches")) == [("other-384",)]

        await wait_for(swapped, every=0.05)
        rows = await vectors(db)
        for text, vector in rows.values():
            assert np.allclose(vector, -minilm.embed([text])[0], atol=1e-6)
        # and it goes on serving the watch with the new model
        await db.execute("INSERT INTO documents (content) VALUES ('four')")

        async def four() -> bool:
            return (await vectors(db))[4][1] is not None

        await wait_for(four)
        assert np.allclose((await vectors(db))[4][1], -minilm.embed(["four"])[0], atol=1e-6)
    finally:
        assert await stop(worker, task) == 0


async def test_a_change_of_dimension(db: Any, db_url: str, minilm: Embedder) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute("INSERT INTO documents (content) VALUES ('alpha'), ('beta')")
    await drain(db_url, minilm)

    class Doubled(Negated):
        def embed(self, texts: list[str], **kw: Any) -> np.ndarray:
            v = self.inner.embed(texts, **kw)
            return np.concatenate([v, v], axis=1) / np.sqrt(2)

    wide = Doubled(minilm, "wide-768")
    wide.dim = 768
    await db.execute("SELECT autoembed.register_model('wide-768', 768)")
    await db.execute("SELECT autoembed.set_model('documents', 'wide-768')")
    assert await fetch(
        db,
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = 'documents'::regclass AND attname = 'embedding'",
    ) == [("vector(384)",)]
    worker = Worker(
        settings(db_url),
        drain=True,
        progress=False,
        embedder_factory=factory(minilm, **{"wide-768": wide}),
    )
    assert await asyncio.wait_for(worker.run(), 300) == 0
    assert await fetch(
        db,
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = 'documents'::regclass AND attname = 'embedding'",
    ) == [("vector(768)",)]
    q = wide.embed(["alpha"])[0]
    hits = await fetch(db, "SELECT id FROM match_documents(%s, 0.5, 5)", q)
    assert hits[0] == (1,)


async def test_drain_ends_and_names_a_watch_it_cannot_serve(
    db: Any, db_url: str, minilm: Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    await make_documents(db)
    await make_documents(db, "others")
    await watch_documents(db)
    await db.execute("SELECT autoembed.register_model('absent-model', 384)")
    await db.execute("SELECT autoembed.watch('others', 'content', model => 'absent-model')")
    await db.execute("INSERT INTO documents (content) VALUES ('served')")
    await db.execute("INSERT INTO others (content) VALUES ('waits for its model')")
    missing = ModelNotAvailable("absent-model is not here: put its files in /models/absent-model")
    caplog.set_level(logging.ERROR)
    worker = Worker(
        settings(db_url),
        drain=True,
        progress=False,
        embedder_factory=factory(minilm, **{"absent-model": missing}),
    )
    assert await asyncio.wait_for(worker.run(), 120) == 3
    assert (await vectors(db))[1][1] is not None
    assert await fetch(db, "SELECT status, attempts FROM autoembed.jobs") == [("pending", 0)]
    assert "public.others" in caplog.text and "put its files in /models/absent-model" in caplog.text


async def test_a_failed_model_load_is_retried(db: Any, db_url: str, minilm: Embedder) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute("INSERT INTO documents (content) VALUES ('loaded on the second try')")
    tries: list[int] = []

    def flaky(name: str) -> Embedder:
        tries.append(1)
        if len(tries) == 1:
            raise ModelNotAvailable("the download was cut off")
        return minilm

    worker = Worker(settings(db_url), progress=False, embedder_factory=flaky)
    worker.models.retry_seconds = 0.05
    task = await run_in_background(worker)
    try:

        async def embedded() -> bool:
            return (await vectors(db))[1][1] is not None

        await wait_for(embedded)
    finally:
        assert await stop(worker, task) == 0
    assert len(tries) == 2


async def test_database_errors_are_classified_by_sqlstate(db: Any, db_url: str) -> None:
    async def error_of(statement: str) -> BaseException:
        try:
            await db.execute(statement)
        except psycopg.Error as exc:
            return exc
        raise AssertionError(f"{statement} did not fail")

    await db.execute("SET statement_timeout = '10ms'")
    assert classify(await error_of("SELECT pg_sleep(1)")) is Outcome.RETRY
    await db.execute("RESET statement_timeout")
    await db.execute("CREATE TABLE t (v varchar(3))")
    assert classify(await error_of("INSERT INTO t VALUES ('too long')")) is Outcome.RETRY
    assert classify(await error_of("SELECT 1/0")) is Outcome.RETRY
    async with await psycopg.AsyncConnection.connect(db_url) as other:
        await other.execute("LOCK TABLE t")
        await db.execute("SET lock_timeout = '10ms'")
        assert classify(await error_of("INSERT INTO t VALUES ('x')")) is Outcome.BUSY
        await db.execute("RESET lock_timeout")
    try:
        await psycopg.AsyncConnection.connect("postgresql://x@127.0.0.1:1/nothing")
    except psycopg.Error as exc:
        assert is_outage(exc) and classify(exc) is Outcome.OUTAGE
    assert classify(PermissionError("cache directory not writable")) is Outcome.RETRY
    assert classify(LLMUnavailable("refused")) is Outcome.OUTAGE
    assert classify(LLMModelMissing("no such model")) is Outcome.FAIL
    assert classify(ConfigError("bad option")) is Outcome.FAIL


async def test_a_statement_timeout_costs_an_attempt_and_does_not_loop(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute("INSERT INTO documents (content) VALUES ('slow to write')")
    await db.execute(
        """CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN PERFORM pg_sleep(60); RETURN NEW; END $$"""
    )
    await db.execute(
        "CREATE TRIGGER slow BEFORE UPDATE OF embedding ON documents "
        "FOR EACH ROW EXECUTE FUNCTION slow_write()"
    )
    await db.execute(f"ALTER DATABASE {db.info.dbname} SET statement_timeout = '2s'")
    await drain(db_url, minilm, max_attempts=2)
    failed = await fetch(db, "SELECT attempts, last_error FROM autoembed.failed_jobs")
    assert len(failed) == 1 and failed[0][0] == 2
    assert "statement timeout" in failed[0][1]


async def test_a_dead_side_task_stops_the_worker_loudly(
    db: Any, db_url: str, minilm: Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    await make_documents(db)
    await watch_documents(db)
    worker = Worker(settings(db_url), progress=False, embedder_factory=factory(minilm))

    async def broken(max_attempts: int) -> list[tuple[int, str]]:
        raise RuntimeError("a bug in housekeeping")

    worker.queue.reap = broken  # type: ignore[method-assign]
    caplog.set_level(logging.CRITICAL)
    assert await asyncio.wait_for(worker.run(), 120) == 1
    assert "the housekeeping task stopped: RuntimeError: a bug in housekeeping" in caplog.text


async def test_a_lost_lease_is_not_written(db: Any, db_url: str, minilm: Embedder) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute("INSERT INTO documents (content) VALUES ('taken over')")
    gated = Gated(minilm)
    worker = Worker(
        settings(db_url, lease_seconds=3), progress=False, embedder_factory=factory(gated)
    )
    task = await run_in_background(worker)
    try:
        await asyncio.to_thread(gated.arrived.wait, 120)
        # meanwhile the lease ran out and another worker took the job over
        await db.execute(
            "UPDATE autoembed.jobs SET worker = 'another worker#1', "
            "leased_until = now() + interval '1 hour'"
        )

        async def noticed() -> bool:
            return bool(worker.lost)

        await wait_for(noticed)  # the heartbeat found the lease gone
        gated.gate.set()

        async def settled() -> bool:
            return not worker.claims["embed"]

        await wait_for(settled)
    finally:
        gated.gate.set()
        assert await stop(worker, task) == 0
    assert await fetch(db, "SELECT count(*) FROM documents_writes") == [(0,)]
    assert await fetch(db, "SELECT status, worker FROM autoembed.jobs") == [
        ("running", "another worker#1")
    ]


async def test_shutdown_releases_the_jobs_of_a_cancelled_slot(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute(
        "INSERT INTO documents (content) SELECT 'row ' || g FROM generate_series(1, 20) g"
    )
    gated = Gated(minilm)
    worker = Worker(
        settings(db_url, shutdown_seconds=0.5),
        progress=False,
        embedder_factory=factory(gated),
    )
    task = await run_in_background(worker)
    await asyncio.to_thread(gated.arrived.wait, 120)
    try:
        assert await stop(worker, task) == 0  # the slot stuck in inference is cancelled
    finally:
        gated.gate.set()
    rows = await fetch(db, "SELECT status, count(*) FROM autoembed.jobs GROUP BY status")
    assert rows == [("pending", 20)]  # released at once, not left running until the lease ends


async def test_set_model_while_a_batch_is_written(db: Any, db_url: str) -> None:
    """The batch's write and set_model take the watch's lock first: no deadlock, whichever
    order they come in."""
    await make_documents(db)
    wid = await watch_documents(db)
    await db.execute("INSERT INTO documents (content) VALUES ('a'), ('b')")
    await db.execute("SELECT autoembed.register_model('other-384', 384)")
    vec = "[" + ",".join(["0.1"] * 384) + "]"
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as batch:
        await batch.execute("BEGIN")
        await batch.execute("SELECT autoembed.hold_watch(%s)", (wid,))
        write = (
            f"SELECT * FROM autoembed.w{wid}_write('embed', 4::smallint, ARRAY[%s], "
            "ARRAY[hashtextextended(%s, 0)], ARRAY[%s::vector], NULL)"
        )
        await batch.execute(write, ("1", "a", vec))
        changing = asyncio.create_task(
            db.execute("SELECT autoembed.set_model('documents', 'other-384')")
        )
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as look:

            async def set_model_waits() -> bool:
                rows = await fetch(
                    look,
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                )
                return bool(rows[0][0])

            await wait_for(set_model_waits)
        await batch.execute(write, ("2", "b", vec))  # the second row, after set_model asked
        await batch.execute("COMMIT")
        await asyncio.wait_for(changing, 60)
    assert await fetch(db, "SELECT next_model FROM autoembed.watches") == [("other-384",)]
    assert await fetch(db, "SELECT count(embedding) FROM documents") == [(2,)]


async def test_a_poison_pill_is_not_retried_forever(db: Any, db_url: str) -> None:
    """A text that kills the worker (out of memory, a crash) leaves its lease to expire:
    reaping it costs an attempt, and it fails for good after the last one."""
    await make_documents(db)
    await watch_documents(db)
    await db.execute("INSERT INTO documents (content) VALUES ('kills every worker')")
    worker = Worker(settings(db_url, max_attempts=2), progress=False)
    await worker.pool.open()
    try:
        for expected in ("pending", "failed"):
            jobs = await worker.queue.claim("embed", "fresh", [1], 10, 60)
            assert len(jobs) == 1
            # the worker died on it: nobody renews the lease, and it runs out
            await db.execute("UPDATE autoembed.jobs SET leased_until = now() - interval '1 s'")
            reaped = await worker.queue.reap(2)
            assert reaped == [(jobs[0].id, expected)]
    finally:
        await worker.pool.close()
    failed = await fetch(db, "SELECT attempts, last_error FROM autoembed.failed_jobs")
    assert failed[0][0] == 2 and "stopped renewing its lease" in failed[0][1]


async def test_a_failure_midway_charges_only_the_jobs_it_interrupted(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute(
        "INSERT INTO documents (content) SELECT 'text ' || g FROM generate_series(1, 100) g"
    )
    worker = Worker(
        settings(db_url, batch_size=100, concurrency=1, max_attempts=2),
        drain=True,
        progress=False,
        embedder_factory=factory(minilm),
    )
    finish = worker.queue.finish
    calls: list[int] = []

    async def second_write_breaks(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug halfway through the claim")
        return await finish(*args, **kw)

    worker.queue.finish = second_write_breaks  # type: ignore[method-assign]
    assert await asyncio.wait_for(worker.run(), 300) == 0
    writes = await fetch(db, "SELECT count(*), count(DISTINCT id) FROM documents_writes")
    assert writes == [(100, 100)]  # all written in the end, each once
    # the jobs of the broken write were charged one attempt (of two) each, so none failed
    # for good; charged twice, they would have
    assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(0,)]
    assert len(calls) >= 3


async def test_two_watches_on_one_table(db: Any, db_url: str, minilm: Embedder) -> None:
    from autoembed.watches import watch

    await make_documents(db)
    await watch_documents(db)
    info = await watch(
        db, "documents", "title", embedding_column="title_embedding", model="all-minilm-l6-v2"
    )
    assert info["match_function"].startswith("match_documents_title_embedding(")
    await db.execute("INSERT INTO documents (content, title) VALUES ('body text', 'a title')")
    await drain(db_url, minilm)
    row = await fetch(db, "SELECT embedding, title_embedding FROM documents")
    assert_matches(minilm, "body text", np.asarray(row[0][0].to_numpy()))
    assert_matches(minilm, "a title", np.asarray(row[0][1].to_numpy()))


async def test_a_refused_watch_registers_no_model_directory(
    db: Any, tmp_path: Any, minilm: Embedder
) -> None:
    from autoembed.errors import WatchError
    from autoembed.watches import watch

    await db.execute("CREATE TABLE nokey (content text)")
    model_dir = minilm.files.root
    with pytest.raises(WatchError, match="has no primary key"):
        await watch(db, "nokey", "content", model=str(model_dir))
    assert await fetch(
        db, "SELECT count(*) FROM autoembed.models WHERE name = %s", str(model_dir)
    ) == [(0,)]


async def test_long_table_names_get_an_index_each(db: Any) -> None:
    from autoembed.watches import watch

    prefix = "a_table_with_a_long_name_shared_by_two_tables_of_this_test"
    for suffix in ("_one", "_two"):
        await db.execute(f"CREATE TABLE {prefix}{suffix} (id int PRIMARY KEY, content text)")
        await watch(db, prefix + suffix, "content", model="all-minilm-l6-v2", index="now")
    indexes = await fetch(
        db,
        "SELECT indrelid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_am am ON am.oid = c.relam WHERE am.amname = 'hnsw' ORDER BY 1",
    )
    assert [i[0] for i in indexes] == [prefix + "_one", prefix + "_two"]
