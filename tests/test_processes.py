"""Real worker processes, started, killed and outlived: the no-loss invariants."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from autoembed.engine import Embedder

from .conftest import AUTOEMBED, ROOT, Server, worker_env
from .helpers import assert_matches, fetch, make_documents, vectors, wait_for, watch_documents

pytestmark = pytest.mark.slow

TOPICS = ["indexes", "vacuum", "replication", "json", "locks", "joins", "backups", "roles"]


async def fill(conn: Any, n: int) -> None:
    await conn.execute(
        "INSERT INTO documents (content) SELECT 'note ' || g || ' about ' || "
        "(ARRAY[%s])[1 + g %% 8] FROM generate_series(1, %s) g".replace(
            "ARRAY[%s]", "ARRAY[" + ",".join(f"'{t}'" for t in TOPICS) + "]"
        ),
        (n,),
    )


@contextmanager
def workers(dsn: str, count: int, *args: str, **env: str) -> Iterator[list[subprocess.Popen[str]]]:
    procs = [
        subprocess.Popen(
            [*AUTOEMBED, "run", *args],
            env=worker_env(dsn, **env),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(count)
    ]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)
            if p.stdout:
                p.stdout.close()


async def embedded_count(conn: Any) -> int:
    return int((await fetch(conn, "SELECT count(embedding) FROM documents"))[0][0])


async def assert_all_done_once(conn: Any, n: int, minilm: Embedder) -> None:
    assert await embedded_count(conn) == n
    assert await fetch(conn, "SELECT count(*) FROM autoembed.jobs") == [(0,)]
    twice = await fetch(
        conn, "SELECT id, count(*) FROM documents_writes GROUP BY id HAVING count(*) > 1"
    )
    assert twice == [], f"rows written more than once: {twice[:5]}"
    rows = await vectors(conn)
    for i in (1, n // 2, n):
        assert_matches(minilm, rows[i][0], rows[i][1])


@pytest.mark.parametrize("count", [2, 3])
async def test_several_workers_share_the_queue(
    count: int, db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_documents(db)
    await watch_documents(db)
    await fill(db, 1000)
    with workers(db_url, count, "--drain", "--batch-size", "16") as procs:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            assert p.returncode == 0, out
    await assert_all_done_once(db, 1000, minilm)
    by_worker = await fetch(db, "SELECT count(DISTINCT id) FROM documents_writes")
    assert by_worker == [(1000,)]


async def test_kill_9_mid_batch_then_restart(db: Any, db_url: str, minilm: Embedder) -> None:
    await make_documents(db)
    await watch_documents(db)
    await fill(db, 1000)
    env = {"AUTOEMBED_LEASE_SECONDS": "3"}
    with workers(db_url, 1, "--batch-size", "16", **env) as (proc,):

        async def started() -> bool:
            return await embedded_count(db) >= 100

        await wait_for(started, timeout=120, every=0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    done_at_kill = await embedded_count(db)
    assert done_at_kill < 1000, "the worker finished before it could be killed"
    running = await fetch(db, "SELECT count(*) FROM autoembed.jobs WHERE status = 'running'")
    # the restarted worker retakes the dead one's leases once they run out
    with workers(db_url, 1, "--drain", "--batch-size", "64", **env) as (proc,):
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
    if running[0][0]:  # killed mid-batch: its leases ran out and were taken over
        assert "outlived their lease" in out
    await assert_all_done_once(db, 1000, minilm)
    assert await fetch(db, "SELECT count(*) FROM autoembed.failed_jobs") == [(0,)]


async def test_postgres_restart_under_a_running_worker(
    server: Server, db_url: str, minilm: Embedder
) -> None:
    from autoembed.db import connect

    async with await connect(db_url) as conn:
        await make_documents(conn)
        await watch_documents(conn)
        await fill(conn, 2000)
    env = {"AUTOEMBED_LEASE_SECONDS": "4"}
    with workers(db_url, 1, "--batch-size", "16", **env) as (proc,):

        async def some_done() -> bool:
            async with await connect(db_url) as c:
                return await embedded_count(c) >= 50

        await wait_for(some_done, timeout=120, every=0.05)
        await asyncio.to_thread(server.restart, 2.0)  # down for two seconds, mid-run
        async with await connect(db_url) as c:
            assert await embedded_count(c) < 2000, "the restart came too late to test anything"

        async def all_done() -> bool:
            try:
                async with await connect(db_url) as c:
                    return await embedded_count(c) == 2000
            except Exception:
                return False

        await wait_for(all_done, timeout=180, every=0.5)
        assert proc.poll() is None, "the worker died instead of reconnecting"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
    async with await connect(db_url) as conn:
        await assert_all_done_once(conn, 2000, minilm)


async def test_sigterm_exits_zero_promptly(db: Any, db_url: str) -> None:
    await make_documents(db)
    await watch_documents(db)
    with workers(db_url, 1) as (proc,):

        async def listening() -> bool:
            rows = await fetch(
                db, "SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN autoembed'"
            )
            return rows[0][0] > 0

        await wait_for(listening, timeout=60)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)  # a bound for a hung worker, not a speed test
        assert proc.returncode == 0, out
        assert "SIGTERM: finishing in-flight work" in out


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AUTOEMBED, *args],
        env=worker_env(dsn),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


async def test_command_line_end_to_end(db: Any, db_url: str, minilm: Embedder) -> None:
    import json

    await db.execute("CREATE TABLE documents (id bigint PRIMARY KEY, content text)")
    await db.execute(
        "INSERT INTO documents VALUES (1, 'CREATE INDEX CONCURRENTLY builds an index without "
        "locking out writes'), (2, 'VACUUM reclaims storage occupied by dead tuples')"
    )
    done = cli(db_url, "watch", "documents", "--column", "content")
    assert done.returncode == 0, done.stderr
    assert "match_documents" in done.stdout and "2 job(s) queued" in done.stdout
    status = json.loads(cli(db_url, "status", "--json").stdout)
    assert status["watches"][0]["pending"] == 2
    done = cli(db_url, "run", "--drain")
    assert done.returncode == 0, done.stderr
    found = cli(db_url, "search", "documents", "build an index without blocking writes")
    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines()[0].split()[1] == "1"
    retried = cli(db_url, "retry")
    assert retried.returncode == 0 and "queued 0 failed job(s)" in retried.stdout
    refused = cli(db_url, "watch", "documents", "--column", "nope")
    assert refused.returncode == 4
    assert (
        'has no column "nope"' in refused.stderr
        and "Its columns are: id, content" in refused.stderr
    )
    gone = cli(db_url, "unwatch", "documents")
    assert gone.returncode == 0
    assert await fetch(db, "SELECT count(*) FROM autoembed.watches") == [(0,)]
    no_db = subprocess.run(
        [*AUTOEMBED, "status"],
        env={**worker_env(db_url), "DATABASE_URL": ""},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert no_db.returncode == 2 and "set DATABASE_URL" in no_db.stderr
