"""The endpoints: /embed, /v1/embeddings, /healthz, /metrics (/webhook: see webhook.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..db import describe, fetch_dicts, q
from ..engine import Embedding
from .common import (
    DB_ERRORS,
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
        except (*DB_ERRORS, psycopg.Error, TimeoutError) as exc:
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
