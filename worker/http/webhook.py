"""``POST /webhook``: Supabase-style database webhooks, queued with the triggers' own
statement.

What the sender got wrong is a 4xx and touches nothing: a key of the wrong type, out of its
column's range (10**30 for a bigint key would poison every batch it was claimed with), over
``MAX_KEY_BYTES`` (PostgreSQL cannot index it), or one PostgreSQL's own cast refuses. Only a
database that cannot be reached is a 503 with ``Retry-After``; any other database error is
a 500 (the sender should not retry it for ever).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..db import describe, fetch_dicts, q
from ..outcomes import is_db_outage
from ..queue import Watch
from .common import MISSING, HTTPError, Service, authorize, json_object, read_json

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 1024  # a job's key is indexed; PostgreSQL's btree takes ~2.7 kB at most
INT_BOUNDS = {"smallint": 1 << 15, "integer": 1 << 31, "bigint": 1 << 63}
TEXT_TYPES = {"text", "character varying"}  # no length limit: the key is its own text form
SCHEMA_MISSING = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction)


async def webhook(request: Request) -> Response:
    service: Service = request.app.state.service
    authorize(request, service.settings.api_key)
    # decimals kept as written: a numeric key 1.50 must stay "1.50", as ::text gives it
    body = json_object(
        await read_json(request, service.settings.max_body_bytes, parse_float=Decimal)
    )
    op = body.get("type")
    if op not in ("INSERT", "UPDATE", "DELETE"):
        raise HTTPError(
            422, "type must be INSERT, UPDATE or DELETE", code="invalid_value", param="type"
        )
    schema, table = body.get("schema", "public"), body.get("table")
    for key, value in (("schema", schema), ("table", table)):
        if not isinstance(value, str) or not value:
            raise HTTPError(
                422, f"{key} must be a non-empty string", code="invalid_type", param=key
            )
    row_key = "old_record" if op == "DELETE" else "record"
    record, old = body.get(row_key), body.get("old_record")
    if not isinstance(record, dict):
        raise HTTPError(
            422, f"{op} needs {row_key} (an object)", code="invalid_type", param=row_key
        )
    if old is not None and not isinstance(old, dict):
        raise HTTPError(
            422, "old_record must be an object or null", code="invalid_type", param="old_record"
        )
    if service.pool is None:
        raise HTTPError(
            503,
            "no database configured: set DATABASE_URL to accept webhooks",
            code="no_database",
            kind="server_error",
        )
    try:
        async with service.pool.connection() as conn:
            watches = [
                Watch(**r)
                for r in await fetch_dicts(conn, q("watches"))
                if r["schema"] == schema and r["table_name"] == table
            ]
            if not watches:
                raise HTTPError(
                    404,
                    f"table {schema}.{table} is not watched "
                    f"(autoembed watch {schema}.{table} --column COLUMN)",
                    code="table_not_watched",
                    param="table",
                )
            keys = [await pk_text(conn, w, record, row_key) for w in watches]
            queued = dropped = 0
            async with conn.transaction():
                for w, pk in zip(watches, keys, strict=True):
                    if op == "DELETE":
                        cur = await conn.execute(q("drop_jobs"), {"watch": w.id, "pks": [pk]})
                        dropped += max(cur.rowcount, 0)
                    elif _changed(op, w, record, old):
                        cur = await conn.execute(q("enqueue"), {"watch": w.id, "pks": [pk]})
                        found = await cur.fetchone()
                        queued += int(found[0]) if found else 0
    except (psycopg.Error, OSError) as exc:
        raise _database_failure(exc, row_key) from exc
    return JSONResponse({"table": f"{schema}.{table}", "queued": queued, "dropped": dropped}, 202)


def _database_failure(exc: BaseException, row_key: str) -> HTTPError:
    if is_db_outage(exc):
        return HTTPError(
            503,
            f"database unavailable: {describe(exc)}",
            code="database_unavailable",
            kind="server_error",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, SCHEMA_MISSING):
        return HTTPError(
            503,
            "the autoembed schema is missing or out of date: run `autoembed migrate`",
            code="no_schema",
            kind="server_error",
        )
    if isinstance(exc, psycopg.DataError):  # a value of the payload PostgreSQL refused
        return HTTPError(422, f"{row_key}: {describe(exc)}", code="invalid_value", param=row_key)
    log.error("webhook: the database refused the statement", exc_info=exc)
    return HTTPError(
        500, f"database error: {describe(exc)}", code="database_error", kind="server_error"
    )


async def pk_text(
    conn: psycopg.AsyncConnection[Any], watch: Watch, row: Mapping[str, Any], where: str
) -> str:
    """The row's key as ``pk::text`` gives it (the form the queue stores); 422 (naming
    ``where.pk``) for a value the key column cannot hold."""
    param = f"{where}.{watch.pk_column}"

    def refuse(why: str) -> HTTPError:
        return HTTPError(422, f"{param} {why}", code="invalid_value", param=param)

    value = row.get(watch.pk_column)
    if value is None or isinstance(value, dict | list):
        raise refuse("must hold the row's primary key value")
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int) and watch.pk_type in INT_BOUNDS:
        bound = INT_BOUNDS[watch.pk_type]
        if not -bound <= value < bound:
            raise refuse(f"is out of range for its column ({watch.pk_type})")
        return str(value)
    else:
        text = str(value)
    _check_key_text(text, refuse)
    if isinstance(value, str) and watch.pk_type in TEXT_TYPES:
        return text
    # anything else (uuid, numeric, varchar(n), an integer written as a string...):
    # PostgreSQL's own cast and text form. pk_type comes from format_type() in the catalog
    # (as in Watch.pk_array).
    query = sql.SQL("SELECT %s::{}::text").format(sql.SQL(watch.pk_type))
    try:
        cur = await conn.execute(query, (text,))
        found = await cur.fetchone()
    except psycopg.DataError as exc:
        raise refuse(f"is not a valid {watch.pk_type}: {describe(exc)}") from None
    assert found is not None
    key = str(found[0])
    # an explicit cast to varchar(n) or character(n) cuts what is too long: refuse instead
    cut = key != text if watch.pk_type.startswith("character varying(") else key != text.rstrip()
    if watch.pk_type.startswith(("character varying(", "character(")) and cut:
        raise refuse(f"is longer than its column ({watch.pk_type}) holds")
    _check_key_text(key, refuse)
    return key


def _check_key_text(text: str, refuse: Callable[[str], HTTPError]) -> None:
    if "\x00" in text:
        raise refuse("contains a NUL character, which PostgreSQL text cannot hold")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise refuse("is not valid Unicode (a lone surrogate)") from None
    if size > MAX_KEY_BYTES:
        raise refuse(f"is {size} bytes long; keys over {MAX_KEY_BYTES} bytes are refused")


def _changed(op: str, watch: Watch, row: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    """Whether the triggers would queue this change: an INSERT with text, an UPDATE whose
    text (or key) changed. Where the payload cannot tell, queue: the worker reads the row."""
    new = row.get(watch.content_column, MISSING)
    if op == "INSERT":
        return new is not None
    if old is None or new is MISSING or watch.content_column not in old:
        return True
    return bool(
        old.get(watch.pk_column) != row.get(watch.pk_column) or old[watch.content_column] != new
    )
