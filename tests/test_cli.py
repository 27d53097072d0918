"""Command-line promises of the README without a test elsewhere: unwatch --drop-column,
--log-format json, and the demo."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import pytest
from autoembed.engine import Embedder

from .conftest import AUTOEMBED, ROOT, worker_env
from .helpers import fetch, make_documents, watch_documents


def run(db_url: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AUTOEMBED, *args],
        env=worker_env(db_url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def test_unwatch_drop_column(db: Any, db_url: str) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute("INSERT INTO documents (content) VALUES ('queued')")
    # a trigger of the user's on the vector column: the column is not dropped from under it
    refused = await asyncio.to_thread(run, db_url, "unwatch", "documents", "--drop-column")
    assert refused.returncode == 4 and "other objects depend on it" in refused.stderr
    assert await fetch(db, "SELECT count(*) FROM autoembed.watches") == [(1,)]  # unchanged
    await db.execute("DROP TRIGGER documents_writes ON documents")
    done = await asyncio.to_thread(run, db_url, "unwatch", "documents", "--drop-column")
    assert done.returncode == 0, done.stderr
    assert "stopped watching documents.embedding and dropped the column" in done.stdout
    columns = await fetch(
        db,
        "SELECT attname FROM pg_attribute WHERE attrelid = 'documents'::regclass "
        "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    assert [c[0] for c in columns] == ["id", "content", "title"]
    assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(0,)]
    assert await fetch(
        db, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'match_documents%%'"
    ) == [(0,)]
    triggers = await fetch(
        db,
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'documents'::regclass "
        "AND tgname LIKE 'autoembed%%'",
    )
    assert triggers == [(0,)]
    again = await asyncio.to_thread(run, db_url, "unwatch", "documents")
    assert again.returncode == 1 and "was not watched" in again.stderr


async def test_json_logs_carry_fields(db: Any, db_url: str, minilm: Embedder) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute("INSERT INTO documents (content) VALUES ('logged'), (NULL)")
    done = await asyncio.to_thread(
        run, db_url, "run", "--drain", "--log-format", "json", "--log-level", "debug"
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert records and all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    assert any(r.get("watch") == 1 and r.get("action") == "watch" for r in records), records
    assert all(line.startswith("{") for line in done.stderr.splitlines() if line.strip())


@pytest.mark.slow
def test_demo() -> None:
    done = subprocess.run(
        [*AUTOEMBED, "demo", "--rows", "40", "--model", "all-minilm-l6-v2"],
        env=worker_env("dbname=unused"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "loaded 24 whole pages" in out and "search over whole pages" in out
    assert 'hybrid search (full text + vectors) for an exact name: "wal_writer_flush_after"' in out
    hybrid = out.split("wal_writer_flush_after", 1)[1].splitlines()[1]
    assert "flushes WAL" in hybrid  # the passage that names it comes first
    assert "live: an INSERT got its vector" in out
