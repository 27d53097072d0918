"""Schema changes never break the application's writes and never lose a row (issue 10).

Each test changes a watched table the way an application's migrations do (renames, dropped
and retyped columns, a retyped key, a dropped table) or gives the worker rows it cannot
write, against the real server and the real model, and checks three things: the
application's statements still succeed, no queued row is lost, and whatever autoembed
cannot serve any more is said loudly (the status view's ``problem``, a WARNING, exit code 3
of ``run --drain``) instead of failing somebody's write.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
import pytest
from autoembed.db import connect, fetch_dicts
from autoembed.engine import Embedder
from autoembed.errors import WatchError
from autoembed.runner import EXIT_UNSERVED, Worker
from autoembed.watches import watch

from .conftest import AUTOEMBED, ROOT, worker_env
from .helpers import assert_matches, drain, fetch, settings

MODEL = "all-minilm-l6-v2"


# ---------------------------------------------------------------------------- helpers


async def make_docs(
    conn: psycopg.AsyncConnection[Any], table: str = "docs", key: str = "bigint"
) -> None:
    await conn.execute(f"CREATE TABLE {table} (id {key} PRIMARY KEY, content text, title text)")


async def watch_docs(
    conn: psycopg.AsyncConnection[Any], table: str = "docs", column: str = "content", **kw: Any
) -> int:
    info = await watch(conn, table, column, model=MODEL, **kw)
    return int(info["id"])


async def embeddings(
    conn: psycopg.AsyncConnection[Any], table: str = "docs", column: str = "embedding"
) -> dict[Any, Any]:
    rows = await fetch(conn, f"SELECT id, {column} FROM {table}")
    return {r[0]: None if r[1] is None else np.asarray(r[1].to_numpy()) for r in rows}


async def status(conn: psycopg.AsyncConnection[Any], watch_id: int) -> dict[str, Any]:
    rows = await fetch_dicts(
        conn, "SELECT * FROM autoembed.status WHERE watch_id = %s AND lane = 'embed'", (watch_id,)
    )
    assert len(rows) == 1, rows
    return dict(rows[0])


async def jobs(
    conn: psycopg.AsyncConnection[Any], watch_id: int | None = None
) -> list[tuple[Any, ...]]:
    """(pk, status, attempts) of the queued jobs, by key."""
    return await fetch(
        conn,
        "SELECT pk, status, attempts FROM autoembed.jobs "
        "WHERE %s::integer IS NULL OR watch_id = %s ORDER BY pk",
        watch_id,
        watch_id,
    )


async def watch_functions(conn: psycopg.AsyncConnection[Any], watch_id: int) -> list[str]:
    """The functions autoembed made for a watch (its accessors and search function), by
    signature, while they exist."""
    rows = await fetch(
        conn,
        "SELECT f::text FROM autoembed.watches w, unnest(w.functions) AS f WHERE w.id = %s",
        watch_id,
    )
    names = [r[0] for r in rows]
    for what in ("read", "write", "keys", "swap"):
        assert any(n.startswith(f"autoembed.w{watch_id}_{what}(") for n in names), names
    assert any(n.startswith("match_") for n in names), names
    return names


async def existing(conn: psycopg.AsyncConnection[Any], signatures: list[str]) -> list[str]:
    rows = await fetch(
        conn,
        "SELECT s FROM unnest(%s::text[]) AS s WHERE to_regprocedure(s) IS NOT NULL",
        signatures,
    )
    return [r[0] for r in rows]


async def drain_code(db_url: str, embedder: Any, **overrides: Any) -> tuple[int, Worker]:
    """``run --drain`` in-process, returning its exit code (``helpers.drain`` insists on 0)."""
    worker = Worker(
        settings(db_url, **overrides),
        drain=True,
        progress=False,
        embedder_factory=lambda _name: embedder,
    )
    code = await asyncio.wait_for(worker.run(), 120)
    return code, worker


@contextmanager
def warnings_of(conn: psycopg.AsyncConnection[Any]) -> Iterator[list[str]]:
    """The WARNINGs the server sends this connection meanwhile."""
    seen: list[str] = []

    def handler(diag: psycopg.errors.Diagnostic) -> None:
        if diag.severity_nonlocalized == "WARNING":
            seen.append(diag.message_primary or "")

    conn.add_notice_handler(handler)
    try:
        yield seen
    finally:
        conn.remove_notice_handler(handler)


async def search(
    conn: psycopg.AsyncConnection[Any], embedder: Embedder, fn: str, text: str
) -> list[tuple[Any, ...]]:
    query = embedder.embed([text])[0]
    return await fetch(conn, f"SELECT id, content FROM {fn}(%s, -1, 10)", query)


# ---------------------------------------------------------------------------- renames


async def test_renamed_text_column_and_table_are_followed(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_docs(db)
    await db.execute(
        "INSERT INTO docs (id, content) VALUES (1, 'cats purr on warm windowsills'), "
        "(2, 'dogs bark at the mail carrier')"
    )
    wid = await watch_docs(db)
    await drain(db_url, minilm)

    with warnings_of(db) as warned:
        await db.execute("ALTER TABLE docs RENAME COLUMN content TO body")
        # the application's writes under the new name: new and changed rows are queued,
        # a change of another column is not
        await db.execute("INSERT INTO docs (id, body) VALUES (3, 'stock markets fell sharply')")
        await db.execute("UPDATE docs SET body = 'kittens sleep all afternoon' WHERE id = 1")
        await db.execute("UPDATE docs SET title = 'unrelated' WHERE id = 2")
        assert await jobs(db) == [("1", "pending", 0), ("3", "pending", 0)]
        await drain(db_url, minilm)
    assert warned == []
    vecs = await embeddings(db)
    assert_matches(minilm, "kittens sleep all afternoon", vecs[1])
    assert_matches(minilm, "dogs bark at the mail carrier", vecs[2])
    assert_matches(minilm, "stock markets fell sharply", vecs[3])
    # the search function was made again for the new column name
    found = await search(db, minilm, "match_docs", "a sleepy cat")
    assert found[0] == (1, "kittens sleep all afternoon") and len(found) == 3
    st = await status(db, wid)
    assert st["problem"] is None and st["content_column"] == "body"
    # watching the new name is the same watch, with nothing to do
    info = await watch(db, "docs", "body", model=MODEL)
    assert info["id"] == wid and info["queued"] == 0

    # and the table renamed too
    with warnings_of(db) as warned:
        await db.execute("ALTER TABLE docs RENAME TO articles")
        await db.execute("INSERT INTO articles (id, body) VALUES (4, 'rain is expected tomorrow')")
        await db.execute("UPDATE articles SET body = 'puppies chase the postman' WHERE id = 2")
        await db.execute("UPDATE articles SET title = 'still unrelated' WHERE id = 3")
        assert await jobs(db) == [("2", "pending", 0), ("4", "pending", 0)]
        await drain(db_url, minilm)
    assert warned == []
    vecs = await embeddings(db, "articles")
    assert_matches(minilm, "puppies chase the postman", vecs[2])
    assert_matches(minilm, "rain is expected tomorrow", vecs[4])
    found = await search(db, minilm, "match_docs", "weather forecast: showers")
    assert found[0] == (4, "rain is expected tomorrow") and len(found) == 4
    st = await status(db, wid)
    assert (st["source"], st["problem"]) == ("articles", None)
    info = await watch(db, "articles", "body", model=MODEL)
    assert info["id"] == wid and info["queued"] == 0


async def test_table_moved_to_another_schema_is_followed(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_docs(db)
    await db.execute("INSERT INTO docs (id, content) VALUES (1, 'cats purr on warm windowsills')")
    wid = await watch_docs(db)
    await drain(db_url, minilm)
    await db.execute("CREATE SCHEMA archive")
    with warnings_of(db) as warned:
        await db.execute("ALTER TABLE docs SET SCHEMA archive")
        await db.execute("INSERT INTO archive.docs (id, content) VALUES (2, 'dogs bark at night')")
        await drain(db_url, minilm)
    assert warned == []
    assert_matches(minilm, "dogs bark at night", (await embeddings(db, "archive.docs"))[2])
    found = await search(db, minilm, "archive.match_docs", "a barking dog")
    assert found[0] == (2, "dogs bark at night")
    # the search function made for the table where it was went with it: none is left
    # behind that reads a table no longer there
    where = await fetch(
        db, "SELECT pronamespace::regnamespace::text FROM pg_proc WHERE proname = 'match_docs'"
    )
    assert where == [("archive",)]
    left = await fetch(
        db,
        "SELECT oid::regprocedure::text FROM pg_proc "
        "WHERE pronamespace = 'public'::regnamespace AND prosrc LIKE '%public.docs%'",
    )
    assert left == []
    st = await status(db, wid)
    assert (st["source"], st["problem"]) == ("archive.docs", None)


# ---------------------------------------------------------------------------- dropped columns


async def test_dropped_text_column_stops_the_watch_loudly_and_loses_nothing(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_docs(db)
    await db.execute(
        "INSERT INTO docs (id, content, title) VALUES (1, 'first body', 'a recipe for bread'), "
        "(2, 'second body', 'how to fix a bicycle')"
    )
    wid = await watch_docs(db)
    await drain(db_url, minilm)
    await db.execute("UPDATE docs SET content = 'first body, edited' WHERE id = 1")  # queued

    # whoever drops the column is told at once
    with warnings_of(db) as warned:
        await db.execute("ALTER TABLE docs DROP COLUMN content")
    assert len(warned) == 1 and "not served any more" in warned[0], warned
    assert "dropped" in warned[0]
    with warnings_of(db) as warned:
        # the application's writes go on (with a WARNING that the watch is not served)
        await db.execute("INSERT INTO docs (id, title) VALUES (3, 'the history of tea')")
        await db.execute("UPDATE docs SET title = 'how to fix a flat tyre' WHERE id = 2")
    assert len(warned) == 2 and all("autoembed" in w and "not" in w for w in warned), warned
    assert await fetch(db, "SELECT count(*) FROM docs") == [(3,)]
    st = await status(db, wid)
    assert st["problem"] is not None and "dropped" in st["problem"]
    queued = await jobs(db)
    assert ("1", "pending", 0) in queued and st["pending"] == len(queued)

    # the worker does not serve it, says so with its exit code, and the work stays queued
    code, _ = await drain_code(db_url, minilm)
    assert code == EXIT_UNSERVED
    assert await jobs(db) == queued

    # re-pointed at another column: every row is queued again, and served
    info = await watch(db, "docs", "title", model=MODEL)
    assert info["id"] == wid and info["queued"] == 3
    await drain(db_url, minilm)
    vecs = await embeddings(db)
    assert_matches(minilm, "a recipe for bread", vecs[1])
    assert_matches(minilm, "how to fix a flat tyre", vecs[2])
    assert_matches(minilm, "the history of tea", vecs[3])
    assert (await status(db, wid))["problem"] is None
    found = await search(db, minilm, "match_docs", "brewing a cup of tea")
    assert found[0] == (3, "the history of tea")
    with warnings_of(db) as warned:
        await db.execute("UPDATE docs SET title = 'sourdough starter tips' WHERE id = 1")
    assert warned == []
    await drain(db_url, minilm)
    assert_matches(minilm, "sourdough starter tips", (await embeddings(db))[1])


async def test_repointing_in_sql_without_naming_the_model(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_docs(db)
    await db.execute(
        "INSERT INTO docs (id, content, title) VALUES (1, 'first body', 'a recipe for bread'), "
        "(2, 'second body', 'how to fix a bicycle')"
    )
    wid = await watch_docs(db)
    await drain(db_url, minilm)
    await db.execute("ALTER TABLE docs DROP COLUMN content")
    # as an admin re-points it by hand, in SQL
    assert await fetch(db, "SELECT autoembed.watch('docs', 'title')") == [(wid,)]
    assert await fetch(db, "SELECT model, next_model FROM autoembed.watches") == [(MODEL, None)]
    assert await jobs(db) == [("1", "pending", 0), ("2", "pending", 0)]
    await drain(db_url, minilm)
    vecs = await embeddings(db)
    assert_matches(minilm, "a recipe for bread", vecs[1])
    assert_matches(minilm, "how to fix a bicycle", vecs[2])


async def test_watching_another_column_requeues_every_row(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_docs(db)
    await db.execute(
        "INSERT INTO docs (id, content, title) VALUES "
        "(1, 'body about gardening', 'growing tomatoes'), "
        "(2, 'body about sailing', 'crossing the channel')"
    )
    wid = await watch_docs(db)
    await drain(db_url, minilm)

    info = await watch(db, "docs", "title", model=MODEL)
    assert info["id"] == wid
    # every row: even those with a vector, which was made from the other column's text
    assert [r[0] for r in await jobs(db)] == ["1", "2"]
    await drain(db_url, minilm)
    vecs = await embeddings(db)
    assert_matches(minilm, "growing tomatoes", vecs[1])
    assert_matches(minilm, "crossing the channel", vecs[2])
    found = await search(db, minilm, "match_docs", "tomato plants")
    assert found[0] == (1, "growing tomatoes") and len(found) == 2
    st = await status(db, wid)
    assert (st["content_column"], st["problem"]) == ("title", None)
    # and the application's changes of the new column are followed
    await db.execute("UPDATE docs SET content = 'not read any more' WHERE id = 2")
    assert await jobs(db) == []
    await db.execute("UPDATE docs SET title = 'sailing to France' WHERE id = 2")
    await drain(db_url, minilm)
    assert_matches(minilm, "sailing to France", (await embeddings(db))[2])


async def test_watching_another_column_clears_rows_it_has_no_text_for(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_docs(db)
    await db.execute(
        "INSERT INTO docs (id, content, title) VALUES "
        "(1, 'body about gardening', 'growing tomatoes'), (2, 'body about chess', NULL)"
    )
    await watch_docs(db)
    await drain(db_url, minilm)
    assert_matches(minilm, "body about chess", (await embeddings(db))[2])
    await watch(db, "docs", "title", model=MODEL)
    await drain(db_url, minilm)
    vecs = await embeddings(db)
    assert_matches(minilm, "growing tomatoes", vecs[1])
    # no vector: not one of its old text, which search would return beside a title (NULL)
    # it was not made from
    assert vecs[2] is None
    found = await search(db, minilm, "match_docs", "chess openings")
    assert [r[0] for r in found] == [1]


# ---------------------------------------------------------------------------- retyped key


async def test_primary_key_retyped_to_text(db: Any, db_url: str, minilm: Embedder) -> None:
    await make_docs(db)
    await db.execute(
        "INSERT INTO docs (id, content) VALUES (1, 'alpine lakes in summer'), "
        "(2, 'baking rye bread at home')"
    )
    wid = await watch_docs(db)
    await drain(db_url, minilm)
    await db.execute("INSERT INTO docs (id, content) VALUES (3, 'queued before the change')")

    with warnings_of(db) as warned:
        await db.execute("ALTER TABLE docs ALTER COLUMN id TYPE text USING id::text")
        await db.execute(
            "INSERT INTO docs (id, content) VALUES ('doc-a', 'tending a vegetable garden')"
        )
        await db.execute("UPDATE docs SET content = 'mountain lakes in winter' WHERE id = '1'")
    assert warned == []
    assert await jobs(db) == [("1", "pending", 0), ("3", "pending", 0), ("doc-a", "pending", 0)]
    await drain(db_url, minilm)
    vecs = await embeddings(db)
    assert_matches(minilm, "mountain lakes in winter", vecs["1"])
    assert_matches(minilm, "baking rye bread at home", vecs["2"])
    assert_matches(minilm, "queued before the change", vecs["3"])
    assert_matches(minilm, "tending a vegetable garden", vecs["doc-a"])
    assert await jobs(db) == []

    # the search function answers with the new key type
    result = (await fetch(db, "SELECT pg_get_function_result('match_docs'::regproc)"))[0][0]
    assert result.startswith("TABLE(id text, content text, "), result
    found = await search(db, minilm, "match_docs", "growing vegetables")
    assert found[0] == ("doc-a", "tending a vegetable garden") and len(found) == 4
    assert (await status(db, wid))["problem"] is None
    info = await watch(db, "docs", "content", model=MODEL)
    assert info["id"] == wid and info["queued"] == 0


# ---------------------------------------------------------------------------- dropped tables


async def test_dropped_table_takes_its_watch_along(db: Any, db_url: str, minilm: Embedder) -> None:
    await make_docs(db)
    await db.execute("INSERT INTO docs (id, content) VALUES (1, 'never embedded'), (2, 'nor this')")
    wid = await watch_docs(db)
    functions = await watch_functions(db, wid)
    assert len(await jobs(db)) == 2

    await db.execute("DROP TABLE docs")
    assert await fetch(db, "SELECT count(*) FROM autoembed.watches") == [(0,)]
    assert await jobs(db) == []
    assert await existing(db, functions) == []
    assert await fetch(db, "SELECT count(*) FROM autoembed.status") == [(0,)]

    # a table of the same name is a new table to watch
    await make_docs(db)
    await db.execute("INSERT INTO docs (id, content) VALUES (1, 'a brand new table of cats')")
    wid2 = await watch_docs(db)
    assert wid2 != wid
    await drain(db_url, minilm)
    assert_matches(minilm, "a brand new table of cats", (await embeddings(db))[1])
    assert await search(db, minilm, "match_docs", "cats") == [(1, "a brand new table of cats")]


async def test_dropped_table_without_the_event_trigger(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await db.execute("ALTER EVENT TRIGGER autoembed_sql_drop DISABLE")

    async def dropped(wid: int) -> None:
        oid = (await fetch(db, "SELECT 'docs'::regclass::oid"))[0][0]
        await db.execute("DROP TABLE docs")
        st = await status(db, wid)
        assert st["source"] == f"(dropped table {oid})"
        assert st["problem"] is not None and "dropped" in st["problem"]
        assert f"autoembed unwatch {wid}" in st["problem"]
        assert st["pending"] == 1  # left as it was; nothing else fails over it

    # by drop_watch(id)
    await make_docs(db)
    await db.execute("INSERT INTO docs (id, content) VALUES (1, 'left behind')")
    wid = await watch_docs(db)
    functions = await watch_functions(db, wid)
    await dropped(wid)
    assert await fetch(db, "SELECT autoembed.drop_watch(%s)", wid) == [(True,)]
    assert await fetch(db, "SELECT count(*) FROM autoembed.watches") == [(0,)]
    assert await jobs(db) == []
    assert await existing(db, functions) == []

    # by `autoembed unwatch <id>`
    await make_docs(db)
    await db.execute("INSERT INTO docs (id, content) VALUES (1, 'left behind again')")
    wid = await watch_docs(db)
    functions = await watch_functions(db, wid)
    await dropped(wid)
    done = await asyncio.to_thread(
        subprocess.run,
        [*AUTOEMBED, "unwatch", str(wid)],
        env=worker_env(db_url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert await fetch(db, "SELECT count(*) FROM autoembed.watches") == [(0,)]
    assert await jobs(db) == []
    assert await existing(db, functions) == []

    # and the table made again is watched as any new table
    await make_docs(db)
    await db.execute("INSERT INTO docs (id, content) VALUES (1, 'a fresh start for owls')")
    wid = await watch_docs(db)
    await drain(db_url, minilm)
    assert_matches(minilm, "a fresh start for owls", (await embeddings(db))[1])
    assert await search(db, minilm, "match_docs", "owls") == [(1, "a fresh start for owls")]
    assert (await status(db, wid))["problem"] is None


async def test_recreated_table_replaces_a_watch_left_behind(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    """Without the event trigger and without an unwatch: watching a new table of the same
    name takes over the search function of the watch its dropped namesake left behind."""
    await db.execute("ALTER EVENT TRIGGER autoembed_sql_drop DISABLE")
    await make_docs(db)
    await db.execute("INSERT INTO docs (id, content) VALUES (1, 'left behind')")
    old = await watch_docs(db)
    functions = await watch_functions(db, old)
    await db.execute("DROP TABLE docs")

    await make_docs(db)
    await db.execute("INSERT INTO docs (id, content) VALUES (1, 'owls hunt at night')")
    wid = await watch_docs(db)
    await drain(db_url, minilm)
    assert_matches(minilm, "owls hunt at night", (await embeddings(db))[1])
    assert await search(db, minilm, "match_docs", "owls") == [(1, "owls hunt at night")]
    # the watch left behind is gone, with its work and its functions
    assert await fetch(db, "SELECT id FROM autoembed.watches") == [(wid,)]
    assert await jobs(db) == []
    # (search functions of the same name and arguments are the new watch's own)
    assert [f for f in await existing(db, functions) if f.startswith("autoembed.")] == []


# ---------------------------------------------------------------------------- keys


KEYS = {
    # type: (keys as the session writes them, the same keys as the queue writes them)
    "timestamp": (
        ["05/03/2024 10:00:00", "31/12/1999 23:59:59.999999", "infinity", "15/03/0044 12:00 BC"],
        ["2024-03-05 10:00:00", "1999-12-31 23:59:59.999999", "infinity", "0044-03-15 12:00:00 BC"],
    ),
    "timestamptz": (
        ["05/03/2024 10:00:00", "31/12/1999 23:59:59.999999", "-infinity", "01/07/2024 00:00"],
        [
            "2024-03-05 04:30:00+00",
            "1999-12-31 18:29:59.999999+00",
            "-infinity",
            "2024-06-30 18:30:00+00",
        ],
    ),
    "numeric": (
        ["1.50", "-0.000001", "12345678901234567890.123456789", "NaN"],
        ["1.50", "-0.000001", "12345678901234567890.123456789", "NaN"],
    ),
}


@pytest.mark.parametrize("key", sorted(KEYS))
async def test_keys_round_trip_whatever_the_session_settings(
    db: Any, db_url: str, minilm: Embedder, key: str
) -> None:
    written, queued = KEYS[key]
    await make_docs(db, key=key)
    async with await connect(db_url) as app:
        await app.execute(
            "SET datestyle = 'SQL, DMY'; SET timezone = 'Asia/Kolkata'; "
            "SET intervalstyle = 'sql_standard'; SET extra_float_digits = -15"
        )
        # a backfill queued under these settings, then the application's own writes
        await app.execute("INSERT INTO docs (id, content) VALUES (%s, 'row zero')", (written[0],))
        await watch(app, "docs", "content", model=MODEL)
        for n, k in enumerate(written[1:], start=1):
            await app.execute("INSERT INTO docs (id, content) VALUES (%s, %s)", (k, f"row {n}"))
        await app.execute(
            "UPDATE docs SET content = 'row zero, edited' WHERE id = %s", (written[0],)
        )
        assert sorted(r[0] for r in await jobs(db)) == sorted(queued)
        await drain(db_url, minilm)
        assert await jobs(db) == []
        rows = await fetch(db, "SELECT content, embedding FROM docs")
        assert len(rows) == 4
        for text, vector in rows:
            assert vector is not None, text
            assert_matches(minilm, text, np.asarray(vector.to_numpy()))
        # deleting under these settings drops the row's job at once
        await app.execute(
            "UPDATE docs SET content = 'row one, edited' WHERE id = %s", (written[1],)
        )
        assert [r[0] for r in await jobs(db)] == [queued[1]]
        await app.execute("DELETE FROM docs WHERE id = %s", (written[1],))
        assert await jobs(db) == []
    assert await fetch(db, "SELECT count(*) FROM autoembed.failed_jobs") == [(0,)]


async def test_a_key_queued_in_another_spelling_is_not_lost(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    """autoembed.enqueue (the webhook's path) takes keys as text: '1.5' names the row whose
    key is 1.50 as surely as '1.50' does, and its vector is written, not dropped as missing."""
    await make_docs(db, key="numeric")
    await db.execute("INSERT INTO docs (id, content) VALUES (1.50, 'a row with a numeric key')")
    wid = await watch_docs(db)
    await drain(db_url, minilm)
    await db.execute("UPDATE docs SET embedding = NULL")  # lost somehow: queued again by hand
    assert await fetch(db, "SELECT autoembed.enqueue(%s, ARRAY['1.5'])", wid) == [(1,)]
    await drain(db_url, minilm)
    assert await fetch(db, "SELECT embedding IS NOT NULL FROM docs") == [(True,)], (
        "the job was dropped as if its row were gone: the row has no vector"
    )


# ---------------------------------------------------------------------------- refused writes


POISON = """
CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.content LIKE '%poison%' THEN
        RAISE EXCEPTION 'row % refuses to be updated', NEW.id;
    END IF;
    RETURN NEW;
END $$
"""


async def three_hundred_rows(db: Any) -> None:
    await make_docs(db)
    await db.execute(
        "INSERT INTO docs (id, content) SELECT g, 'passage number ' || g || "
        "CASE WHEN g = 150 THEN ' (poison)' ELSE '' END FROM generate_series(1, 300) g"
    )


async def failures(db: Any) -> list[tuple[Any, ...]]:
    return await fetch(
        db,
        "SELECT j.watch_id, j.pk, j.last_error FROM autoembed.jobs j "
        "WHERE j.status = 'failed' ORDER BY j.watch_id, j.pk",
    )


async def test_a_row_whose_trigger_refuses_the_write_fails_alone(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await three_hundred_rows(db)
    await db.execute(POISON)
    await db.execute(
        "CREATE TRIGGER refuse BEFORE UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
    )
    wid = await watch_docs(db)
    worker = await drain(db_url, minilm, batch_size=64)
    assert worker.failed_jobs == 1
    failed = await failures(db)
    assert [(w, pk) for w, pk, _ in failed] == [(wid, "150")]
    assert "row 150 refuses to be updated" in failed[0][2]
    assert (await fetch(db, "SELECT source, pk FROM autoembed.failed_jobs")) == [("docs", "150")]
    vecs = await embeddings(db)
    assert vecs[150] is None
    assert sum(v is not None for v in vecs.values()) == 299
    assert_matches(minilm, "passage number 151", vecs[151])
    st = await status(db, wid)
    assert (st["pending"], st["running"], st["failed"]) == (0, 0, 1)


async def test_a_refused_write_charges_only_its_own_watch(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await three_hundred_rows(db)
    await db.execute(POISON)
    first = await watch_docs(db)
    second = await watch_docs(db, embedding_column="embedding2", match_function="match_docs2")
    # refuses writes of the first watch's column only
    await db.execute(
        "CREATE TRIGGER refuse BEFORE UPDATE OF embedding ON docs FOR EACH ROW "
        "EXECUTE FUNCTION refuse_poison()"
    )
    worker = await drain(db_url, minilm, batch_size=64)
    assert worker.failed_jobs == 1
    failed = await failures(db)
    assert [(w, pk) for w, pk, _ in failed] == [(first, "150")]
    assert "row 150 refuses to be updated" in failed[0][2]
    one = await embeddings(db)
    two = await embeddings(db, column="embedding2")
    assert one[150] is None and sum(v is not None for v in one.values()) == 299
    assert all(v is not None for v in two.values())
    assert_matches(minilm, "passage number 150 (poison)", two[150])
    assert (await status(db, second))["failed"] == 0
    # (HNSW is approximate: among 300 near-identical texts the exact row may be missed)
    assert len(await search(db, minilm, "match_docs2", "passage number 150 (poison)")) == 10


async def test_a_not_valid_check_refuses_one_old_row(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await three_hundred_rows(db)
    # one old row breaks a rule added later without validating the rows already there
    await db.execute(
        "ALTER TABLE docs ADD CONSTRAINT no_poison CHECK (content NOT LIKE '%poison%') NOT VALID"
    )
    first = await watch_docs(db)
    second = await watch_docs(db, embedding_column="embedding2", match_function="match_docs2")
    worker = await drain(db_url, minilm, batch_size=64)
    # the row's writes are refused, for either watch; every other row of both is written
    assert worker.failed_jobs == 2
    failed = await failures(db)
    assert [(w, pk) for w, pk, _ in failed] == [(first, "150"), (second, "150")]
    assert all("no_poison" in error for _, _, error in failed), failed
    for column in ("embedding", "embedding2"):
        vecs = await embeddings(db, column=column)
        assert vecs[150] is None
        assert sum(v is not None for v in vecs.values()) == 299
    for wid in (first, second):
        st = await status(db, wid)
        assert (st["pending"], st["running"], st["failed"]) == (0, 0, 1)


# ---------------------------------------------------------------------------- empty text


async def test_whitespace_clears_and_deleted_rows_drop_their_jobs(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_docs(db)
    wid = await watch_docs(db)
    await db.execute(
        "INSERT INTO docs (id, content) VALUES (1, 'one'), (2, 'two'), (3, 'three'), (4, 'four')"
    )
    await drain(db_url, minilm)
    assert all(v is not None for v in (await embeddings(db)).values())

    await db.execute("UPDATE docs SET content = '   ' WHERE id = 1")
    await db.execute("UPDATE docs SET content = E'\\n\\t' WHERE id = 2")
    await db.execute("UPDATE docs SET content = '' WHERE id = 3")
    await db.execute("INSERT INTO docs (id, content) VALUES (5, E' \\r\\n ')")
    worker = await drain(db_url, minilm)
    assert worker.failed_jobs == 0
    vecs = await embeddings(db)
    assert {k: v is None for k, v in vecs.items()} == {1: True, 2: True, 3: True, 4: False, 5: True}
    assert await jobs(db) == []

    # DELETE and TRUNCATE drop the jobs of the rows that are gone, at once
    await db.execute(
        "INSERT INTO docs (id, content) SELECT g, 'queued row ' || g FROM generate_series(10, 19) g"
    )
    await db.execute("UPDATE docs SET content = 'four, edited' WHERE id = 4")
    assert (await status(db, wid))["pending"] == 11
    await db.execute("DELETE FROM docs WHERE id BETWEEN 10 AND 14")
    assert [r[0] for r in await jobs(db)] == ["15", "16", "17", "18", "19", "4"]
    assert (await status(db, wid))["pending"] == 6
    await db.execute("TRUNCATE docs")
    st = await status(db, wid)
    assert (st["pending"], st["running"], st["failed"]) == (0, 0, 0)
    assert await jobs(db) == []


# ---------------------------------------------------------------------------- types


async def test_refusals_of_keys_and_columns_of_other_types(db: Any) -> None:
    await db.execute("CREATE TABLE pairs (a int, b int, content text, PRIMARY KEY (a, b))")
    with pytest.raises(WatchError, match="(?s)primary key of 2 columns.*single-column primary key"):
        await watch(db, "pairs", "content", model=MODEL)
    await db.execute("CREATE TYPE mood AS ENUM ('happy', 'sad')")
    await db.execute("CREATE DOMAIN doc_text AS text CHECK (length(VALUE) < 10000)")
    await db.execute("CREATE TABLE typed (id bigint PRIMARY KEY, feeling mood, body doc_text)")
    with pytest.raises(WatchError, match="(?s)typed.feeling is of type public.mood.*built-in type"):
        await watch(db, "typed", "feeling", model=MODEL)
    with pytest.raises(
        WatchError, match="(?s)typed.body is of type public.doc_text.*built-in type"
    ):
        await watch(db, "typed", "body", model=MODEL)
    # refused watches leave nothing behind
    assert await fetch(db, "SELECT count(*) FROM autoembed.watches") == [(0,)]
    cols = await fetch(
        db, "SELECT count(*) FROM pg_attribute WHERE attrelid = 'typed'::regclass AND attnum > 0"
    )
    assert cols == [(3,)]


USER_TYPES = {
    "domain": "CREATE DOMAIN doc_text AS text CHECK (length(VALUE) < 10000)",
    # every text the column holds below is one of its labels
    "enum": "CREATE TYPE doc_text AS ENUM ('before the change', 'queued before the change', "
    "'written while unwatched', 'changed while unwatched')",
}


async def own_indexes(conn: psycopg.AsyncConnection[Any], watch_id: int) -> dict[str, int]:
    """autoembed's indexes of a watch's table: kind (hnsw, fts, meta) -> index oid."""
    rows = await fetch(
        conn,
        "SELECT substring(c.relname from '_(hnsw|fts|meta)$'), c.oid::bigint "
        "FROM autoembed.watches w JOIN pg_index i ON i.indrelid = w.source "
        "JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE w.id = %s AND c.relname ~ ('_w' || w.id || '_(hnsw|fts|meta)$')",
        watch_id,
    )
    return {r[0]: r[1] for r in rows}


async def test_retyping_a_column_sets_aside_only_the_indexes_that_cover_it(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    """An `ALTER TABLE ... TYPE` drops (for the worker to build again) only autoembed's
    indexes that depend on a column the statement names: retyping `title` rebuilds nothing,
    retyping the text drops its full-text index and keeps the HNSW index."""
    await make_docs(db)
    await db.execute("ALTER TABLE docs ADD COLUMN meta jsonb")
    await db.execute("INSERT INTO docs (id, content, title) VALUES (1, 'vacuum reclaims', 't')")
    wid = await watch_docs(db, metadata_column="meta")
    await drain(db_url, minilm)
    before = await own_indexes(db, wid)
    assert sorted(before) == ["fts", "hnsw", "meta"], before

    await db.execute("ALTER TABLE docs ALTER COLUMN title TYPE varchar(200)")
    assert await own_indexes(db, wid) == before
    assert await fetch(db, "SELECT index_state FROM autoembed.watches") != [("deferred",)]

    # an enum's text form is not immutable: the full-text index could not be rebuilt
    await db.execute("CREATE TYPE mood AS ENUM ('vacuum reclaims', 'happy')")
    await db.execute('ALTER TABLE "docs" ALTER "content" TYPE mood USING content::mood')
    after = await own_indexes(db, wid)
    assert after == {"hnsw": before["hnsw"], "meta": before["meta"]}, after
    await db.execute("ALTER TABLE docs ALTER COLUMN content TYPE text USING content::text")
    await db.execute("UPDATE docs SET content = 'vacuum reclaims space' WHERE id = 1")
    await drain(db_url, minilm)  # and the worker builds the full-text index again
    rebuilt = await own_indexes(db, wid)
    assert sorted(rebuilt) == ["fts", "hnsw", "meta"] and rebuilt["hnsw"] == before["hnsw"]
    assert_matches(minilm, "vacuum reclaims space", (await embeddings(db))[1])


@pytest.mark.parametrize(
    ("statement", "name", "named"),
    [
        ("ALTER TABLE docs ALTER content TYPE int", "content", True),
        ("alter table DOCS alter CONTENT type int", "content", True),
        ('ALTER TABLE docs ALTER "content" TYPE int', "content", True),
        ("ALTER TABLE docs ALTER content2 TYPE int", "content", False),
        ("ALTER TABLE docs ALTER my_content TYPE int", "content", False),
        ("ALTER TABLE docs ALTER a$b TYPE int", "a$b", True),
        ("ALTER TABLE docs ALTER a$bc TYPE int", "a$b", False),
        ('ALTER TABLE "My Docs" ALTER "Body ""x""" TYPE int', 'Body "x"', True),
        ('ALTER TABLE "My Docs" ALTER "Body ""x""" TYPE int', "My Docs", True),
        ('ALTER TABLE "My Docs" ALTER "Body" TYPE int', 'Body "x"', False),
    ],
)
async def test_which_names_a_statement_may_name(
    db: Any, statement: str, name: str, named: bool
) -> None:
    got = await fetch(db, "SELECT autoembed._may_name(%s, %s)", statement, name)
    assert got == [(named,)]


