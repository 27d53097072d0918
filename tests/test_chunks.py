"""Long documents (issue 11): chunked watches against the real server and model: passages
in a chunk table, templates, change detection by template column, incremental re-embedding,
delete and truncate, row-level security, and a chunked watch beside an unchunked one."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import psycopg
import pytest
from autoembed.engine import Embedder
from autoembed.errors import WatchError
from autoembed.watches import watch

from .conftest import DATA, Server
from .helpers import drain, fetch

PAGE = json.loads((DATA / "pgdocs-page-copy.json").read_text())  # COPY, 23k characters


async def make_pages(db: Any) -> None:
    await db.execute(
        "CREATE TABLE pages (id bigint PRIMARY KEY, title text, body text, views int DEFAULT 0)"
    )
    await db.execute(
        "INSERT INTO pages (id, title, body) VALUES (1, %s, %s), (2, 'Short', 'A short page.')",
        (PAGE["title"], PAGE["body"]),
    )
    # a log of every passage written (inserted or re-embedded), to count the writes
    await db.execute("CREATE TABLE passage_writes (source_id bigint, chunk_index int)")


async def log_passage_writes(db: Any, table: str = "pages_chunks") -> None:
    await db.execute(
        """CREATE FUNCTION log_passage() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO public.passage_writes VALUES (NEW.source_id, NEW.chunk_index);
           RETURN NULL; END $$"""
    )
    await db.execute(
        f"CREATE TRIGGER log_passage AFTER INSERT OR UPDATE OF embedding ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION log_passage()"
    )


async def passages(db: Any, table: str = "pages_chunks") -> list[tuple[Any, ...]]:
    return await fetch(
        db,
        f"SELECT source_id, chunk_index, start_offset, end_offset, tokens, content, embedding "
        f"FROM {table} ORDER BY source_id, chunk_index",
    )


async def test_a_long_page_is_cut_into_passages_that_fit_the_model(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_pages(db)
    info = await watch(db, "pages", "body", model="all-minilm-l6-v2", chunking={})
    assert info["chunk_table"] == "pages_chunks"
    await drain(db_url, minilm)
    rows = await passages(db)
    long = [r for r in rows if r[0] == 1]
    assert len(long) > 20 and [r[1] for r in long] == list(range(len(long)))
    for _, _, start, end, tokens, content, vector in long:
        assert PAGE["body"][start:end] == content  # offsets slice the source exactly
        assert tokens + 2 <= minilm.max_tokens  # within the window, [CLS] and [SEP] included
        expected = minilm.embed([content])[0]
        assert float(np.dot(expected, vector.to_numpy())) > 0.9999
    assert long[0][2] == 0 and long[-1][3] <= len(PAGE["body"])
    assert [r[5] for r in rows if r[0] == 2] == ["A short page."]
    # search: one row per page, its best passage
    q = minilm.embed(["load data into a table from a file with COPY FROM"])[0]
    hits = await fetch(
        db, "SELECT id, content, chunk_index, similarity FROM match_pages(%s, -1, 5)", q
    )
    assert hits[0][0] == 1 and len({h[0] for h in hits}) == len(hits)
    every = await fetch(db, "SELECT id, chunk_index FROM match_pages_chunks(%s, -1, 5)", q)
    assert len(every) == 5 and all(e[0] == 1 for e in every)  # the passages of the long page


async def test_a_template_and_its_columns(db: Any, db_url: str, minilm: Embedder) -> None:
    await make_pages(db)
    await watch(
        db,
        "pages",
        "body",
        model="all-minilm-l6-v2",
        chunking={"chunk_tokens": 128},
        template="{title}\n\n{chunk}",
    )
    await drain(db_url, minilm)
    await log_passage_writes(db)
    first = await passages(db)
    content = next(r for r in first if r[0] == 2)
    assert_vector = minilm.embed(["Short\n\nA short page."])[0]
    assert float(np.dot(assert_vector, content[6].to_numpy())) > 0.9999
    assert all(r[4] + 2 + 2 <= 128 + 4 for r in first)  # 128-token passages, title reserved
    # a column the template uses: every passage of that row is embedded again
    await db.execute("UPDATE pages SET title = 'Copy' WHERE id = 1")
    assert await fetch(db, "SELECT pk, lane FROM autoembed.jobs") == [("1", "embed")]
    # a column it does not use: nothing
    await db.execute("DELETE FROM autoembed.jobs")
    await db.execute("UPDATE pages SET views = views + 1")
    assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(0,)]
    await db.execute("UPDATE pages SET title = 'Copy again' WHERE id = 1")
    await drain(db_url, minilm)
    n = len([r for r in first if r[0] == 1])
    assert await fetch(db, "SELECT count(*) FROM passage_writes WHERE source_id = 1") == [(n,)]


async def test_an_edit_rewrites_only_the_passages_it_changed(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_pages(db)
    await watch(db, "pages", "body", model="all-minilm-l6-v2", chunking={})
    await drain(db_url, minilm)
    before = await passages(db)
    await log_passage_writes(db)
    body = PAGE["body"]
    middle = body.index(". ", len(body) // 2) + 2  # a sentence in the middle of the page
    edited = body[:middle] + "This sentence was added by an edit. " + body[middle:]
    await db.execute("UPDATE pages SET body = %s WHERE id = 1", (edited,))
    await drain(db_url, minilm)
    after = await passages(db)
    written = (await fetch(db, "SELECT count(*) FROM passage_writes"))[0][0]
    total = len([r for r in after if r[0] == 1])
    assert 1 <= written <= 3 < total // 4, (written, total)
    # and every passage still matches the text it covers, and its vector its content
    for _, _, start, end, _, content, _vector in (r for r in after if r[0] == 1):
        assert edited[start:end] == content
    # passages that only moved kept their vectors (found by their hash, not rewritten)
    old = {r[5]: r[6].to_numpy() for r in before if r[0] == 1}
    kept = [r for r in after if r[0] == 1 and r[5] in old]
    assert len(kept) >= total - 3
    for r in kept:
        assert np.array_equal(r[6].to_numpy(), old[r[5]])


async def test_delete_and_truncate_take_the_passages_with_them(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_pages(db)
    await watch(db, "pages", "body", model="all-minilm-l6-v2", chunking={})
    await drain(db_url, minilm)
    await db.execute("DELETE FROM pages WHERE id = 1")
    assert {r[0] for r in await passages(db)} == {2}
    await db.execute("TRUNCATE pages")  # no foreign key: TRUNCATE works as it did
    assert await passages(db) == []
    assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(0,)]


async def test_a_chunked_and_an_unchunked_watch_on_one_table(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_pages(db)
    await watch(db, "pages", "body", model="all-minilm-l6-v2")
    info = await watch(db, "pages", "body", model="all-minilm-l6-v2", chunking={})
    assert info["match_function"].startswith("match_pages_chunks(")  # match_pages was taken
    await drain(db_url, minilm)
    truncated = await fetch(db, "SELECT count(embedding) FROM pages")
    assert truncated == [(2,)]
    assert len(await passages(db)) > 20
    q = minilm.embed(["COPY FROM STDIN"])[0]
    assert (await fetch(db, "SELECT id FROM match_pages(%s, -1, 1)", q))[0][0] == 1
    assert (await fetch(db, "SELECT id FROM match_pages_chunks(%s, -1, 1)", q))[0][0] == 1


async def test_row_level_security_hides_passages(
    server: Server, db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_pages(db)
    await db.execute("ALTER TABLE pages ADD COLUMN owner text NOT NULL DEFAULT 'alice'")
    await db.execute("UPDATE pages SET owner = 'bob' WHERE id = 2")
    await watch(db, "pages", "body", model="all-minilm-l6-v2", chunking={})
    await drain(db_url, minilm)
    await db.execute("ALTER TABLE pages ENABLE ROW LEVEL SECURITY")
    await db.execute("CREATE POLICY own ON pages USING (owner = current_user)")
    await db.execute("DROP ROLE IF EXISTS bob")
    await db.execute("CREATE ROLE bob LOGIN")
    await db.execute("GRANT SELECT ON pages TO bob")
    q = minilm.embed(["COPY"])[0]
    async with await psycopg.AsyncConnection.connect(
        server.dsn(db.info.dbname, user="bob"), autocommit=True
    ) as bob:
        from pgvector.psycopg import register_vector_async

        await register_vector_async(bob)
        for statement, args in (
            ("SELECT id FROM match_pages(%s, -1, 50)", (q,)),
            ("SELECT id FROM match_pages_chunks(%s, -1, 50)", (q,)),
            ("SELECT id FROM hybrid_pages(%s, %s, 50)", ("COPY", q)),
            ("SELECT source_id FROM pages_chunks", ()),
        ):
            rows = await fetch(bob, statement, *args)
            assert {r[0] for r in rows} == {2}, statement  # never alice's page, by any way


async def test_bad_chunking_options_are_refused(db: Any) -> None:
    await make_pages(db)
    for options, message in (
        ({"chunk_tokens": 8}, "at least 16"),
        ({"chunk_tokens": 64, "chunk_overlap": 64}, "less than chunk_tokens"),
        ({"splitter": "lines"}, "splitter must be"),
        ({"size": 3}, 'unknown chunking option "size"'),
    ):
        with pytest.raises(WatchError, match=message):
            await watch(db, "pages", "body", model="all-minilm-l6-v2", chunking=options)
    with pytest.raises(WatchError, match=r"must place the passage: \{chunk\}"):
        await watch(db, "pages", "body", model="all-minilm-l6-v2", chunking={}, template="{title}")


async def test_a_model_change_builds_new_passages_beside_the_old(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    from .test_daemon import Negated

    await make_pages(db)
    await watch(db, "pages", "body", model="all-minilm-l6-v2", chunking={})
    await drain(db_url, minilm)
    before = {(r[0], r[1]): r[6].to_numpy() for r in await passages(db)}
    await db.execute("SELECT autoembed.register_model('other-384', 384)")
    await db.execute("SELECT autoembed.set_model('pages', 'other-384', 'pages_chunks')")
    # the old passages answer searches until the new ones are complete
    q = minilm.embed(["COPY FROM a file"])[0]
    assert (await fetch(db, "SELECT id FROM match_pages(%s, -1, 1)", q))[0][0] == 1
    other = Negated(minilm, "other-384")
    other.files = minilm.files  # type: ignore[attr-defined]  # the same tokenizer cuts the text
    from autoembed.runner import Worker

    from .helpers import settings

    worker = Worker(
        settings(db_url),
        drain=True,
        progress=False,
        embedder_factory=lambda name: other if name == "other-384" else minilm,
    )
    assert await worker.run() == 0
    assert await fetch(db, "SELECT model, next_model FROM autoembed.watches") == [
        ("other-384", None)
    ]
    after = {(r[0], r[1]): r[6].to_numpy() for r in await passages(db)}
    assert after.keys() == before.keys()
    for key, vector in after.items():
        assert np.allclose(vector, -before[key], atol=1e-6)
    tables = await fetch(
        db,
        "SELECT relname FROM pg_class WHERE relname LIKE 'pages_chunks%%' "
        "AND relkind = 'r' ORDER BY 1",
    )
    assert tables == [("pages_chunks",)]  # swapped in under the same name, the old dropped


async def test_a_huge_document_is_capped_not_crashed(
    db: Any, db_url: str, minilm: Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    await make_pages(db)
    huge = (
        "A paragraph of a very long manual about databases and their indexes. " * 40 + "\n\n"
    ) * 3700
    assert len(huge) > 10_000_000
    await db.execute("UPDATE pages SET body = %s WHERE id = 2", (huge,))
    await watch(db, "pages", "body", model="all-minilm-l6-v2", chunking={"max_chunks": 20})
    caplog.set_level(logging.WARNING)
    worker = await drain(db_url, minilm)
    rows = await fetch(db, "SELECT count(*) FROM pages_chunks WHERE source_id = 2")
    assert rows == [(20,)]  # the cap, stored and searchable
    assert "passages past the cap of 20" in caplog.text
    dropped = sum(
        sample.value
        for metric in worker.metrics.registry.collect()
        for sample in metric.samples
        if sample.name == "autoembed_chunks_dropped_total"
    )
    assert dropped > 1000  # counted, reported
