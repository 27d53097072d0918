"""The endpoints: /embed, /v1/embeddings, /webhook, /healthz, /metrics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST
from psycopg import sql
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..db import describe, fetch_dicts, q
from ..engine import Embedding
from ..queue import Watch

if TYPE_CHECKING:
    pass
from .common import (
    DB_ERRORS,
    INT_TYPES,
    MISSING,
    TRUNCATED_HEADER,
    HTTPError,
    Service,
    authorize,
    bool_of,
    json_object,
    read_json,
    texts_of,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- embeddings


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()


async def _json(payload: Any, result: Embedding, big: bool) -> Response:
    # a few hundred vectors take milliseconds to write: keep that off the event loop
    body = await asyncio.to_thread(_dumps, payload) if big else _dumps(payload)
    return Response(
        body, media_type="application/json", headers={TRUNCATED_HEADER: str(result.truncated)}
    )


async def embed_supabase(request: Request) -> Response:
    service: Service = request.app.state.service
    authorize(request, service.settings.api_key)
    body = json_object(await read_json(request, service.settings.max_body_bytes))
    emb = service.model(_optional_str(body, "model"))
    texts, single = texts_of(body.get("input"), service.settings.max_inputs)
    result = await service.embed(
        emb,
        texts,
        mean_pool=bool_of(body, "mean_pool", True),
        normalize=bool_of(body, "normalize", True),
    )
    vectors = result.vectors.tolist()
    return await _json({"embedding": vectors[0] if single else vectors}, result, len(texts) > 16)


def _optional_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise HTTPError(422, f"{key} must be a string", code="invalid_type", param=key)
    return value


async def embed_openai(request: Request) -> Response:
    service: Service = request.app.state.service
    authorize(request, service.settings.api_key)
    body = json_object(await read_json(request, service.settings.max_body_bytes))
    emb = service.model(_optional_str(body, "model"))
    texts, _ = texts_of(body.get("input"), service.settings.max_inputs)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise HTTPError(
            422,
            "encoding_format must be 'float' or 'base64'",
            code="invalid_value",
            param="encoding_format",
        )
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool)):
        raise HTTPError(
            422, "dimensions must be an integer", code="invalid_type", param="dimensions"
        )
    if dims is not None and dims != emb.dim:
        raise HTTPError(
            400,
            f"{emb.name} makes {emb.dim} dimensions; it cannot shorten them to {dims}",
            code="unsupported_dimensions",
            param="dimensions",
        )
    result = await service.embed(emb, texts)
    if fmt == "base64":  # little-endian float32 bytes, as OpenAI's SDK decodes them
        little = result.vectors.astype("<f4", copy=False)
        vectors: list[Any] = [base64.b64encode(v.tobytes()).decode("ascii") for v in little]
    else:
        vectors = result.vectors.tolist()
    payload = {
        "object": "list",
        "data": [
            {"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)
        ],
        "model": emb.name,
        "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
    }
    return await _json(payload, result, len(texts) > 16)


# ---------------------------------------------------------------------------- webhook


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
    row, old = body.get(row_key), body.get("old_record")
    if not isinstance(row, dict):
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
            keys = [await _pk_text(conn, w, row, row_key) for w in watches]
            queued = dropped = 0
            async with conn.transaction():
                for w, pk in zip(watches, keys, strict=True):
                    if op == "DELETE":
                        cur = await conn.execute(q("drop_jobs"), {"watch": w.id, "pks": [pk]})
                        dropped += max(cur.rowcount, 0)
                    elif _changed(op, w, row, old):
                        cur = await conn.execute(q("enqueue"), {"watch": w.id, "pks": [pk]})
                        row = await cur.fetchone()
                        queued += int(row[0]) if row else 0
    except psycopg.errors.UndefinedTable as exc:
        raise HTTPError(
            503,
            "the autoembed schema is missing: run `autoembed migrate`",
            code="no_schema",
            kind="server_error",
        ) from exc
    except DB_ERRORS as exc:
        raise HTTPError(
            503,
            f"database unavailable: {describe(exc)}",
            code="database_unavailable",
            kind="server_error",
            headers={"Retry-After": "1"},
        ) from exc
    return JSONResponse({"table": f"{schema}.{table}", "queued": queued, "dropped": dropped}, 202)


async def _pk_text(
    conn: psycopg.AsyncConnection[Any], watch: Watch, row: Mapping[str, Any], where: str
) -> str:
    """The row's key as ``pk::text`` gives it (the form the queue stores)."""
    param = f"{where}.{watch.pk_column}"
    value = row.get(watch.pk_column)
    if value is None or isinstance(value, dict | list):
        raise HTTPError(
            422, f"{param} must hold the row's primary key value", code="invalid_value", param=param
        )
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    if isinstance(value, int) and not isinstance(value, bool) and watch.pk_type in INT_TYPES:
        return text
    if isinstance(value, str) and watch.pk_type in ("text", "character varying"):
        return text
    # anything else (uuid, numeric, varchar(n), dates...): PostgreSQL's own cast and text form
    # pk_type comes from format_type() in the catalog (as in Watch.pk_array)
    query = sql.SQL("SELECT %s::{}::text").format(sql.SQL(watch.pk_type))
    try:
        cur = await conn.execute(query, (text,))
        found = await cur.fetchone()
    except psycopg.DataError as exc:
        raise HTTPError(
            422, f"{param}: {describe(exc)}", code="invalid_value", param=param
        ) from None
    assert found is not None
    return str(found[0])


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


# ---------------------------------------------------------------------------- health, metrics


async def healthz(request: Request) -> Response:
    service: Service = request.app.state.service
    emb, worker = service.default, service.worker
    checks: dict[str, dict[str, Any]] = {
        "model": {"ok": True, "name": emb.name, "dim": emb.dim, "device": emb.device},
    }
    if worker is not None and worker.model_errors:
        checks["model"] = {"ok": False, "errors": dict(worker.model_errors)}
    if service.pool is None:
        checks["database"] = {"ok": True, "detail": "none configured (/webhook answers 503)"}
    else:
        try:
            async with asyncio.timeout(3.0):
                async with service.pool.connection(timeout=3.0) as conn:
                    await conn.execute("SELECT 1")
            checks["database"] = {"ok": True}
        except (*DB_ERRORS, TimeoutError) as exc:
            checks["database"] = {"ok": False, "error": describe(exc)}
    if worker is not None:
        checks["listener"] = {"ok": worker.listener.alive}
    ok = all(c["ok"] for c in checks.values())
    return JSONResponse({"ok": ok, "checks": checks}, 200 if ok else 503)


async def metrics_page(request: Request) -> Response:
    service: Service = request.app.state.service
    if service.pool is not None and service.worker is None:
        # no worker here to keep the queue depth current: read it for this scrape
        with contextlib.suppress(*DB_ERRORS, TimeoutError, psycopg.Error):
            async with asyncio.timeout(2.0), service.pool.connection(timeout=2.0) as conn:
                ids = [r["id"] for r in await fetch_dicts(conn, q("watches"))]
                rows = await fetch_dicts(
                    conn, q("outstanding"), {"watches": ids, "lanes": ["embed", "summary"]}
                )
            for status in ("pending", "running", "failed"):
                service.metrics.queue_depth.labels(status).set(rows[0][status])
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
