"""Search people use (issue 12): hybrid full text + vector, metadata filters inside the
nearest-neighbour search, the call shapes of LangChain's Supabase stores, row-level security
through every generated function, and halfvec storage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from autoembed.engine import Embedder
from autoembed.watches import watch

from .conftest import DATA, Server
from .helpers import drain, fetch, worker_pool

PASSAGES = [json.loads(line) for line in (DATA / "search-passages.jsonl").read_text().splitlines()]
IDENTIFIERS = json.loads((DATA / "search-identifiers.json").read_text())


async def load_passages(db: Any, **watch_options: Any) -> None:
    await db.execute(
        "CREATE TABLE passages (id bigint PRIMARY KEY, title text, content text, "
        "metadata jsonb NOT NULL DEFAULT '{}')"
    )
    async with (
        db.cursor() as cur,
        cur.copy("COPY passages (id, title, content, metadata) FROM STDIN") as copy,
    ):
        for p in PASSAGES:
            meta = {"source": p["source"], "tenant": "a" if p["id"] % 10 else "b"}
            await copy.write_row((p["id"], p["title"], p["content"], json.dumps(meta)))
    await watch(
        db,
        "passages",
        "content",
        model="all-minilm-l6-v2",
        metadata_column="metadata",
        **watch_options,
    )


async def test_hybrid_finds_exact_identifiers_that_vectors_miss(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await load_passages(db)
    await drain(db_url, minilm)
    vector_first = hybrid_first = rescued = 0
    for item in IDENTIFIERS:
        q = minilm.embed([item["identifier"]])[0]
        vec = await fetch(db, "SELECT id FROM match_passages(%s, -1, 10)", q)
        hyb = await fetch(
            db, "SELECT id, score FROM hybrid_passages(%s, %s, 10)", item["identifier"], q
        )
        v1 = vec[0][0] == item["passage"]
        h1 = hyb[0][0] == item["passage"]
        vector_first += v1
        hybrid_first += h1
        rescued += h1 and not v1
        assert [s for _, s in hyb] == sorted((s for _, s in hyb), reverse=True)
    # measured when these passages were chosen: vector search puts 24 of 40 first
    assert hybrid_first > vector_first
    assert hybrid_first >= 0.9 * len(IDENTIFIERS)
    assert rescued >= 5


async def test_hybrid_weights_and_rrf_k_mean_what_supabase_says(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    """score = full_text_weight / (rrf_k + full-text rank) + semantic_weight / (rrf_k +
    vector rank): each side alone, the weights, and the constant, checked against the two
    sides computed apart."""
    await load_passages(db)
    await drain(db_url, minilm)
    item = IDENTIFIERS[0]
    text, q = item["identifier"], minilm.embed([item["identifier"]])[0]
    semantic = [r[0] for r in await fetch(db, "SELECT id FROM match_passages(%s, -1, 20)", q)]
    text_only = await fetch(
        db, "SELECT id, score FROM hybrid_passages(%s, %s, 20, 1, 0, 50)", text, q
    )
    found = [i for i, score in text_only if score > 0]
    assert found and found[0] == item["passage"]  # the full-text side alone finds it first
    for rank, (_, score) in enumerate(text_only[: len(found)], start=1):
        assert score == pytest.approx(1 / (50 + rank))
    vector_only = await fetch(
        db, "SELECT id, score FROM hybrid_passages(%s, %s, 20, 0, 1, 50)", text, q
    )
    assert [i for i, _ in vector_only] == semantic
    assert vector_only[0][1] == pytest.approx(1 / 51)
    weighted = dict(
        await fetch(db, "SELECT id, score FROM hybrid_passages(%s, %s, 20, 3, 0.5, 10)", text, q)
    )
    for pid, score in weighted.items():
        t = 3 / (10 + found.index(pid) + 1) if pid in found else 0.0
        v = 0.5 / (10 + semantic.index(pid) + 1) if pid in semantic else 0.0
        assert score == pytest.approx(t + v), pid


async def test_migrate_remakes_the_functions_of_existing_watches(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    """An upgrade's fixes to the search functions reach watches made before it."""
    from autoembed.migrate import migrate

    await load_passages(db)
    await drain(db_url, minilm)
    await db.execute(
        "CREATE OR REPLACE FUNCTION match_passages(query_embedding vector, "
        "match_threshold double precision DEFAULT -1, match_count integer DEFAULT NULL, "
        "filter jsonb DEFAULT '{}') RETURNS TABLE (id bigint, content text, metadata jsonb, "
        "similarity double precision) LANGUAGE sql "
        "AS 'SELECT NULL::bigint, NULL::text, NULL::jsonb, NULL::float8 WHERE false'"
    )
    q = minilm.embed(["how do I back up a database"])[0]
    assert await fetch(db, "SELECT id FROM match_passages(%s, -1, 3)", q) == []
    report = await migrate(db_url)
    assert report.refreshed == ["passages"] and report.not_refreshed == []
    assert len(await fetch(db, "SELECT id FROM match_passages(%s, -1, 3)", q)) == 3


