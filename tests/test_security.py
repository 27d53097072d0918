"""Installed in someone else's database: each attack from issue 9 performed against the real
server, and the legitimate path beside it.

The rules these hold to: no definer code and no worker session evaluates code that a less
privileged role can define (the queue triggers read built-in types only and pin their
search_path; the worker touches a table only through accessor functions that run as the
table's owner; every worker session pins search_path and qualifies what it calls); execute
rights go to the roles that need them and nobody else.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from autoembed.engine import Embedder
from autoembed.watches import watch

from .conftest import AUTOEMBED, ROOT, Server, worker_env
from .helpers import assert_matches, drain, fetch, vectors


async def _role(db: Any, name: str, *options: str) -> None:
    await db.execute(f"DROP OWNED BY {name}") if await _exists(db, name) else None
    await db.execute(f"DROP ROLE IF EXISTS {name}")
    await db.execute(f"CREATE ROLE {name} LOGIN {' '.join(options)}")


async def _exists(db: Any, name: str) -> bool:
    return bool(await fetch(db, "SELECT 1 FROM pg_roles WHERE rolname = %s", name))


async def _superuser(db: Any, name: str) -> bool:
    rows = await fetch(db, "SELECT rolsuper, rolcreatedb FROM pg_roles WHERE rolname = %s", name)
    return bool(rows[0][0] or rows[0][1])


@pytest.fixture
async def as_role(server: Server, db: Any) -> AsyncIterator[Any]:
    """Connections as other roles of the test database (closed at the end)."""
    opened: list[psycopg.AsyncConnection[Any]] = []

    async def connect(role: str) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            server.dsn(db.info.dbname, user=role), autocommit=True
        )
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        await conn.close()


# a function any role can write, that tries to make its author a superuser when it runs
ESCALATE = """
CREATE FUNCTION {name}({args}) RETURNS {returns} LANGUAGE plpgsql AS $f$
BEGIN
    BEGIN
        EXECUTE 'ALTER ROLE {role} SUPERUSER CREATEDB';
    EXCEPTION WHEN OTHERS THEN
        NULL;  -- not allowed: carry on quietly, as an attacker would
    END;
    RETURN {result};
