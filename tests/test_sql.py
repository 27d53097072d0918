"""The SQL surface: migrations, watches and their refusals, search, and security."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest
from autoembed.engine import Embedder
from autoembed.errors import MigrationError, WatchError
from autoembed.migrate import migrate, migration_files, repeatable_files
from autoembed.watches import watch

from .conftest import AUTOEMBED, ROOT, Server, url_of, worker_env
from .helpers import drain, fetch, make_documents, watch_documents


async def test_migrate_is_idempotent(db_url: str) -> None:
    again = await migrate(db_url)
    assert again.applied == []
    assert again.already == [p.stem for p in migration_files()]
    assert again.already[0] == "0001_schema" and len(again.already) >= 4
    assert again.repeatable == [p.stem for p in repeatable_files()]


async def test_changed_migration_is_refused(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(ROOT / "migrations", root / "migrations")
    shutil.copytree(ROOT / "sql", root / "sql")
    first = root / "migrations" / "0001_schema.sql"
    first.write_text(first.read_text() + "\n-- an edit after release\n")
    with pytest.raises(MigrationError, match="0001_schema.sql was applied with checksum"):
        await migrate(db_url, root)


async def test_new_migration_applies_once(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(ROOT / "migrations", root / "migrations")
    shutil.copytree(ROOT / "sql", root / "sql")
    (root / "migrations" / "0099_extra.sql").write_text("CREATE TABLE autoembed.extra (x int);")
    assert (await migrate(db_url, root)).applied == ["0099_extra"]
    assert (await migrate(db_url, root)).applied == []
    # a broken migration changes nothing at all (one transaction)
    (root / "migrations" / "0100_broken.sql").write_text(
        "CREATE TABLE autoembed.y (x int); SELEC 1;"
    )
    with pytest.raises(MigrationError, match="nothing was changed"):
        await migrate(db_url, root)
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        assert await fetch(conn, "SELECT to_regclass('autoembed.y')") == [(None,)]


def test_concurrent_migrations_from_several_processes(server: Server) -> None:
    name = "concurrent_migrate"
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    dsn = server.dsn(name)
    procs = [
        subprocess.Popen(
            [*AUTOEMBED, "migrate"],
            env=worker_env(dsn),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    applied = f"applied {len(migration_files())} migration(s)"
    assert sum(applied in o for o in outputs) == 1
    with psycopg.connect(dsn) as conn:
        count = conn.execute("SELECT count(*) FROM autoembed.schema_migrations").fetchone()
        assert count == (len(migration_files()),)
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


async def test_refusals_say_what_to_do(db: Any) -> None:
    await db.execute("CREATE TABLE nopk (content text)")
    with pytest.raises(WatchError, match="(?s)has no primary key.*ADD COLUMN id bigint"):
        await watch(db, "nopk", "content", model="all-minilm-l6-v2")
    await db.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    with pytest.raises(WatchError, match='(?s)has no column "content".*Its columns are: id, body'):
        await watch(db, "t", "content", model="all-minilm-l6-v2")
    with pytest.raises(
        WatchError, match='(?s)unknown model "nope".*Known models: all-minilm-l6-v2'
    ):
        await watch(db, "t", "body", model="nope")
    await db.execute("ALTER TABLE t ADD COLUMN embedding vector(3)")
    with pytest.raises(
        WatchError, match=r"is public.vector\(3\), but model all-minilm-l6-v2 makes vector\(384\)"
    ):
        await watch(db, "t", "body", model="all-minilm-l6-v2")
    await db.execute("CREATE TABLE u (id int PRIMARY KEY, body text)")
    await db.execute("CREATE FUNCTION match_u(x int) RETURNS int LANGUAGE sql AS 'SELECT x'")
    with pytest.raises(WatchError, match="match_u exists and was not created by autoembed"):
        await watch(db, "u", "body", model="all-minilm-l6-v2")
    # a refused watch leaves nothing behind
    assert await fetch(db, "SELECT count(*) FROM autoembed.watches") == [(0,)]
    cols = await fetch(db, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'u'")
    assert cols == [(2,)]
    # with another name, it works
    info = await watch(db, "u", "body", model="all-minilm-l6-v2", match_function="search_u")
    assert info["match_function"].startswith("search_u(")
    with pytest.raises(WatchError, match='relation "missing" does not exist'):
        await watch(db, "missing", "body", model="all-minilm-l6-v2")


async def test_match_documents_as_supabase_calls_it(db: Any, db_url: str, minilm: Embedder) -> None:
    await make_documents(db)
    await watch_documents(db)
    texts = ["cats purr when content", "dogs bark at strangers", "stock markets fell sharply"]
    for t in texts:
        await db.execute("INSERT INTO documents (content) VALUES (%s)", (t,))
    await drain(db_url, minilm)
    query = minilm.embed(["a happy cat"])[0]
    # PostgREST passes the arguments by name
    rows = await fetch(
        db,
        "SELECT id, content, similarity FROM match_documents(query_embedding => %s, "
        "match_threshold => %s, match_count => %s)",
        query,
        0.1,
        2,
    )
    assert rows[0][1] == "cats purr when content"
    assert len(rows) <= 2 and rows == sorted(rows, key=lambda r: -r[2])
    everything = await fetch(db, "SELECT * FROM match_documents(%s, -1, 10)", query)
    assert len(everything) == 3
    strict = await fetch(db, "SELECT * FROM match_documents(%s, 0.99, 10)", query)
    assert strict == []
    sig = await fetch(
        db,
        "SELECT pg_get_function_arguments('match_documents'::regproc), "
        "pg_get_function_result('match_documents'::regproc), prosecdef "
        "FROM pg_proc WHERE proname = 'match_documents'",
    )
    assert sig == [
        (
            "query_embedding vector, match_threshold double precision DEFAULT '-1'::integer, "
            "match_count integer DEFAULT NULL::integer, filter jsonb DEFAULT '{}'::jsonb",
            "TABLE(id bigint, content text, metadata jsonb, similarity double precision)",
            False,  # SECURITY INVOKER
        )
    ]


async def test_row_level_security_and_plain_roles(
    server: Server, db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_documents(db)
    await db.execute("ALTER TABLE documents ADD COLUMN owner text NOT NULL DEFAULT current_user")
    await watch_documents(db)
    await db.execute("DROP ROLE IF EXISTS app_alice")
    await db.execute("DROP ROLE IF EXISTS app_bob")
    for role in ("app_alice", "app_bob"):
        await db.execute(f"CREATE ROLE {role} LOGIN")
        await db.execute(f"GRANT SELECT, INSERT, UPDATE ON documents TO {role}")
        await db.execute(f"GRANT USAGE ON SEQUENCE documents_id_seq TO {role}")
    await db.execute("ALTER TABLE documents ENABLE ROW LEVEL SECURITY")
    await db.execute("CREATE POLICY own_rows ON documents USING (owner = current_user)")
    # no grant on the autoembed schema at all: the SECURITY DEFINER trigger still queues
    alice = await psycopg.AsyncConnection.connect(
        server.dsn(db.info.dbname, user="app_alice"), autocommit=True
    )
    bob = await psycopg.AsyncConnection.connect(
        server.dsn(db.info.dbname, user="app_bob"), autocommit=True
    )
    try:
        await alice.execute("INSERT INTO documents (content) VALUES ('alice secret about cats')")
        await bob.execute("INSERT INTO documents (content) VALUES ('bob notes about cats')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await alice.execute("SELECT * FROM autoembed.jobs")
        assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(2,)]
        await drain(db_url, minilm)  # the worker (a superuser here) bypasses RLS
        from pgvector.psycopg import register_vector_async

        await register_vector_async(bob)
        q = minilm.embed(["cats"])[0]
        seen = await fetch(bob, "SELECT content FROM match_documents(%s, -1, 10)", q)
        assert seen == [("bob notes about cats",)]
    finally:
        await alice.close()
        await bob.close()


async def test_least_privilege_worker_role(
    server: Server, db: Any, db_url: str, minilm: Embedder
) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute("INSERT INTO documents (content) VALUES ('embedded by a plain role')")
    await db.execute("DROP ROLE IF EXISTS autoembed_worker")
    await db.execute("CREATE ROLE autoembed_worker LOGIN")
    await db.execute("SELECT autoembed.grant_worker('autoembed_worker')")
    dsn = server.dsn(db.info.dbname, user="autoembed_worker")
    proc = await asyncio.create_subprocess_exec(
        *AUTOEMBED,
        "run",
        "--drain",
        env=worker_env(dsn),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 90)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        raise AssertionError(out.decode()[-3000:]) from None
    assert proc.returncode == 0, out.decode()
    assert await fetch(db, "SELECT count(embedding) FROM documents") == [(1,)]
    # and it may write nothing else
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("UPDATE documents SET content = 'vandalised'")
    assert url_of(dsn).startswith("postgresql://autoembed_worker@")


async def test_a_refused_write_fails_the_job_with_the_reason(
    server: Server, db: Any, db_url: str
) -> None:
    await make_documents(db)
    await watch_documents(db)
    await db.execute("INSERT INTO documents (content) VALUES ('cannot be written')")
    # the table's own rule refuses the vector: its owner's trigger raises
    await db.execute(
        """CREATE FUNCTION no_vectors() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'vectors are frozen on this table'; END $$"""
    )
    await db.execute(
        "CREATE TRIGGER frozen BEFORE UPDATE OF embedding ON documents "
        "FOR EACH ROW EXECUTE FUNCTION no_vectors()"
    )
    await db.execute("DROP ROLE IF EXISTS autoembed_weak")
    await db.execute("CREATE ROLE autoembed_weak LOGIN")
    await db.execute("SELECT autoembed.grant_worker('autoembed_weak')")
    dsn = server.dsn(db.info.dbname, user="autoembed_weak")
    env = worker_env(dsn, AUTOEMBED_MAX_ATTEMPTS="2", AUTOEMBED_BACKOFF_SECONDS="0.05")
    done = await asyncio.to_thread(
        subprocess.run,
        [*AUTOEMBED, "run", "--drain"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    failed = await fetch(db, "SELECT attempts, last_error FROM autoembed.failed_jobs")
    assert len(failed) == 1 and failed[0][0] == 2
    assert "vectors are frozen on this table" in failed[0][1]
