"""A chunked watch drained end to end versus the engine alone on the same passage texts,
side by side in one run (issue 11: target ratio >= 0.9).

    nice -n 10 .venv/bin/python benchmarks/bench_chunked_worker.py [--pages N]

Pages come from the whole-page corpus (/work/shared/corpus/pgdocs-pages.jsonl, or the 24
pages shipped with the demo when it is absent), spread evenly; each is watched with
``chunking => '{}'`` and the template ``"{title}\\n\\n{chunk}"``. The engine's run cuts the
same pages with the same chunker and embeds the same texts in the worker's 64-text chunks.
Runs: engine, worker, engine again (the engine's rate is the mean of its two runs), then
the engine fed as the worker's lanes feed it: rows ``CHUNKED_ROWS`` at a time, their new
passages in document order, ``EMBED_CHUNK`` at a time, each chunk in turns (longest first).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autoembed.chunking import Chunker  # noqa: E402
from autoembed.config import Settings  # noqa: E402
from autoembed.db import connect  # noqa: E402
from autoembed.engine import Embedder  # noqa: E402
from autoembed.lanes import CHUNKED_ROWS, EMBED_CHUNK, turn_size  # noqa: E402
from autoembed.migrate import migrate  # noqa: E402
from autoembed.pgserver import EmbeddedPostgres  # noqa: E402
from autoembed.runner import Worker  # noqa: E402
from autoembed.watches import watch  # noqa: E402

SHARED = Path("/work/shared/corpus/pgdocs-pages.jsonl")
TEMPLATE = "{title}\n\n{chunk}"
CHUNK = 64


def load_pages(n: int) -> list[dict[str, Any]]:
    if SHARED.exists():
        pages = [json.loads(line) for line in SHARED.read_text().splitlines()]
    else:
        with gzip.open(ROOT / "worker" / "data" / "pgdocs-pages.jsonl.gz", "rt") as f:
            pages = [json.loads(line) for line in f]
    step = max(1, len(pages) // n)
    return pages[::step][:n]


def engine_run(emb: Embedder, chunker: Chunker, pages: list[dict[str, Any]]) -> tuple[int, float]:
    started = time.perf_counter()
    texts: list[str] = []
    for p in pages:
        reserved = chunker.template_overhead(TEMPLATE, title=p["title"])
        texts += [
            TEMPLATE.format(title=p["title"], chunk=c.text)
            for c in chunker.chunk(p["body"], reserved).chunks
        ]
    # the worker sorts a claim's texts by length before cutting it into chunks; so does this
    for row_texts in [texts]:
        ordered = sorted(row_texts, key=len, reverse=True)
        for i in range(0, len(ordered), CHUNK):
            emb.embed(ordered[i : i + CHUNK])
    return len(texts), time.perf_counter() - started


def page_texts(chunker: Chunker, page: dict[str, Any]) -> list[str]:
    reserved = chunker.template_overhead(TEMPLATE, title=page["title"])
    return [
        TEMPLATE.format(title=page["title"], chunk=c.text)
        for c in chunker.chunk(page["body"], reserved).chunks
    ]


def engine_shaped(
    emb: Embedder, chunker: Chunker, pages: list[dict[str, Any]]
) -> tuple[int, float]:
    """The engine fed as the worker's lanes feed it (``Lanes._chunk_rows``, ``embed_turns``),
    without the queue or the database."""
    started = time.perf_counter()
    size, n = turn_size(emb), 0
    for r in range(0, len(pages), CHUNKED_ROWS):
        texts = [t for p in pages[r : r + CHUNKED_ROWS] for t in page_texts(chunker, p)]
        n += len(texts)
        for c in range(0, len(texts), EMBED_CHUNK):
            chunk = sorted(texts[c : c + EMBED_CHUNK], key=len, reverse=True)
            for t in range(0, len(chunk), size):
                emb.embed(chunk[t : t + size])
    return n, time.perf_counter() - started


async def worker_run(emb: Embedder, pages: list[dict[str, Any]]) -> tuple[int, float]:
    with EmbeddedPostgres() as pg:
        await migrate(pg.url)
        async with await connect(pg.url) as conn:
            await conn.execute("CREATE TABLE pages (id bigint PRIMARY KEY, title text, body text)")
            async with (
                conn.cursor() as cur,
                cur.copy("COPY pages (id, title, body) FROM STDIN") as cp,
            ):
                for p in pages:
                    await cp.write_row((p["id"], p["title"], p["body"]))
            await watch(
                conn,
                "pages",
                "body",
                model=emb.name,
                chunking={},
                template=TEMPLATE,
                index="deferred",
            )
        worker = Worker(
            Settings(database_url=pg.url, poll_seconds=0.2),
            drain=True,
            progress=False,
            embedder_factory=lambda _n: emb,
        )
        started = time.perf_counter()
        code = await worker.run()
        elapsed = time.perf_counter() - started
        assert code == 0, code
        async with await connect(pg.url) as conn:
            cur = await conn.execute("SELECT count(*) FROM pages_chunks")
            row = await cur.fetchone()
        return int(row[0]) if row else 0, elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=120)
    parser.add_argument("--model", default="all-minilm-l6-v2")
    args = parser.parse_args()
    pages = load_pages(args.pages)
    emb = Embedder.load(args.model, device="cpu")
    chunker = Chunker.for_model(emb.files)
    chars = sum(len(p["body"]) for p in pages)
    print(f"{len(pages)} pages, {chars:,} characters, model {emb.name}, {emb.max_tokens} tokens")
    n1, t1 = engine_run(emb, chunker, pages)
    tokens_before = emb.stats.tokens
    n2, t2 = asyncio.run(worker_run(emb, pages))
    tokens = emb.stats.tokens - tokens_before
    n3, t3 = engine_run(emb, chunker, pages)
    engine_rate = (n1 / t1 + n3 / t3) / 2
    worker_rate = n2 / t2
    print(f"engine alone:      {n1} passages in {t1:.1f}s ({n1 / t1:.1f}/s), again {n3 / t3:.1f}/s")
    print(
        f"worker end to end: {n2} passages in {t2:.1f}s ({worker_rate:.1f} passages/s, "
        f"{len(pages) / t2:.2f} pages/s, {tokens / t2:,.0f} tokens/s; model load excluded, "
        "its deferred index built)"
    )
    print(f"ratio worker / engine: {worker_rate / engine_rate:.3f}")
    n4, t4 = engine_shaped(emb, chunker, pages)
    print(
        f"engine fed as the worker feeds it ({CHUNKED_ROWS} rows at a time, chunks of "
        f"{EMBED_CHUNK}, turns of {turn_size(emb)}): {n4 / t4:.1f}/s "
        f"({n4 / t4 / engine_rate:.3f} of the engine alone); the worker against it: "
        f"{worker_rate / (n4 / t4):.3f}"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process (engine and worker): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