async def test_filters_inside_the_nearest_neighbour_search(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await load_passages(db, index="now")
    await drain(db_url, minilm)
    q = minilm.embed(["how do I back up a database"])[0]
    rare = {"tenant": "b"}  # about one row in ten
    expected = await fetch(
        db, "SELECT count(*) FROM passages WHERE metadata @> %s", json.dumps(rare)
    )
    assert 5 < expected[0][0] < 30
    # the HNSW index, with a candidate list that the filter would empty without the
    # iterative scan the functions turn on (the planner would pick the GIN index here)
    await db.execute("SET hnsw.ef_search = 10")
    await db.execute("SET enable_seqscan = off")
    await db.execute("SET enable_bitmapscan = off")
    rows = await fetch(
        db, "SELECT id, metadata FROM match_passages(%s, -1, 5, %s)", q, json.dumps(rare)
    )
    assert len(rows) == 5 and all(r[1]["tenant"] == "b" for r in rows)
    everything = await fetch(
        db,
        "SELECT id, metadata FROM match_passages(%s, match_count => %s, filter => %s)",
        q,
        expected[0][0],
        json.dumps(rare),
    )
    assert len(everything) == expected[0][0]  # every match, though ef_search is 10
    hybrid = await fetch(
        db,
        "SELECT id, metadata FROM hybrid_passages(%s, %s, 5, filter => %s)",
        "backup",
        q,
        json.dumps(rare),
    )
    assert hybrid and all(r[1]["tenant"] == "b" for r in hybrid)
    # the plan: an HNSW scan with the filter applied inside it
    await db.execute("SET hnsw.iterative_scan = relaxed_order")
    plan = await fetch(
        db,
        "EXPLAIN (FORMAT JSON) SELECT id FROM passages WHERE metadata @> %s "
        "ORDER BY embedding <=> %s LIMIT 5",
        json.dumps(rare),
        q,
    )
    assert "hnsw" in json.dumps(plan).lower()


async def test_the_frameworks_call_shapes(db: Any, db_url: str, minilm: Embedder) -> None:
    """As PostgREST runs them for supabase.rpc('match_passages', {...}): named arguments."""
    await load_passages(db)
    await drain(db_url, minilm)
    q = minilm.embed(["replication slots"])[0]
    # Supabase's guide: (query_embedding, match_threshold, match_count)
    supabase = await fetch(
        db,
        "SELECT id, content, similarity FROM match_passages(query_embedding => %s, "
        "match_threshold => %s, match_count => %s)",
        q,
        0.3,
        5,
    )
    # LangChain (Python): rpc(query_name, {query_embedding, filter}) with limit=k
    langchain_py = await fetch(
        db,
        "SELECT id, content, metadata, similarity FROM match_passages("
        "query_embedding => %s, filter => %s) LIMIT 5",
        q,
        json.dumps({}),
    )
    # LangChain (JS): rpc(queryName, {query_embedding, match_count, filter})
    langchain_js = await fetch(
        db,
        "SELECT id, content, metadata, similarity FROM match_passages("
        "query_embedding => %s, match_count => %s, filter => %s)",
        q,
        5,
        json.dumps({}),
    )
    assert [r[0] for r in langchain_py] == [r[0] for r in langchain_js]
    assert [r[0] for r in supabase] == [r[0] for r in langchain_js][: len(supabase)]
    assert all(isinstance(r[2], dict) for r in langchain_js)
    sims = [r[3] for r in langchain_js]
    assert sims == sorted(sims, reverse=True) and 0 < sims[0] <= 1


async def test_row_level_security_through_every_function(
    server: Server, db: Any, db_url: str, minilm: Embedder
) -> None:
    await load_passages(db)
    await drain(db_url, minilm)
    await db.execute("ALTER TABLE passages ENABLE ROW LEVEL SECURITY")
    await db.execute("CREATE POLICY tenant_b ON passages USING (metadata->>'tenant' = 'b')")
    await db.execute("DROP ROLE IF EXISTS reader_b")
    await db.execute("CREATE ROLE reader_b LOGIN")
    await db.execute("GRANT SELECT ON passages TO reader_b")
    q = minilm.embed(["backup"])[0]
    async with await psycopg.AsyncConnection.connect(
        server.dsn(db.info.dbname, user="reader_b"), autocommit=True
    ) as reader:
        from pgvector.psycopg import register_vector_async

        await register_vector_async(reader)
        for statement, args in (
            ("SELECT metadata FROM match_passages(%s, -1, 50)", (q,)),
            ("SELECT metadata FROM hybrid_passages(%s, %s, 50)", ("backup", q)),
        ):
            rows = await fetch(reader, statement, *args)
            assert rows and all(r[0]["tenant"] == "b" for r in rows), statement


async def test_halfvec_storage(db: Any, db_url: str, minilm: Embedder) -> None:
    await load_passages(db, storage="halfvec", index="now")
    await drain(db_url, minilm)
    typ = await fetch(
        db,
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = 'passages'::regclass AND attname = 'embedding'",
    )
    assert typ == [("halfvec(384)",)]
    item = IDENTIFIERS[0]
    q = minilm.embed([PASSAGES[3]["content"]])[0]
    hits = await fetch(db, "SELECT id, similarity FROM match_passages(%s, -1, 3)", q)
    assert hits[0][0] == PASSAGES[3]["id"] and hits[0][1] > 0.999
    assert (
        await fetch(db, "SELECT count(*) FROM hybrid_passages(%s, %s, 5)", item["identifier"], q)
    )[0][0] > 0


async def test_search_command(db: Any, db_url: str, minilm: Embedder, tmp_path: Path) -> None:
    import asyncio
    import subprocess

    from .conftest import AUTOEMBED, ROOT, url_of, worker_env

    await load_passages(db)
    await drain(db_url, minilm)
    item = IDENTIFIERS[0]

    def run(*args: str) -> Any:
        done = subprocess.run(
            [*AUTOEMBED, "search", "passages", *args],
            env=worker_env(db_url),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    hybrid = await asyncio.to_thread(run, item["identifier"], "--hybrid", "--json", "--limit", "3")
    assert hybrid[0]["id"] == item["passage"] and "score" in hybrid[0] and "metadata" in hybrid[0]
    filtered = await asyncio.to_thread(
        run, "backups", "--filter", '{"tenant": "b"}', "--json", "--limit", "4"
    )
    assert len(filtered) == 4 and all(r["metadata"]["tenant"] == "b" for r in filtered)
    assert url_of(db_url)
    np.testing.assert_equal(len(filtered), 4)


@pytest.mark.parametrize("bad", ['{"tenant": ', "[1, 2]"])
async def test_search_command_refuses_a_bad_filter(db: Any, db_url: str, bad: str) -> None:
    import asyncio
    import subprocess

    from .conftest import AUTOEMBED, ROOT, worker_env

    await db.execute("CREATE TABLE t (id int PRIMARY KEY, content text)")
    await watch(db, "t", "content", model="all-minilm-l6-v2")
    done = await asyncio.to_thread(
        subprocess.run,
        [*AUTOEMBED, "search", "t", "x", "--filter", bad],
        env=worker_env(db_url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and "--filter" in done.stderr


async def test_search_over_http(db: Any, db_url: str, minilm: Embedder) -> None:
    from autoembed.http import create_app

    from .test_http import AUTH, JSON, make_settings, running

    await load_passages(db)
    await drain(db_url, minilm)
    item = IDENTIFIERS[0]
    # the pool as the worker's and the API server's: a pinned search_path, so the table is
    # found without one
    async with worker_pool(db_url, max_size=2) as pool:
        app = create_app(make_settings(database_url=db_url), minilm, pool=pool)
        async with running(app) as api:
            headers = {**AUTH, **JSON}
            r = await api.client.post(
                "/search",
                json={"table": "passages", "query": item["identifier"], "hybrid": True, "limit": 3},
                headers=headers,
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == "all-minilm-l6-v2"
            assert body["results"][0]["id"] == item["passage"] and "score" in body["results"][0]
            r = await api.client.post(
                "/search",
                json={
                    "table": "public.passages",
                    "query": "backups",
                    "filter": {"tenant": "b"},
                    "limit": 4,
                },
                headers=headers,
            )
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            assert len(results) == 4 and all(x["metadata"]["tenant"] == "b" for x in results)
            for bad, param in (
                ({"table": "passages"}, "query"),
                ({"table": "passages", "query": "x", "limit": 0}, "limit"),
                ({"table": "passages", "query": "x", "filter": [1]}, "filter"),
            ):
                r = await api.client.post("/search", json=bad, headers=headers)
                assert r.status_code == 422 and r.json()["error"]["param"] == param
            r = await api.client.post(
                "/search", json={"table": "nowhere", "query": "x"}, headers=headers
            )
            assert r.status_code == 404
            r = await api.client.post(
                "/search", json={"table": "passages", "query": "x"}, headers=JSON
            )
            assert r.status_code == 401  # the same auth as every other route
