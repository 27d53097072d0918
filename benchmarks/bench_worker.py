"""The worker end to end, on an embedded PostgreSQL (or $DATABASE_URL's server).

    python benchmarks/bench_worker.py [--rows 1000] [--latency 50] [--noop 20000] [--rss]

1. drain: rows/s draining N pgdocs passages through triggers, queue and writes, against the
   engine alone on the same texts in the same run (target: at least 0.95 of the engine);
2. latency: single-row INSERTs into an idle running worker, time until the vector is
   committed, minus the engine's own time for that text (targets: p50 <= 30 ms, p95 <= 100 ms);
3. queue overhead: claim + read + write + delete with a no-op embedder, rows/s, with and
   without the HNSW index (PgQueuer publishes 8,000-14,000 jobs/s);
4. memory (--rss): peak RSS of a worker process draining 2,000 and 20,000 rows.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoembed.config import Settings
from autoembed.db import connect
from autoembed.engine import Embedder
from autoembed.lanes import EMBED_CHUNK, turn_size
from autoembed.migrate import migrate
from autoembed.runner import Worker
from autoembed.watches import watch
from psycopg import sql

from benchmarks.common import ROOT, cores, passages

MODEL = "all-minilm-l6-v2"


class NoOp:
    """Returns ready-made unit vectors at once (distinct ones, as real text would give, so
    the HNSW index does its usual work): what is left is the queue's own cost. By default
    it cycles through 4,096 vectors made once; ``distinct=True`` makes new ones from a
    seeded generator on every call (no two rows share a vector, however many there are)."""

    def __init__(self, dim: int = 384, *, distinct: bool = False, seed: int = 0) -> None:
        self.dim, self.name, self.max_tokens = dim, "noop", 512
        from autoembed.engine import EmbedStats

        self.stats = EmbedStats()
        self.rng = np.random.default_rng(seed)
        self.distinct = distinct
        self.vectors = self._unit(4096)
        self.next = 0

    def _unit(self, n: int) -> np.ndarray:
        v = self.rng.standard_normal((n, self.dim)).astype(np.float32)
        unit: np.ndarray = v / np.linalg.norm(v, axis=1, keepdims=True)
        return unit

    def embed(self, texts: list[str], **_: Any) -> np.ndarray:
        if self.distinct:
            return self._unit(len(texts))
        rows = (self.next + np.arange(len(texts))) % len(self.vectors)
        self.next += len(texts)
        return self.vectors[rows]

    def encode(self, texts: Sequence[str]) -> Any:
        """Token counts as the worker asks for them (for texts longer than its read prefix):
        about four characters a token, capped at ``max_tokens``."""
        from autoembed.engine.tokenize import Encoded

        lengths = np.array([min(len(t) // 4 + 2, self.max_tokens) for t in texts], np.int64)
        return Encoded([[] for _ in texts], lengths, int((lengths >= self.max_tokens).sum()))


def use_waiting_fence() -> Callable[[], None]:
    """Diagnostic, this process only: the worker's write fence waits for a job row another
    transaction holds for a moment instead of skipping it (FOR UPDATE instead of FOR
    UPDATE SKIP LOCKED; see bench_backlog.py --fence-check). Returns the undo."""
    from autoembed import queue as queue_module
    from psycopg import sql

    shipped = queue_module.q

    def q(name: str) -> sql.SQL:
        statement = shipped(name)
        if name == "fence":
            return sql.SQL(statement.as_string().replace("SKIP LOCKED", ""))
        return statement

    queue_module.q = q  # type: ignore[assignment]

    def undo() -> None:
        queue_module.q = shipped

    return undo


async def fresh_db(admin_url: str, name: str) -> str:
    async with await connect(admin_url, vector=False) as conn:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    await migrate(url)
    return url


async def load(url: str, texts: list[str], index: bool = True) -> None:
    async with await connect(url) as conn:
        await conn.execute(
            "CREATE TABLE documents (id bigint GENERATED ALWAYS AS IDENTITY "
            "PRIMARY KEY, content text)"
        )
        await watch(conn, "documents", "content", model=MODEL)  # queues nothing yet
        if not index:
            cur = await conn.execute(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_am am ON am.oid = c.relam "
                "WHERE i.indrelid = 'documents'::regclass AND am.amname = 'hnsw'"
            )
            found = await cur.fetchone()
            assert found is not None, "the watch made no HNSW index"
            await conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(found[0])))
        async with conn.cursor() as cur, cur.copy("COPY documents (content) FROM STDIN") as copy:
            for t in texts:
                await copy.write_row((t,))


def settings(url: str, **kw: Any) -> Settings:
    return Settings(**{"database_url": url, "poll_seconds": 0.5, **kw})


async def drain(url: str, emb: Any, **kw: Any) -> float:
    worker = Worker(
        settings(url, **kw), drain=True, progress=False, embedder_factory=lambda _n: emb
    )
    start = time.perf_counter()
    await worker.run()
    return time.perf_counter() - start


async def bench_drain(admin: str, emb: Embedder, n: int) -> None:
    texts = passages(n)
    url = await fresh_db(admin, "bench_drain")
    await load(url, texts)
    emb.embed(texts[:32])
    start = time.perf_counter()
    emb.embed(texts)
    engine = time.perf_counter() - start
    start = time.perf_counter()
    in_turns(emb, texts, settings(url).batch_size)
    shaped = time.perf_counter() - start
    e2e = await drain(url, emb)
    print(
        f"drain {n} passages: worker {n / e2e:.1f} rows/s, engine alone {n / engine:.1f} "
        f"texts/s -> ratio {engine / e2e:.3f}"
    )
    print(
        f"  the engine in the worker's shape (claims of {settings(url).batch_size}, chunks of "
        f"{EMBED_CHUNK}, turns of {turn_size(emb)}, longest first): {n / shaped:.1f} texts/s "
        f"({engine / shaped:.3f} of the engine alone); the worker against it: "
        f"{shaped / e2e:.3f}"
    )


def in_turns(emb: Embedder, texts: list[str], claim: int) -> None:
    """Embed ``texts`` as the worker's lanes hand them to the engine on this device: claims
    of ``claim`` rows in queue order, each sorted longest first and cut into chunks, each
    chunk embedded in turns (``Lanes.embed_turns``), without the queue or the database."""
    size = turn_size(emb)
    for c in range(0, len(texts), claim):
        rows = sorted(texts[c : c + claim], key=len, reverse=True)
        for k in range(0, len(rows), EMBED_CHUNK):
            chunk = rows[k : k + EMBED_CHUNK]
            for t in range(0, len(chunk), size):
                emb.embed(chunk[t : t + size])


async def bench_latency(admin: str, emb: Embedder, n: int) -> None:
    url = await fresh_db(admin, "bench_latency")
    await load(url, [])
    texts = passages(n)
    worker = Worker(settings(url, poll_seconds=30), progress=False, embedder_factory=lambda _n: emb)
    task = asyncio.create_task(worker.run())
    lat, engine_ms = [], []
    async with await connect(url) as conn, await connect(url) as listen:
        # the vector's commit is signalled by a NOTIFY sent in the same transaction as the write
        await conn.execute(
            "CREATE FUNCTION written() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "PERFORM pg_notify('bench_written', NEW.id::text); RETURN NULL; END $$"
        )
        await conn.execute(
            "CREATE TRIGGER written AFTER UPDATE OF embedding ON documents FOR EACH ROW "
            "EXECUTE FUNCTION written()"
        )
        await listen.execute("LISTEN bench_written")
        notes = listen.notifies()
        await asyncio.wait_for(worker.listener.ready.wait(), 30)
        for text in texts:
            await asyncio.sleep(0.2)  # idle between rows, as a live table would be
            t0 = time.perf_counter()
            await conn.execute("INSERT INTO documents (content) VALUES (%s)", (text,))
            await anext(notes)
            lat.append((time.perf_counter() - t0) * 1000)
            s = time.perf_counter()
            emb.embed([text])
            engine_ms.append((time.perf_counter() - s) * 1000)
        await notes.aclose()
    worker.request_stop("benchmark done")
    await task
    over = sorted(a - b for a, b in zip(lat, engine_ms, strict=True))
    q = statistics.quantiles(over, n=20)
    print(
        f"latency INSERT -> vector committed, {n} rows: total p50 {statistics.median(lat):.1f} ms;"
        f" engine alone p50 {statistics.median(engine_ms):.1f} ms; "
        f"the rest p50 {statistics.median(over):.1f} ms, p95 {q[18]:.1f} ms"
    )


async def bench_noop(admin: str, n: int) -> None:
    texts = [f"row {i}" for i in range(n)]
    for index in (False, True):
        url = await fresh_db(admin, "bench_noop")
        await load(url, texts, index=index)
        secs = await drain(url, NoOp(), batch_size=1000, concurrency=4)
        label = "with the HNSW index" if index else "without the HNSW index"
        print(
            f"queue, no-op embedder, {n} rows {label}: {n / secs:.0f} rows/s claimed, "
            "written and completed"
        )


def bench_rss(admin: str, sizes: list[int]) -> None:
    import psutil

    base = passages(6000)
    for n in sizes:
        texts = [" ".join(base[i % len(base)].split()[:40]) for i in range(n)]
        url = asyncio.run(fresh_db(admin, "bench_rss"))
        asyncio.run(load(url, texts))
        env = dict(os.environ, DATABASE_URL=url, AUTOEMBED_MODEL=MODEL)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "autoembed.cli",
                "run",
                "--drain",
                "--no-progress",
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=ROOT,
        )
        ps = psutil.Process(proc.pid)
        peak = 0
        start = time.perf_counter()
        while proc.poll() is None:
            try:
                peak = max(peak, ps.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        secs = time.perf_counter() - start
        print(
            f"peak RSS draining {n} rows: {peak / 2**20:.0f} MiB ({n / secs:.0f} rows/s, "
            f"exit {proc.returncode})"
        )


async def main_async(args: argparse.Namespace, admin: str) -> None:
    emb = Embedder.load(MODEL, device="cpu")
    print(f"{cores()} cores; model {MODEL}")
    if args.rows:
        await bench_drain(admin, emb, args.rows)
    if args.latency:
        await bench_latency(admin, emb, args.latency)
    if args.noop:
        await bench_noop(admin, args.noop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--latency", type=int, default=50)
    parser.add_argument("--noop", type=int, default=20000)
    parser.add_argument("--rss", action="store_true", help="also the memory benchmark")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    admin = os.environ.get("DATABASE_URL")
    if admin:
        asyncio.run(main_async(args, admin))
        if args.rss:
            bench_rss(admin, [2000, 20000])
        return
    from autoembed.pgserver import EmbeddedPostgres

    with EmbeddedPostgres() as pg:
        asyncio.run(main_async(args, pg.url))
        if args.rss:
            bench_rss(pg.url, [2000, 20000])


if __name__ == "__main__":
    main()
