"""Watches from Python: create, change, remove, inspect. The work is done by the SQL
functions of ``sql/30_watch.sql``; this module adds what only the worker's side knows
(a model directory's dimension) and turns PostgreSQL's errors into autoembed's."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from .db import describe, fetch_dicts, q
from .engine.registry import lookup
from .errors import ConfigError, WatchError

log = logging.getLogger(__name__)


def model_key(model: str) -> str:
    """The name a watch records for a model: a registry name, or a directory's full path."""
    spec = lookup(model)
    if spec is not None:
        return spec.name
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return model


async def ensure_model(conn: psycopg.AsyncConnection[Any], model: str) -> str:
    """Make sure autoembed.models knows ``model``; a directory is loaded to learn its size."""
    key = model_key(model)
    cur = await conn.execute("SELECT dim FROM autoembed.models WHERE name = %s", (key,))
    if await cur.fetchone() is not None:
        return key
    if lookup(key) is None and not await asyncio.to_thread(Path(key).is_dir):
        return key  # let autoembed.watch() refuse it with the list of known models
    from .engine import Embedder

    log.info("loading %s to learn its dimension", key)
    emb = await asyncio.to_thread(Embedder.load, key, device="cpu")
    await conn.execute(
        "SELECT autoembed.register_model(%s, %s, %s, %s)",
        (key, emb.dim, emb.max_tokens, f"model directory {key}"),
    )
    return key


async def watch(
    conn: psycopg.AsyncConnection[Any],
    table: str,
    column: str,
    *,
    embedding_column: str = "embedding",
    model: str | None = "gte-small",
    match_function: str | None = None,
    summary_column: str | None = None,
    llm_model: str | None = None,
    llm_prompt: str | None = None,
    llm_options: Mapping[str, Any] | None = None,
    template: str | None = None,
    index: str = "auto",
    metadata_column: str | None = None,
    language: str = "english",
    storage: str = "vector",
    chunking: Mapping[str, Any] | None = None,
    default_model: str = "gte-small",
) -> dict[str, Any]:
    """Watch a table (one transaction: a refused watch leaves nothing behind, a model
    directory it would have registered included). ``model=None``: the watch's own model
    when it exists (re-pointing a watch keeps it), else ``default_model``."""
    try:
        async with conn.transaction():
            if model is None:
                cur = await conn.execute(
                    "SELECT x.model FROM autoembed.watches x WHERE x.source = %s::regclass "
                    "AND (autoembed._attname(x.source, x.embedding_attnum) = %s "
                    "OR (x.chunk_table IS NOT NULL AND %s))",
                    (table, embedding_column, chunking is not None),
                )
                found = await cur.fetchone()
                model = found[0] if found else default_model
            key = await ensure_model(conn, model)
            cur = await conn.execute(
                "SELECT autoembed.watch(source => %s::regclass, content_column => %s, "
                "embedding_column => %s, model => %s, match_function => %s, "
                "summary_column => %s, llm_model => %s, llm_prompt => %s, "
                "llm_options => %s::jsonb, template => %s, index => %s, "
                "metadata_column => %s, language => %s, storage => %s, chunking => %s::jsonb)",
                (
                    table,
                    column,
                    embedding_column,
                    key,
                    match_function,
                    summary_column,
                    llm_model,
                    llm_prompt,
                    json.dumps(dict(llm_options or {})),
                    template,
                    index,
                    metadata_column,
                    language,
                    storage,
                    None if chunking is None else json.dumps(dict(chunking)),
                ),
            )
            row = await cur.fetchone()
            assert row is not None
            watch_id = row[0]
            info = await fetch_dicts(
                conn,
                "SELECT w.id, w.source::text AS source, w.model, w.dim, w.next_model, "
                "w.match_function::text AS match_function, w.index_state, "
                "w.chunk_table::text AS chunk_table, "
                "(SELECT count(*) FROM autoembed.jobs j WHERE j.watch_id = w.id) AS queued "
                "FROM autoembed.watches w WHERE w.id = %s",
                (watch_id,),
            )
        return info[0]
    except psycopg.Error as exc:
        raise WatchError(f"cannot watch {table}.{column}: {describe(exc)}") from exc


async def unwatch(
    conn: psycopg.AsyncConnection[Any], table: str, embedding_column: str, drop_column: bool
) -> bool:
    """Stop watching TABLE (its EMBEDDING_COLUMN), or a watch given by its id (as
    `autoembed status` lists them; also a watch whose table was dropped)."""
    try:
        if table.isdigit():
            cur = await conn.execute(
                "SELECT autoembed.drop_watch(%s::integer, %s)", (int(table), drop_column)
            )
        else:
            cur = await conn.execute(
                "SELECT autoembed.unwatch(%s::regclass, %s, %s)",
                (table, embedding_column, drop_column),
            )
        row = await cur.fetchone()
        return bool(row and row[0])
    except psycopg.Error as exc:
        raise WatchError(f"cannot unwatch {table}: {describe(exc)}") from exc


