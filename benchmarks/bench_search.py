"""Search quality and latency of a watch's functions, on an embedded PostgreSQL (or
$DATABASE_URL's server).

    python benchmarks/bench_search.py [--rows 20000,50000,100000] [--reuse-vectors]
    python benchmarks/bench_search.py --write-identifiers   # remakes questions/identifiers.jsonl

1. The 5,933 pgdocs passages go into a table with a jsonb metadata column
   ({"source": ..., "tenant": id % 100}), watched with all-minilm-l6-v2, and a Worker
   drains the queue (several minutes on 2 cores; ``--reuse-vectors`` loads the vectors the
   last run saved in .bench/search/ instead).
2. Quality, on the 5,933 rows: hit@1, hit@10 and MRR@10 of vector search (match_<table>),
   full text alone (hybrid_<table> with semantic_weight 0, counting only rows the full
   text side found, and plain websearch_to_tsquery + ts_rank_cd), and hybrid, for two sets
   in benchmarks/questions/: identifiers.jsonl (a bare identifier that occurs in exactly one
   passage) and questions.jsonl (natural-language questions written by reading passages).
3. Latency p50/p95 of each function (SQL round trip from a client on the same machine; the
   query's embedding is made beforehand and not counted) on the 5,933 rows and on the
   ``--rows`` sizes (synthetic copies: the same vectors and text plus a suffix, inserted
   with triggers off, then the HNSW index rebuilt), without a filter and with a filter that
   1% of the rows pass ({"tenant": k}). Beside them: the nearest-neighbour query written
   directly in SQL ("vector (sql)", for reference), the recall@10 of both against an exact
   search (numpy), and the scans each function's statement ran (auto_explain).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import logging
import random
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoembed.db import connect
from autoembed.engine import Embedder
from autoembed.runner import Worker
from autoembed.watches import watch

from benchmarks.bench_worker import fresh_db, settings
from benchmarks.common import CORPUS, ROOT, cores, with_server

MODEL = "all-minilm-l6-v2"
QUESTIONS = ROOT / "benchmarks" / "questions"
CACHE = ROOT / ".bench" / "search"
TENANTS = 100  # metadata tenant = id % 100: one tenant is 1% of the rows
K = 10
WARM = 10  # queries run before each timed pass

# what each method runs; %(f)s is the metadata filter ('{}' for none)
METHODS: dict[str, str] = {
    "vector": "SELECT id, similarity FROM match_docs(%(e)s, -1, 10, %(f)s::jsonb)",
    "fts (hybrid sw=0)": (
        "SELECT id, score FROM hybrid_docs(%(t)s, %(e)s, 10, 1, 0, 50, %(f)s::jsonb)"
    ),
    "fts (sql)": (
        "SELECT d.id, ts_rank_cd(to_tsvector('english'::regconfig, d.content), q.tsq) "
        "FROM docs d, websearch_to_tsquery('english'::regconfig, %(t)s) AS q(tsq) "
        "WHERE to_tsvector('english'::regconfig, d.content) @@ q.tsq "
        "AND d.metadata @> %(f)s::jsonb ORDER BY 2 DESC, 1 LIMIT 10"
    ),
    "hybrid": "SELECT id, score FROM hybrid_docs(%(t)s, %(e)s, 10, 1, 1, 50, %(f)s::jsonb)",
    # for reference: the nearest-neighbour query written directly (no threshold, and no
    # metadata clause at all when there is no filter), with hnsw.iterative_scan set
    "vector (sql)": (
        "SELECT id, 1 - (embedding <=> %(e)s) FROM docs {where} ORDER BY embedding <=> %(e)s "
        "LIMIT 10"
    ),
}
VECTOR = ("vector", "vector (sql)")


@dataclass
class Query:
    set: str
    text: str
    target: int
    vector: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.float32))


def corpus() -> list[dict[str, Any]]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def queries() -> list[Query]:
    out = [
        Query("identifiers", r["identifier"], int(r["passage_id"]))
        for r in read_jsonl(QUESTIONS / "identifiers.jsonl")
    ]
    out += [
        Query("questions", r["question"], int(r["passage_id"]))
        for r in read_jsonl(QUESTIONS / "questions.jsonl")
    ]
    return out


# ---------------------------------------------------------------------- identifier set

IDENT = re.compile(
    r"(?<![A-Za-z0-9_.])([A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+|PQ[a-z][A-Za-z]+)(?![A-Za-z0-9_])"
)


def write_identifiers(admin: str, per_kind: int = 20, seed: int = 12) -> None:
    """Identifiers (with an underscore, or libpq's PQxxx) that occur, as a whole word and
    in any letter case, in exactly one passage, and that the server knows as a setting, a
    function, a catalog table or view; libpq's are taken by their prefix. ``per_kind`` of
    each kind, drawn with a fixed seed."""
    rows = corpus()
    where: dict[str, set[int]] = defaultdict(set)
    folded: dict[str, set[int]] = defaultdict(set)
    for r in rows:
        for m in IDENT.findall(r["content"]):
            where[m].add(r["id"])
            folded[m.lower()].add(r["id"])
    unique = sorted(
        k for k, v in where.items() if len(v) == 1 and len(k) >= 8 and len(folded[k.lower()]) == 1
    )
    with psycopg.connect(admin) as conn:
        gucs = {r[0] for r in conn.execute("SELECT name FROM pg_settings")}
        procs = {r[0] for r in conn.execute("SELECT proname FROM pg_proc")}
        rels = {
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname IN ('pg_catalog', 'information_schema')"
            )
        }
    kinds: dict[str, list[str]] = defaultdict(list)
    for k in unique:
        if k in gucs:
            kinds["setting"].append(k)
        elif k in procs:
            kinds["function"].append(k)
        elif k in rels:
            kinds["catalog"].append(k)
        elif k.startswith("PQ"):
            kinds["libpq"].append(k)
    rng = random.Random(seed)
    n = 0
    path = QUESTIONS / "identifiers.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for kind in ("setting", "function", "catalog", "libpq"):
            for ident in sorted(rng.sample(kinds[kind], per_kind)):
                n += 1
                pid = next(iter(where[ident]))
                f.write(
                    json.dumps({"id": n, "identifier": ident, "kind": kind, "passage_id": pid})
                    + "\n"
                )
    print(
        f"{n} identifiers written to {path.relative_to(ROOT)} (candidates: "
        + ", ".join(f"{k} {len(v)}" for k, v in kinds.items())
        + ")"
    )


# ---------------------------------------------------------------------- set-up


async def load_table(url: str, rows: list[dict[str, Any]], vectors: np.ndarray | None) -> None:
    async with await connect(url) as conn:
        await conn.execute(
            "CREATE TABLE docs (id bigint PRIMARY KEY, source text, title text, section text, "
            "content text, metadata jsonb NOT NULL DEFAULT '{}', embedding vector(384))"
        )
        cols = "id, source, title, section, content, metadata" + (
            ", embedding" if vectors is not None else ""
        )
        async with conn.cursor() as cur, cur.copy(f"COPY docs ({cols}) FROM STDIN") as copy:
            for i, r in enumerate(rows):
                meta = json.dumps({"source": r["source"], "tenant": r["id"] % TENANTS})
                values: list[Any] = [r["id"], r["source"], r["title"], r["section"]]
                values += [r["content"], meta]
                if vectors is not None:
                    values.append(vectors[i])
                await copy.write_row(values)
        # the rows are there first: watch() queues them (backfill; none when the vectors
        # were loaded) and builds the HNSW, full-text and metadata indexes now
        await watch(conn, "docs", "content", model=MODEL, metadata_column="metadata", index="now")


def vec(value: Any) -> Any:
    """A vector as the driver returns it (pgvector's Vector, or already an array)."""
    return value.to_numpy() if hasattr(value, "to_numpy") else value


def fetch_vectors(conn: psycopg.Connection[Any], n: int) -> np.ndarray:
    got = conn.execute("SELECT id, embedding FROM docs WHERE id <= %s ORDER BY id", (n,)).fetchall()
    assert [r[0] for r in got] == list(range(1, n + 1)), "passage ids are not 1..n"
    assert all(r[1] is not None for r in got), "a passage has no vector after the drain"
    return np.stack([np.asarray(vec(r[1]), dtype=np.float32) for r in got])


def indexes(conn: psycopg.Connection[Any]) -> list[str]:
    return [
        f"{r[0]} ({r[1]})"
        for r in conn.execute(
            "SELECT c.relname, am.amname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_am am ON am.oid = c.relam WHERE i.indrelid = 'docs'::regclass ORDER BY 1"
        )
    ]


def scale_up(conn: psycopg.Connection[Any], base: int, have: int, total: int) -> None:
    """Copies of the passages (same vector, text plus a suffix) from ``have`` up to ``total``
    rows (copy n is row base + n, of passage (n - 1) % base + 1), with
    triggers off (session_replication_role = replica: nothing is queued); the HNSW index is
    dropped first and built again afterwards, as the watch would build it."""
    jobs_before = conn.execute("SELECT count(*) FROM autoembed.jobs").fetchone()
    hnsw = conn.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_am am ON am.oid = c.relam WHERE i.indrelid = 'docs'::regclass "
        "AND am.amname = 'hnsw'"
    ).fetchone()
    assert hnsw is not None
    conn.execute(f'DROP INDEX "{hnsw[0]}"')
    start = time.perf_counter()
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(
            "INSERT INTO docs (id, source, title, section, content, metadata, embedding) "
            "SELECT %(base)s + g.n, d.source, d.title, d.section, "
            "       d.content || ' (copy ' || g.n || ')', "
            "       jsonb_build_object('source', d.source, 'tenant', (%(base)s + g.n) %% %(t)s), "
            "       d.embedding "
            "  FROM generate_series(%(first)s::int, %(last)s::int) AS g(n) "
            "  JOIN docs d ON d.id = (g.n - 1) %% %(base)s + 1",
            {"base": base, "first": have - base + 1, "last": total - base, "t": TENANTS},
        )
    inserted = time.perf_counter() - start
    jobs_after = conn.execute("SELECT count(*) FROM autoembed.jobs").fetchone()
    wid = conn.execute(
        "SELECT id FROM autoembed.watches WHERE source = 'docs'::regclass"
    ).fetchone()
    assert wid is not None
    statement = conn.execute("SELECT autoembed.index_sql(%s, false)", wid).fetchone()
    assert statement is not None and statement[0]
    conn.execute(
        "SELECT set_config('maintenance_work_mem', '1GB', false), "
        "set_config('max_parallel_maintenance_workers', "
        "least(current_setting('max_parallel_workers')::int, 8)::text, false)"
    )
    start = time.perf_counter()
    conn.execute(statement[0])
    built = time.perf_counter() - start
    conn.execute("VACUUM ANALYZE docs")
    count = conn.execute("SELECT count(*) FROM docs").fetchone()
    print(
        f"scaled to {count[0] if count else '?'} rows: INSERT ... SELECT of {total - have} copies "
        f"{inserted:.1f} s (triggers off; jobs queued before/after: "
        f"{jobs_before[0] if jobs_before else '?'}/{jobs_after[0] if jobs_after else '?'}); "
        f"HNSW index rebuilt in {built:.1f} s ({statement[0]})"
    )


# ---------------------------------------------------------------------- measuring


def run(conn: psycopg.Connection[Any], method: str, q: Query, filt: str) -> list[int]:
    params = {"e": q.vector, "t": q.text, "f": filt}
    statement = METHODS[method]
    if method == "vector (sql)":
        statement = statement.format(where="" if filt == "{}" else "WHERE metadata @> %(f)s")
    rows = conn.execute(statement, params, prepare=True).fetchall()
    if method == "fts (hybrid sw=0)":
        # semantic_weight 0: rows only the vector side found come last with score 0
        return [int(r[0]) for r in rows if r[1] > 0]
    return [int(r[0]) for r in rows]


def quality(conn: psycopg.Connection[Any], qs: list[Query]) -> None:
    print(
        "\nquality on the 5,933 passages (hit@k: the expected passage among the first k; "
        "MRR@10; 'no rows': queries the method returned nothing for)"
    )
    head = f"{'hit@1':>6} {'hit@10':>7} {'MRR@10':>7} {'no rows':>8}"
    print(f"{'set':<12} {'n':>3}  {'method':<18} {head}")
    for name in ("identifiers", "questions"):
        subset = [q for q in qs if q.set == name]
        for method in METHODS:
            h1 = h10 = empty = 0
            rr = 0.0
            for q in subset:
                ids = run(conn, method, q, "{}")
                empty += not ids
                if ids[:1] == [q.target]:
                    h1 += 1
                if q.target in ids[:K]:
                    h10 += 1
                    rr += 1 / (ids.index(q.target) + 1)
            n = len(subset)
            print(
                f"{name:<12} {n:>3}  {method:<18} {h1 / n:>6.3f} {h10 / n:>7.3f} "
                f"{rr / n:>7.3f} {empty:>8}"
            )


def quantiles(ms: Sequence[float]) -> tuple[float, float]:
    return statistics.median(ms), statistics.quantiles(ms, n=20)[18]


def exact_top(
    base: np.ndarray, n_rows: int, qv: np.ndarray, tenant: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine distances of the rows 1..n_rows (copies share their original's vector)
    to one query, and the ids that pass the filter."""
    ids = np.arange(1, n_rows + 1)
    src = np.where(ids <= len(base), ids, (ids - len(base) - 1) % len(base) + 1)
    if tenant is not None:
        keep = ids % TENANTS == tenant
        ids, src = ids[keep], src[keep]
    dist = (1.0 - base @ qv)[src - 1]
    return ids, dist


def recall(base: np.ndarray, n_rows: int, q: Query, tenant: int | None, got: list[int]) -> float:
    """Share of the k nearest (ties by distance count as equal) that ``got`` holds."""
    ids, dist = exact_top(base, n_rows, q.vector, tenant)
    kth = np.partition(dist, K - 1)[K - 1]
    ok = set(ids[dist <= kth + 1e-6].tolist())
    return sum(1 for i in got[:K] if i in ok) / K


def latency(
    conn: psycopg.Connection[Any], qs: list[Query], n_rows: int, base: np.ndarray
) -> list[str]:
    conn.execute("SET hnsw.iterative_scan = relaxed_order")  # for "vector (sql)"
    lines = []
    for filtered in (False, True):
        cells = []
        extra: list[str] = []
        for method in METHODS:
            ms: list[float] = []
            counts: list[int] = []
            recalls: list[float] = []
            for i, q in enumerate(qs[:WARM]):  # warm: plans, pages
                run(conn, method, q, json.dumps({"tenant": i % TENANTS}) if filtered else "{}")
            for i, q in enumerate(qs):
                tenant = i % TENANTS if filtered else None
                filt = json.dumps({"tenant": tenant}) if filtered else "{}"
                t0 = time.perf_counter()
                ids = run(conn, method, q, filt)
                ms.append((time.perf_counter() - t0) * 1000)
                counts.append(len(ids))
                if method in VECTOR:
                    recalls.append(recall(base, n_rows, q, tenant, ids))
            p50, p95 = quantiles(ms)
            cells.append(f"{p50:7.1f} / {p95:7.1f}")
            if method in VECTOR:
                extra.append(f"{statistics.mean(recalls):.3f} (min rows {min(counts)})")
        label = "tenant (1%)" if filtered else "none"
        lines.append(f"{n_rows:>7,}  {label:<11}  " + "  ".join(cells) + "   " + " / ".join(extra))
    return lines


SCAN = re.compile(
    r"(?:Parallel )?(?:Seq Scan|Index Scan|Index Only Scan|Bitmap Heap Scan|Bitmap Index Scan)"
    r"(?: Backward)?(?: using \S+)? on \S+"
)


def plans(conn: psycopg.Connection[Any], q: Query, n_rows: int) -> None:
    """The scans the search functions' own statements ran (auto_explain of the nested
    statements, sent to this client), without and with the filter."""
    notices: list[str] = []

    def keep(d: psycopg.errors.Diagnostic) -> None:
        notices.append(d.message_primary or "")

    try:
        conn.execute("LOAD 'auto_explain'")
    except psycopg.Error as exc:
        print(f"  (plans not shown: {exc})")
        return
    conn.add_notice_handler(keep)
    conn.execute(
        "SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on; "
        "SET client_min_messages = log"
    )
    try:
        for filt in ("{}", json.dumps({"tenant": 7})):
            for method in ("vector", "vector (sql)", "hybrid", "fts (sql)"):
                notices.clear()
                run(conn, method, q, filt)
                scans: list[str] = []
                for n in notices:
                    for m in SCAN.findall(n):
                        if "pg_attribute" not in m and m not in scans:
                            scans.append(m)
                print(
                    f"  plan at {n_rows:,} rows, {method:<9} filter {filt:<15} {' | '.join(scans)}"
                )
    finally:
        conn.execute("SET client_min_messages = notice; SET auto_explain.log_min_duration = -1")
        conn.remove_notice_handler(keep)


def report_latency_header() -> None:
    print(
        "\nlatency, ms p50 / p95 (one client on the same machine; SQL round trip only, the "
        "query embedding is made beforehand; each query timed once, after 10 warm-up queries)"
    )
    head = "  ".join(f"{m:>17}" for m in METHODS)
    print(f"{'rows':>7}  {'filter':<11}  {head}   recall@10 vs exact: vector / vector (sql)")


# ---------------------------------------------------------------------- main


async def setup_and_drain(url: str, rows: list[dict[str, Any]], reuse: bool) -> None:
    cached = CACHE / f"pgdocs-{MODEL}.npy"
    vectors = np.load(cached) if reuse and cached.is_file() else None
    if reuse and vectors is None:
        print(f"no saved vectors at {cached}: draining")
    await load_table(url, rows, vectors)
    if vectors is not None:
        print(f"vectors loaded from {cached.relative_to(ROOT)} (no drain this run)")
        return
    emb = Embedder.load(MODEL, device="cpu")
    worker = Worker(settings(url), drain=True, progress=False, embedder_factory=lambda _n: emb)
    start = time.perf_counter()
    await worker.run()
    secs = time.perf_counter() - start
    print(
        f"drain: {len(rows)} passages embedded and written by a Worker in {secs:.1f} s "
        f"({len(rows) / secs:.1f} rows/s; HNSW, full-text and metadata indexes in place)"
    )


def bench(url: str, args: argparse.Namespace) -> None:
    rows = corpus()
    asyncio.run(setup_and_drain(url, rows, args.reuse_vectors))
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        base = fetch_vectors(conn, len(rows))
        conn.execute("VACUUM ANALYZE docs")  # as autovacuum would have by now
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(CACHE / f"pgdocs-{MODEL}.npy", base)  # for --reuse-vectors
    qs = queries()
    emb = Embedder.load(MODEL, device="cpu")
    texts = [q.text for q in qs]
    emb.embed(texts[:8])
    t0 = time.perf_counter()
    for q, v in zip(qs, emb.embed(texts), strict=True):
        q.vector = v
    one: list[float] = []
    for t in texts[:40]:
        s = time.perf_counter()
        emb.embed([t])
        one.append((time.perf_counter() - s) * 1000)
    print(
        f"{len(qs)} queries embedded in {time.perf_counter() - t0:.2f} s; one query text alone: "
        f"p50 {statistics.median(one):.1f} ms (not in the latencies below)"
    )
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        print("indexes: " + ", ".join(indexes(conn)))
        quality(conn, qs)
        plans(conn, qs[0], len(rows))
        lines = latency(conn, qs, len(rows), base)
        have = len(rows)
        for size in sorted(int(x) for x in args.rows.split(",")):
            if size <= have:
                continue
            scale_up(conn, len(rows), have, size)
            have = size
            plans(conn, qs[0], size)
            lines += latency(conn, qs, size, base)
        report_latency_header()
        for line in lines:
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", default="20000,50000,100000", help="the larger sizes, comma-separated"
    )
    parser.add_argument(
        "--reuse-vectors", action="store_true", help="load the last run's vectors, no drain"
    )
    parser.add_argument("--write-identifiers", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.write_identifiers:
        with_server(write_identifiers)
        return
    print(f"{cores()} cores; model {MODEL}; pgvector HNSW defaults (ef_search 40)")

    def go(admin: str) -> None:
        url = asyncio.run(fresh_db(admin, "bench_search"))
        bench(url, args)

    with_server(go)


if __name__ == "__main__":
    main()