END $f$
"""


async def test_table_owner_cannot_become_superuser(
    db: Any, db_url: str, minilm: Embedder, as_role: Any
) -> None:
    await _role(db, "tenant")
    await db.execute("GRANT CREATE ON SCHEMA public TO tenant")
    tenant = await as_role("tenant")
    await tenant.execute("CREATE TABLE docs (id bigint PRIMARY KEY, content text)")
    await tenant.execute("INSERT INTO docs VALUES (1, 'a'), (2, 'b')")
    await watch(db, "docs", "content", model="all-minilm-l6-v2")
    await drain(db_url, minilm)  # the admin's worker, a superuser, serves the tenant's table

    # 1. a cast of the tenant's own type to text, reached by the definer trigger
    await tenant.execute("CREATE TYPE mood AS ENUM ('a', 'b', 'c')")
    await tenant.execute(
        ESCALATE.format(name="mood_text", args="mood", returns="text", role="tenant", result="'x'")
    )
    await tenant.execute("CREATE CAST (mood AS text) WITH FUNCTION mood_text(mood)")
    await tenant.execute("ALTER TABLE docs ALTER COLUMN content TYPE mood USING content::mood")
    await tenant.execute("UPDATE docs SET content = 'c' WHERE id = 1")  # the write still works
    await tenant.execute("INSERT INTO docs VALUES (3, 'b')")
    assert not await _superuser(db, "tenant")
    problem = await fetch(db, "SELECT problem FROM autoembed.status")
    assert "now of type public.mood" in problem[0][0]
    # 2. ... reached by the admin's search: the search function reads nothing retyped
    q = minilm.embed(["a"])[0]
    assert await fetch(db, "SELECT * FROM match_docs(%s, -1, 10)", q) == []
    assert not await _superuser(db, "tenant")
    # 3. ... reached by the worker: it does not serve a watch with a retyped column
    worker = await drain(db_url, minilm, expect=3)
    assert worker.exit_code == 3
    assert not await _superuser(db, "tenant")

    # 4. the tenant's own trigger, reached by the superuser worker's vector write: it runs
    # as the tenant (the accessor is the tenant's), so it cannot do what the tenant cannot
    await tenant.execute("ALTER TABLE docs ALTER COLUMN content TYPE text USING content::text")
    await tenant.execute(
        ESCALATE.format(name="on_write", args="", returns="trigger", role="tenant", result="NEW")
    )
    await tenant.execute(
        "CREATE TRIGGER on_write BEFORE UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION on_write()"
    )
    await db.execute("SELECT autoembed.watch('docs', 'content', model => 'all-minilm-l6-v2')")
    await tenant.execute("UPDATE docs SET content = 'changed ' || id")
    await drain(db_url, minilm)
    assert not await _superuser(db, "tenant")
    rows = await vectors(db, "docs")
    for _, (text, vector) in rows.items():
        assert_matches(minilm, text, vector)  # and the legitimate work was done


async def test_enum_key_cast_through_the_insert_path(db: Any, as_role: Any) -> None:
    await _role(db, "tenant2")
    await db.execute("GRANT CREATE ON SCHEMA public TO tenant2")
    tenant = await as_role("tenant2")
    await tenant.execute("CREATE TYPE k AS ENUM ('x', 'y')")
    await tenant.execute("CREATE TABLE e (id k PRIMARY KEY, content text)")
    with pytest.raises(Exception, match="primary key of public.e is of type public.k"):
        await watch(db, "e", "content", model="all-minilm-l6-v2")
    # watched with a built-in key, retyped after: the trigger queues nothing and warns
    await tenant.execute("CREATE TABLE f (id text PRIMARY KEY, content text)")
    await watch(db, "f", "content", model="all-minilm-l6-v2")
    await tenant.execute(
        ESCALATE.format(name="k_text", args="k", returns="text", role="tenant2", result="'x'")
    )
    await tenant.execute("CREATE CAST (k AS text) WITH FUNCTION k_text(k)")
    await tenant.execute("ALTER TABLE f ALTER COLUMN id TYPE k USING id::k")
    await tenant.execute("INSERT INTO f VALUES ('y', 'text')")  # the write works
    assert not await _superuser(db, "tenant2")
    assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(0,)]


async def test_search_path_hijack_of_worker_and_search(
    db: Any, db_url: str, minilm: Embedder, as_role: Any
) -> None:
    # a database upgraded from before PostgreSQL 15: anyone may create in public
    await db.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
    await _role(db, "mallory")
    mallory = await as_role("mallory")
    # overloads that match the worker's and the search function's literal argument types
    # better than the built-ins do
    for name, args, returns, result in (
        ("hashtextextended", "text, integer", "bigint", "0"),
        ("left", "text, bigint", "text", "''"),
        ("length", "text", "bigint", "0"),
        ("unnest", "text[]", "SETOF text", "NULL"),
        ("format", "text, name", "text", "''"),
        ("now", "", "timestamptz", "'2000-01-01'"),
        ("minus", "integer, double precision", "double precision", "0"),
    ):
        body = ESCALATE.format(
            name=f"public.{name}", args=args, returns=returns, role="mallory", result=result
        )
        if returns.startswith("SETOF"):
            body = body.replace("RETURN NULL;", "RETURN;")
        await mallory.execute(body)
    await mallory.execute(
        "CREATE OPERATOR public.- (LEFTARG = integer, RIGHTARG = double precision, "
        "FUNCTION = public.minus)"
    )
    await db.execute("CREATE TABLE docs (id bigint PRIMARY KEY, content text)")
    await db.execute("INSERT INTO docs VALUES (1, 'cats purr'), (2, 'dogs bark')")
    await watch(db, "docs", "content", model="all-minilm-l6-v2")
    await drain(db_url, minilm)  # as a superuser
    await db.execute("UPDATE docs SET content = NULL WHERE id = 2")
    await drain(db_url, minilm)
    q = minilm.embed(["cats"])[0]
    hits = await fetch(db, "SELECT id, similarity FROM match_docs(%s, 0.1, 5)", q)
    assert hits and hits[0][0] == 1 and 0 < hits[0][1] <= 1
    assert not await _superuser(db, "mallory")
    rows = await vectors(db, "docs")
    assert_matches(minilm, "cats purr", rows[1][1]) and rows[2][1] is None


async def test_execute_rights(db: Any, as_role: Any) -> None:
    await db.execute("CREATE TABLE docs (id bigint PRIMARY KEY, content text)")
    await watch(db, "docs", "content", model="all-minilm-l6-v2")
    await _role(db, "nosy")
    await db.execute("GRANT USAGE ON SCHEMA autoembed TO nosy")  # e.g. to read status
    await db.execute("GRANT CREATE ON SCHEMA public TO nosy")
    nosy = await as_role("nosy")
    for call in (
        "SELECT autoembed.enqueue(1, array_fill('1'::text, ARRAY[100001]))",
        "SELECT autoembed.hold_watch(1)",
        "SELECT autoembed._lock_watch(1)",
        "SELECT autoembed.finish_migration(1)",
        "SELECT autoembed.grant_worker('nosy')",
        "SELECT * FROM autoembed.w1_read('embed', ARRAY['1'])",
        "SELECT * FROM autoembed.w1_keys('embed', NULL, false)",
        "SELECT autoembed.index_built(1)",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            await nosy.execute(call)
            raise AssertionError(f"allowed: {call}")
    # nor can a table owner hang the queue trigger on a table of its own
    await nosy.execute("CREATE TABLE mine (id int PRIMARY KEY, content text)")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await nosy.execute(
            "CREATE TRIGGER q AFTER INSERT ON mine REFERENCING NEW TABLE AS new_rows "
            "FOR EACH STATEMENT EXECUTE FUNCTION autoembed.queue_changes('1')"
        )
    assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(0,)]
    # the owner of the definer functions is a role that may only queue
    owners = await fetch(
        db,
        "SELECT DISTINCT pg_get_userbyid(proowner) FROM pg_proc "
        "WHERE pronamespace = 'autoembed'::regnamespace AND prosecdef "
        "AND proname IN ('queue_changes', 'forget_rows', 'enqueue', 'finish_migration')",
    )
    assert owners == [("autoembed_definer",)]
    powers = await fetch(
        db,
        "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls FROM pg_roles "
        "WHERE rolname = 'autoembed_definer'",
    )
    assert powers == [(False, False, False, False)]


async def _run_as(
    server: Server, db: Any, role: str, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    dsn = server.dsn(db.info.dbname, user=role)
    return await asyncio.to_thread(
        subprocess.run,
        [*AUTOEMBED, *args],
        env=worker_env(dsn, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


async def test_least_privilege_worker_writes_and_clears(
    server: Server, db: Any, minilm: Embedder
) -> None:
    await db.execute("CREATE TABLE docs (id bigint PRIMARY KEY, content text)")
    await db.execute("INSERT INTO docs VALUES (1, 'kept'), (2, 'to be cleared')")
    await watch(db, "docs", "content", model="all-minilm-l6-v2")
    await _role(db, "embedder")
    await db.execute("SELECT autoembed.grant_worker('embedder')")
    done = await _run_as(server, db, "embedder", "run", "--drain")
    assert done.returncode == 0, done.stderr
    await db.execute("UPDATE docs SET content = NULL WHERE id = 2")
    done = await _run_as(server, db, "embedder", "run", "--drain")
    assert done.returncode == 0, done.stderr
    rows = await vectors(db, "docs")
    assert_matches(minilm, "kept", rows[1][1])
    assert rows[2][1] is None  # cleared: no vector left matching text that is gone
    assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(0,)]
    # and on the table itself it may do nothing at all
    async with await psycopg.AsyncConnection.connect(
        server.dsn(db.info.dbname, user="embedder"), autocommit=True
    ) as conn:
        for statement in ("SELECT content FROM docs", "UPDATE docs SET embedding = NULL"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await conn.execute(statement)


async def test_rows_hidden_by_row_level_security_are_not_lost(
    server: Server, db: Any, minilm: Embedder
) -> None:
    await db.execute("CREATE TABLE docs (id bigint PRIMARY KEY, content text, tenant text)")
    await db.execute("ALTER TABLE docs ENABLE ROW LEVEL SECURITY")
    await db.execute("CREATE POLICY mine ON docs USING (tenant = current_user)")
    await _role(db, "tableowner")
    await db.execute("ALTER TABLE docs OWNER TO tableowner")
    await db.execute("INSERT INTO docs VALUES (1, 'one', 'x'), (2, 'two', 'y'), (3, 'three', 'z')")
    await watch(db, "docs", "content", model="all-minilm-l6-v2")
    await _role(db, "rlsworker")
    await db.execute("SELECT autoembed.grant_worker('rlsworker')")
    # RLS on, not forced: the accessors read as the owner, who sees every row
    done = await _run_as(server, db, "rlsworker", "run", "--drain")
    assert done.returncode == 0, done.stderr
    assert await fetch(db, "SELECT count(embedding) FROM docs") == [(3,)]
    # forced on the owner too: rows it cannot see are failed loudly, never dropped as deleted
    await db.execute("ALTER TABLE docs FORCE ROW LEVEL SECURITY")
    await db.execute("UPDATE docs SET content = content || ' again'")
    done = await _run_as(server, db, "rlsworker", "run", "--drain")
    assert done.returncode == 0, done.stderr
    failed = await fetch(db, "SELECT pk, last_error FROM autoembed.failed_jobs ORDER BY pk")
    assert [f[0] for f in failed] == ["1", "2", "3"]
    assert "row-level security hides this row" in failed[0][1]
    assert "tableowner" in failed[0][1] and "autoembed retry" in failed[0][1]
    status = await _run_as(server, db, "postgres", "status")
    assert "row-level security hides" in status.stdout, status.stdout
    # the way out, as the message says
    await db.execute("ALTER TABLE docs NO FORCE ROW LEVEL SECURITY")
    await db.execute("SELECT autoembed.retry()")
    done = await _run_as(server, db, "rlsworker", "run", "--drain")
    assert done.returncode == 0, done.stderr
    rows = await vectors(db, "docs")
    for _, (text, vector) in rows.items():
        assert_matches(minilm, text, vector)
