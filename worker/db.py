"""Connections, SQL loaded from files, and driver errors turned into autoembed's own."""

from __future__ import annotations

import importlib
import logging
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from .errors import DatabaseError
from .redact import scrub

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent


def sql_dir(kind: str) -> Path:
    """Where the ``migrations`` or ``sql`` files are: ``$AUTOEMBED_SQL_ROOT/<kind>`` if set,
    else inside the installed package (``autoembed._migrations``, ``autoembed._sql``: the
    repository's ``migrations/`` and ``sql/`` folders, shipped in the wheel)."""
    override = os.environ.get("AUTOEMBED_SQL_ROOT")
    if override:
        return Path(override) / kind
    module = importlib.import_module(f"autoembed._{kind}")
    assert module.__file__ is not None
    return Path(module.__file__).resolve().parent


@cache
def queries() -> dict[str, str]:
    """The named statements of ``worker/queries.sql`` (``-- name: x`` blocks)."""
    text = (PACKAGE_DIR / "queries.sql").read_text()
    blocks = re.split(r"^-- name: (\w+)\s*$", text, flags=re.MULTILINE)
    return {name: body.strip() for name, body in zip(blocks[1::2], blocks[2::2], strict=True)}


def q(name: str) -> sql.SQL:
    return sql.SQL(queries()[name])


def describe(exc: BaseException) -> str:
    """A driver error as one readable message, with PostgreSQL's hint when it has one, and
    without any password libpq may have echoed from a malformed URL."""
    if isinstance(exc, psycopg.Error) and exc.diag is not None and exc.diag.message_primary:
        text = exc.diag.message_primary
        if exc.diag.message_hint:
            text += f"\nhint: {exc.diag.message_hint}"
        return scrub(text)
    return scrub(" ".join(str(exc).split()) or type(exc).__name__)


def translate(exc: BaseException, doing: str) -> DatabaseError:
    return DatabaseError(f"{doing}: {describe(exc)}")


async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """Per-connection set-up: pgvector's types, once the extension exists."""
    from pgvector.psycopg import register_vector_async

    try:
        await register_vector_async(conn)
    except psycopg.ProgrammingError:
        log.debug("pgvector is not installed in this database yet")


# A worker session resolves only what it means to: the built-in catalog first, and pgvector
# by its schema. A function or operator that another role created in a schema on the
# default search_path (public before PostgreSQL 15) can never shadow a built-in one. Key
# text forms do not depend on the server's or the role's defaults either.
PINNED = (
    "SET search_path = pg_catalog, pg_temp; SET datestyle = 'ISO, YMD'; "
    "SET intervalstyle = 'postgres'; SET timezone = 'UTC'; SET extra_float_digits = 1"
)


async def configure_worker(conn: psycopg.AsyncConnection[Any]) -> None:
    """Per-connection set-up of the worker's pool: pgvector's types (looked up with the
    server's search_path, once), then the pinned session settings."""
    await configure(conn)
    await conn.execute(PINNED)


async def reset_worker(conn: psycopg.AsyncConnection[Any]) -> None:
    """Before a connection goes back to the pool: undo whatever session state code that
    ran inside it (a table owner's trigger, through an accessor) may have left, and pin the
    settings again."""
    await conn.execute("RESET ALL; SELECT pg_catalog.pg_advisory_unlock_all(); " + PINNED)


def session_pool(url: str, *, max_size: int, name: str, timeout: float = 10.0) -> Any:
    """A connection pool for autoembed's own sessions (the worker's, the HTTP API's):
    autocommit, pgvector's types, the pinned settings, reset before each connection goes
    back, checked when taken. Not opened yet."""
    from psycopg_pool import AsyncConnectionPool

    return AsyncConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        kwargs={"autocommit": True},
        configure=configure_worker,
        reset=reset_worker,
        check=AsyncConnectionPool.check_connection,
        open=False,
        timeout=timeout,
        name=name,
    )


async def connect(url: str, *, vector: bool = True, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
    try:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True, **kwargs)
    except psycopg.Error as exc:
        raise translate(exc, "cannot connect to the database") from exc
    if vector:
        await configure(conn)
    return conn


async def fetch_dicts(
    conn: psycopg.AsyncConnection[Any], query: sql.Composable | str, params: Any = None
) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)  # type: ignore[arg-type]
        return await cur.fetchall()