async def status(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    return await fetch_dicts(conn, q("status"))


async def workers(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    return await fetch_dicts(conn, q("workers"))


async def failed_jobs(conn: psycopg.AsyncConnection[Any], limit: int) -> list[dict[str, Any]]:
    return await fetch_dicts(conn, q("failed_jobs"), {"limit": limit})


async def retry(conn: psycopg.AsyncConnection[Any], table: str | None) -> int:
    try:
        cur = await conn.execute("SELECT autoembed.retry(%s::regclass)", (table,))
        row = await cur.fetchone()
        return int(row[0]) if row else 0
    except psycopg.Error as exc:
        raise WatchError(f"cannot retry: {describe(exc)}") from exc


async def find_watch(
    conn: psycopg.AsyncConnection[Any], table: str, embedding_column: str | None = None
) -> dict[str, Any]:
    """The watch of a table (and its search functions' schema and names). ``table`` may be
    schema-qualified; a bare name is looked up among the watched tables (in the session's
    search_path first), so this works on sessions with any search_path."""
    try:
        rows = await fetch_dicts(
            conn,
            "WITH name AS (SELECT pg_catalog.parse_ident(%s) AS parts) "
            "SELECT w.id, w.model, w.dim, c.relname AS table_name, tn.nspname AS table_schema, "
            "coalesce(autoembed._attname(w.source, w.embedding_attnum), "
            "(SELECT relname FROM pg_catalog.pg_class WHERE oid = w.chunk_table)) "
            "AS embedding_column, "
            "autoembed._attname(w.source, w.content_attnum) AS content_column, "
            "autoembed._attname(w.source, w.pk_attnum) AS pk_column, "
            "n.nspname AS fn_schema, p.proname AS fn_name, "
            "(SELECT h.proname FROM pg_catalog.pg_proc h WHERE h.oid = ANY (w.functions::oid[]) "
            " AND h.proname LIKE 'hybrid\\_%%' LIMIT 1) AS hybrid_name, "
            "tn.nspname = ANY (pg_catalog.current_schemas(false)) AS on_path "
            "FROM autoembed.watches w "
            "JOIN pg_catalog.pg_class c ON c.oid = w.source "
            "JOIN pg_catalog.pg_namespace tn ON tn.oid = c.relnamespace "
            "CROSS JOIN name "
            "LEFT JOIN pg_catalog.pg_proc p ON p.oid = w.match_function::oid "
            "LEFT JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
            "WHERE c.relname = name.parts[pg_catalog.cardinality(name.parts)] "
            "AND (pg_catalog.cardinality(name.parts) = 1 OR tn.nspname = name.parts[1]) "
            "AND (%s::name IS NULL OR autoembed._attname(w.source, w.embedding_attnum) = %s "
            "     OR (SELECT relname FROM pg_catalog.pg_class WHERE oid = w.chunk_table) = %s) "
            "ORDER BY w.id",
            (table, embedding_column, embedding_column, embedding_column),
        )
    except psycopg.Error as exc:
        raise WatchError(f"cannot find {table}: {describe(exc)}") from exc
    if len({(r["table_schema"], r["table_name"]) for r in rows}) > 1:
        rows = [r for r in rows if r["on_path"]] or rows
        schemas = sorted({r["table_schema"] for r in rows})
        if len(schemas) > 1:
            raise WatchError(
                f"{table} is watched in several schemas ({', '.join(schemas)}): "
                "qualify it, e.g. " + f"{schemas[0]}.{table}"
            )
    if not rows:
        raise WatchError(f"{table} is not watched: autoembed watch {table} --column COLUMN")
    if len(rows) > 1:
        cols = ", ".join(r["embedding_column"] for r in rows)
        raise WatchError(
            f"{table} has several watches ({cols}): pass --embedding-column (the vector "
            "column, or the chunk table of a chunked watch)"
        )
    return rows[0]


def parse_filter(text: str | None) -> dict[str, Any]:
    """A metadata filter given on the command line or over HTTP: a JSON object."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(
            f"--filter must be a JSON object, e.g. '{{\"tenant\": 7}}': {exc}"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"--filter must be a JSON object, not {type(value).__name__}")
    return value


async def search(
    conn: psycopg.AsyncConnection[Any],
    watch_row: Mapping[str, Any],
    vector: Any,
    threshold: float,
    limit: int,
    *,
    text: str | None = None,
    hybrid: bool = False,
    filter: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Through the watch's search functions (the caller's rights: row-level security
    applies): nearest rows, or hybrid full text + vector with ``text``."""
    meta = json.dumps(dict(filter or {}))
    if hybrid:
        if not watch_row.get("hybrid_name"):
            raise WatchError("this watch has no hybrid search function: watch the table again")
        query = sql.SQL(
            "SELECT id, similarity, score, metadata, content FROM {}("
            "query_text => %s, query_embedding => %s, match_count => %s, filter => %s::jsonb)"
        ).format(sql.Identifier(watch_row["fn_schema"], watch_row["hybrid_name"]))
        return await fetch_dicts(conn, query, (text, vector, limit, meta))
    query = sql.SQL(
        "SELECT id, similarity, metadata, content FROM {}("
        "query_embedding => %s, match_threshold => %s, match_count => %s, filter => %s::jsonb)"
    ).format(sql.Identifier(watch_row["fn_schema"], watch_row["fn_name"]))
    return await fetch_dicts(conn, query, (vector, threshold, limit, meta))
