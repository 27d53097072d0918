"""vector against halfvec storage (``watch --storage halfvec``): table and index size, and
what search loses, on the 5,933 pgdocs passages and on synthetic copies, side by side.

    python benchmarks/bench_storage.py [--rows 100000] [--reuse-vectors]

Two watched tables hold the same all-MiniLM-L6-v2 vectors of the passages (made here with
the engine, or loaded from .bench/search/ with ``--reuse-vectors``, where bench_search.py
saves them), one watched with ``storage => 'vector'`` and one with ``'halfvec'``; each has
the HNSW index the watch builds. For each:

- sizes: the embedding column's bytes (sum of pg_column_size), the table's and the HNSW
  index's pages (pg_table_size, pg_relation_size);
- quality through the watch's own match function: recall@10 against an exact search in
  float32 (numpy) for the 155 questions of benchmarks/questions/, and for 300 passages used
  as queries; hit@1 and hit@10 of the question sets (the expected passage first / in the
  first ten);
- latency p50/p95 of the match function (one client, queries embedded beforehand).

At ``--rows`` the passages are copied with their vectors perturbed (gaussian noise, then
normalised: no two rows the same) and inserted with triggers off; the HNSW indexes are
rebuilt and measured again, recall against exact search over the perturbed set.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoembed.db import connect
from autoembed.engine import Embedder
from autoembed.watches import watch

from benchmarks.bench_search import CACHE, MODEL, Query, corpus, queries
from benchmarks.bench_worker import fresh_db
from benchmarks.common import cores, with_server

STORAGES = ("vector", "halfvec")
K = 10
PASSAGE_QUERIES = 300


def corpus_vectors(reuse: bool, rows: list[dict[str, Any]]) -> np.ndarray:
    cached = CACHE / f"pgdocs-{MODEL}.npy"
    if reuse and cached.is_file():
        print(f"passage vectors loaded from {cached}")
        return np.load(cached)
    emb = Embedder.load(MODEL, device="cpu")
    start = time.perf_counter()
    out = np.concatenate(
        [emb.embed([r["content"] for r in rows[i : i + 64]]) for i in range(0, len(rows), 64)]
    ).astype(np.float32)
    print(f"{len(rows)} passages embedded in {time.perf_counter() - start:.1f} s")
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(cached, out)
    return out


async def load(url: str, rows: list[dict[str, Any]], vectors: np.ndarray) -> None:
    async with await connect(url) as conn:
        for storage in STORAGES:
            table = f"docs_{storage}"
            await conn.execute(
                f"CREATE TABLE {table} (id bigint PRIMARY KEY, content text, "
                f"embedding {storage}({vectors.shape[1]}))"
            )
            async with (
                conn.cursor() as cur,
                cur.copy(f"COPY {table} (id, content, embedding) FROM STDIN") as copy,
            ):
                for r, v in zip(rows, vectors, strict=True):
                    await copy.write_row((r["id"], r["content"], v))
            # the vectors are there: nothing is queued; the watch builds its HNSW index now
            await watch(conn, table, "content", model=MODEL, storage=storage, index="now")
            await conn.execute(f"VACUUM ANALYZE {table}")


def sizes(conn: psycopg.Connection[Any], table: str) -> tuple[int, int, int]:
    column = conn.execute(f"SELECT sum(pg_column_size(embedding)) FROM {table}").fetchone()
    assert column is not None
    index = conn.execute(
        "SELECT pg_relation_size(i.indexrelid) FROM pg_index i JOIN pg_class c "
        "ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam "
        "WHERE i.indrelid = %s::regclass AND a.amname = 'hnsw'",
        (table,),
    ).fetchone()
    assert index is not None, f"{table} has no HNSW index"
    total = conn.execute("SELECT pg_table_size(%s::regclass)", (table,)).fetchone()
    assert total is not None
    return int(column[0]), int(total[0]), int(index[0])


def exact_top(base: np.ndarray, q: np.ndarray) -> list[int]:
    scores = base @ (q / np.linalg.norm(q))
    return [int(i) + 1 for i in np.argsort(-scores, kind="stable")[:K]]


def search(conn: psycopg.Connection[Any], table: str, q: np.ndarray) -> tuple[list[int], float]:
    start = time.perf_counter()
    got = conn.execute(f"SELECT id FROM match_{table}(%s, -1, {K})", (q,), prepare=True).fetchall()
    return [int(r[0]) for r in got], (time.perf_counter() - start) * 1000


def measure(
    conn: psycopg.Connection[Any],
    table: str,
    base: np.ndarray,
    qs: list[Query],
    passage_qs: list[np.ndarray],
    with_hits: bool,
) -> dict[str, Any]:
    for q in qs[:10]:  # warm
        search(conn, table, q.vector)
    normed = base / np.linalg.norm(base, axis=1, keepdims=True)
    recalls: dict[str, list[float]] = {"questions": [], "passages": []}
    hits = {"identifiers": [0, 0, 0], "questions": [0, 0, 0]}
    ms: list[float] = []
    for q in qs:
        ids, t = search(conn, table, q.vector)
        ms.append(t)
        recalls["questions"].append(len(set(ids) & set(exact_top(normed, q.vector))) / K)
        h = hits[q.set]
        h[0] += ids[:1] == [q.target]
        h[1] += q.target in ids
        h[2] += 1
    for v in passage_qs:
        ids, t = search(conn, table, v)
        ms.append(t)
        recalls["passages"].append(len(set(ids) & set(exact_top(normed, v))) / K)
    ms.sort()
    out: dict[str, Any] = {
        "recall_q": statistics.mean(recalls["questions"]),
        "recall_p": statistics.mean(recalls["passages"]),
        "p50": statistics.median(ms),
        "p95": ms[int(0.95 * (len(ms) - 1))],
    }
    if with_hits:
        for name, (h1, h10, n) in hits.items():
            out[f"{name}_hit1"] = h1 / n
            out[f"{name}_hit10"] = h10 / n
    return out


def scale(
    conn: psycopg.Connection[Any],
    base: np.ndarray,
    rows: list[dict[str, Any]],
    n: int,
    seed: int = 7,
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    extra = n - len(base)
    src = rng.integers(0, len(base), size=extra)
    noisy = base[src] + rng.normal(0, 0.02, size=(extra, base.shape[1])).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    for storage in STORAGES:
        table = f"docs_{storage}"
        conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY {table} (id, content, embedding) FROM STDIN") as copy,
        ):
            for j, (i, v) in enumerate(zip(src, noisy, strict=True)):
                copy.write_row((len(base) + j + 1, rows[int(i) % len(rows)]["content"], v))
        conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")
        index = conn.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_am a ON a.oid = c.relam WHERE i.indrelid = %s::regclass "
            "AND a.amname = 'hnsw'",
            (table,),
        ).fetchone()
        assert index is not None
        start = time.perf_counter()
        conn.execute(f"REINDEX INDEX {index[0]}")
        conn.execute(f"VACUUM ANALYZE {table}")
        print(
            f"  {table}: {extra} copies inserted, HNSW rebuilt in "
            f"{time.perf_counter() - start:.1f} s"
        )
    queued = conn.execute("SELECT count(*) FROM autoembed.jobs").fetchone()
    assert queued is not None and queued[0] == 0, "copies were queued"
    return np.concatenate([base, noisy])


def report(n: int, conn: psycopg.Connection[Any], results: dict[str, dict[str, Any]]) -> None:
    print(f"\n{n:,} rows")
    print(f"{'':<30} {'vector':>12} {'halfvec':>12} {'halfvec/vector':>15}")
    got = {s: sizes(conn, f"docs_{s}") for s in STORAGES}
    for label, i in (("embedding column (MiB)", 0), ("table (MiB)", 1), ("HNSW index (MiB)", 2)):
        v, h = got["vector"][i] / 2**20, got["halfvec"][i] / 2**20
        print(f"{label:<30} {v:>12.2f} {h:>12.2f} {h / v:>15.3f}")
    keys = [("recall@10, questions", "recall_q"), ("recall@10, passages as queries", "recall_p")]
    keys += [
        (f"{s} hit@{k}", f"{s}_hit{k}")
        for s in ("identifiers", "questions")
        for k in (1, 10)
        if f"{s}_hit{k}" in results["vector"]
    ]
    for label, key in keys:
        v, h = results["vector"][key], results["halfvec"][key]
        print(f"{label:<30} {v:>12.3f} {h:>12.3f} {h - v:>+15.3f}")
    for label, key in (("match p50 (ms)", "p50"), ("match p95 (ms)", "p95")):
        v, h = results["vector"][key], results["halfvec"][key]
        print(f"{label:<30} {v:>12.2f} {h:>12.2f} {h / v:>15.2f}")


def bench(url: str, args: argparse.Namespace) -> None:
    rows = corpus()
    assert [r["id"] for r in rows] == list(range(1, len(rows) + 1)), "passage ids are not 1..n"
    base = corpus_vectors(args.reuse_vectors, rows)
    asyncio.run(load(url, rows, base))
    qs = queries()
    emb = Embedder.load(MODEL, device="cpu")
    for q, v in zip(qs, emb.embed([q.text for q in qs]), strict=True):
        q.vector = v
    rng = np.random.default_rng(3)
    passage_qs = [base[i] for i in rng.choice(len(base), PASSAGE_QUERIES, replace=False)]
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        results = {s: measure(conn, f"docs_{s}", base, qs, passage_qs, True) for s in STORAGES}
        report(len(base), conn, results)
        for n in sorted(int(x) for x in args.rows.split(",") if x):
            print(f"\nscaling to {n:,} rows")
            full = scale(conn, base, rows, n)
            results = {s: measure(conn, f"docs_{s}", full, qs, passage_qs, False) for s in STORAGES}
            report(n, conn, results)
            base = full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000", help="larger sizes, comma-separated")
    parser.add_argument("--reuse-vectors", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(
        f"{cores()} cores; model {MODEL}; pgvector HNSW defaults (m 16, ef_construction 64, "
        "ef_search 40)"
    )

    def go(admin: str) -> None:
        url = asyncio.run(fresh_db(admin, "bench_storage"))
        bench(url, args)

    with_server(go)


if __name__ == "__main__":
    main()