@pytest.mark.parametrize("kind", sorted(USER_TYPES))
async def test_watched_column_retyped_to_a_user_type_stops_the_watch(
    db: Any, db_url: str, minilm: Embedder, kind: str
) -> None:
    await make_docs(db)
    await db.execute("INSERT INTO docs (id, content) VALUES (1, 'before the change')")
    wid = await watch_docs(db)
    await drain(db_url, minilm)
    await db.execute("UPDATE docs SET content = 'queued before the change' WHERE id = 1")
    await db.execute(USER_TYPES[kind])

    with warnings_of(db) as warned:
        await db.execute(
            "ALTER TABLE docs ALTER COLUMN content TYPE doc_text USING content::doc_text"
        )
    assert len(warned) == 1 and "not served any more" in warned[0], warned
    assert "doc_text" in warned[0]
    with warnings_of(db) as warned:
        await db.execute("INSERT INTO docs (id, content) VALUES (2, 'written while unwatched')")
        await db.execute("UPDATE docs SET content = 'changed while unwatched' WHERE id = 1")
    assert len(warned) == 2 and all("autoembed" in w for w in warned), warned
    st = await status(db, wid)
    assert st["problem"] is not None and "doc_text" in st["problem"]
    queued = await jobs(db)
    assert ("1", "pending", 0) in queued
    code, _ = await drain_code(db_url, minilm)
    assert code == EXIT_UNSERVED
    assert await jobs(db) == queued
    # the search function reads no column of a type it was not made for
    assert await search(db, minilm, "match_docs", "before the change") == []

    # retyped back: served again (re-watching queues what changed meanwhile)
    await db.execute("ALTER TABLE docs ALTER COLUMN content TYPE text USING content::text")
    assert (await status(db, wid))["problem"] is None
    info = await watch(db, "docs", "content", model=MODEL)
    assert info["id"] == wid
    await drain(db_url, minilm)
    vecs = await embeddings(db)
    assert_matches(minilm, "changed while unwatched", vecs[1])
    assert_matches(minilm, "written while unwatched", vecs[2])


async def test_a_row_changed_while_its_watch_was_stopped_is_not_lost(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_docs(db)
    await db.execute("INSERT INTO docs (id, content) VALUES (1, 'the text before'), (2, 'other')")
    wid = await watch_docs(db)
    await drain(db_url, minilm)
    await db.execute("CREATE DOMAIN doc_text AS text CHECK (length(VALUE) < 10000)")
    await db.execute("ALTER TABLE docs ALTER COLUMN content TYPE doc_text")
    await db.execute("UPDATE docs SET content = 'the text written while stopped' WHERE id = 1")
    await db.execute("ALTER TABLE docs ALTER COLUMN content TYPE text")
    assert (await status(db, wid))["problem"] is None
    # as the WARNING says: watch the table again
    await watch(db, "docs", "content", model=MODEL)
    await drain(db_url, minilm)
    assert_matches(minilm, "the text written while stopped", (await embeddings(db))[1])
