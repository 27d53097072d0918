"""The HTTP surface: database webhooks, ``/embed``, ``/v1/embeddings``, health and metrics.

- ``POST /webhook``: Supabase-style database webhooks (``{"type", "table", "schema",
  "record", "old_record"}``). A watched row is queued durably with the triggers' own
  ``enqueue`` statement (same queue, same deduplication), a worker is woken with ``notify``,
  and the answer is 202 at once; DELETE drops the row's pending jobs; an UPDATE that left the
  watched column as it was queues nothing, as the triggers do.
- ``POST /embed``: the request and response of Supabase's "Generate Embeddings" Edge
  Function: ``{"input": "text"}`` -> ``{"embedding": [...]}`` (a list in, a list out), with
  ``mean_pool`` and ``normalize`` as in ``Session.run``.
- ``POST /v1/embeddings``: OpenAI-compatible, for pgai's vectorizer, LangChain, LlamaIndex.
- ``GET /healthz`` (no auth): database, model and listener checks; 503 when one fails.
- ``GET /metrics`` (no auth): Prometheus text.

Texts over the model's limit are truncated, and every embedding response says how many
were in an ``X-Autoembed-Truncated`` header (bodies stay exactly what Supabase's and
OpenAI's clients expect; ``usage`` counts the tokens actually embedded).

Errors are JSON in OpenAI's shape, ``{"error": {"message", "type", "code", "param"}}``,
on every endpoint: 400 not JSON or empty input, 401 no or wrong Bearer token, 404 unknown
model or unwatched table, 413 body or input list too large, 422 a field of the wrong type
or value (``param`` names it), 503 database unavailable.

Why Starlette + uvicorn: a small, well-kept ASGI stack (both already dependencies) that
gives routing, streaming request bodies (so the size limit holds while reading) and a
server that runs inside our own event loop, next to the worker, with nothing more.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import psycopg
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .batcher import Batcher, BatcherClosed, TextRejected
from .config import Settings
from .db import configure, describe, fetch_dicts, q
from .engine import Embedder, Embedding
from .engine.registry import lookup
from .errors import AutoembedError, ConfigError, ModelError
from .metrics import Metrics
from .queue import Watch

if TYPE_CHECKING:
    from .runner import Worker

log = logging.getLogger(__name__)

TRUNCATED_HEADER = "X-Autoembed-Truncated"
PATHS = ("/webhook", "/embed", "/v1/embeddings", "/healthz", "/metrics")
DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, OSError)
_INT_TYPES = {"smallint", "integer", "bigint"}
_MISSING = object()


class HTTPError(AutoembedError):
    """A request was refused; the answer is JSON in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.param, self.kind = status, code, param, kind
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        error = {"message": str(self), "type": self.kind, "code": self.code, "param": self.param}
        return JSONResponse({"error": error}, self.status, headers=self.headers)


class Service:
    """What the endpoints share: settings, models, their batchers, the pool, metrics."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        *,
        pool: AsyncConnectionPool[Any] | None,
        metrics: Metrics,
        engine_lock: asyncio.Lock,
        worker: Worker | None,
        embedders: Mapping[str, Embedder],
    ) -> None:
        self.settings, self.default, self.pool = settings, embedder, pool
        self.metrics, self.engine_lock, self.worker = metrics, engine_lock, worker
        self.embedders = embedders  # live: a worker loads models for its watches
        self.batchers: dict[int, Batcher] = {}
        self.requested_name = settings.model

    def model(self, name: str | None) -> Embedder:
        """The loaded model called ``name`` (its name, a registry alias or the path it was
        loaded from); None: the default."""
        if name is None:
            return self.default
        wanted = {name.strip().lower()}
        spec = lookup(name)
        if spec is not None:
            wanted.add(spec.name)
        if lookup(self.requested_name) is None and self.requested_name.lower() in wanted:
            return self.default  # a model directory, asked for by the path it was loaded from
        for emb in (self.default, *self.embedders.values()):
            if emb.name.lower() in wanted:
                return emb
        served = sorted({self.default.name, *(e.name for e in self.embedders.values())})
        raise HTTPError(
            404, f"model {name!r} is not loaded here; this server has: {', '.join(served)}",
            code="model_not_found", param="model",
        )

    def batcher(self, emb: Embedder) -> Batcher:
        if id(emb) not in self.batchers:
            self.batchers[id(emb)] = Batcher(emb, lock=self.engine_lock)
        return self.batchers[id(emb)]

    async def embed(self, emb: Embedder, texts: list[str], **options: bool) -> Embedding:
        try:
            return await self.batcher(emb).embed(texts, **options)
        except TextRejected as exc:
            raise HTTPError(422, str(exc), code="invalid_input", param="input") from exc
        except BatcherClosed as exc:
            raise HTTPError(503, "the server is shutting down", code="shutting_down",
                            kind="server_error") from exc

    async def aclose(self) -> None:
        for batcher in self.batchers.values():
            await batcher.aclose()


# ---------------------------------------------------------------------------- request parsing


async def _read_json(request: Request, limit: int, **loads: Any) -> Any:
    """The body as JSON, refused with 413 as soon as it passes ``limit`` bytes (whatever
    Content-Length said, or without one)."""
    declared = request.headers.get("content-length", "")
    too_big = HTTPError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
    except ClientDisconnect:
        raise HTTPError(400, "the client went away mid-request",
                        code="client_disconnected") from None
    try:
        return json.loads(body, **loads)
    except (ValueError, RecursionError) as exc:
        raise HTTPError(400, f"the body is not JSON: {exc}", code="invalid_json") from None


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise HTTPError(422, "the body must be a JSON object", code="invalid_type", param="body")
    return body


def _texts(value: Any, max_inputs: int) -> tuple[list[str], bool]:
    """``input`` as a list of texts, and whether it was one string."""
    single = isinstance(value, str)
    texts = [value] if single else value
    if not isinstance(texts, list):
        what = "missing" if value is None else f"a {type(value).__name__}"
        raise HTTPError(422, f"input must be a string or a list of strings, not {what}",
                        code="invalid_type", param="input")
    if not texts:
        raise HTTPError(400, "input is an empty list", code="empty_input", param="input")
    if len(texts) > max_inputs:
        raise HTTPError(413, f"input has {len(texts)} texts; at most {max_inputs} per request",
                        code="too_many_inputs", param="input")
    for i, text in enumerate(texts):
        param = "input" if single else f"input[{i}]"
        if not isinstance(text, str):
            hint = ("; token ids are not accepted (the model has its own tokenizer): send text "
                    "(LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))"
                    if isinstance(text, int | list) and not isinstance(text, bool) else "")
            raise HTTPError(422, f"{param} is a {type(text).__name__}, not a string{hint}",
                            code="invalid_type", param=param)
        if not text:
            raise HTTPError(400, f"{param} is an empty string", code="empty_input", param=param)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPError(422, f"{param} is not valid Unicode (a lone surrogate)",
                            code="invalid_value", param=param) from None
    return texts, single


def _bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HTTPError(422, f"{key} must be true or false", code="invalid_type", param=key)
    return value


def _authorize(request: Request, key: str | None) -> None:
    if not key:
        return  # no key: the server listens on loopback only
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode("latin-1")  # the header's own bytes
    if not (scheme.lower() == "bearer" and hmac.compare_digest(given, key.encode())):
        raise HTTPError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                        code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


# ---------------------------------------------------------------------------- embeddings


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()


async def _json(payload: Any, result: Embedding, big: bool) -> Response:
    # a few hundred vectors take milliseconds to write: keep that off the event loop
    body = await asyncio.to_thread(_dumps, payload) if big else _dumps(payload)
    return Response(body, media_type="application/json",
                    headers={TRUNCATED_HEADER: str(result.truncated)})


async def embed_supabase(request: Request) -> Response:
    service: Service = request.app.state.service
    _authorize(request, service.settings.api_key)
    body = _object(await _read_json(request, service.settings.max_body_bytes))
    emb = service.model(_optional_str(body, "model"))
    texts, single = _texts(body.get("input"), service.settings.max_inputs)
    result = await service.embed(
        emb, texts, mean_pool=_bool(body, "mean_pool", True),
        normalize=_bool(body, "normalize", True),
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
    _authorize(request, service.settings.api_key)
    body = _object(await _read_json(request, service.settings.max_body_bytes))
    emb = service.model(_optional_str(body, "model"))
    texts, _ = _texts(body.get("input"), service.settings.max_inputs)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise HTTPError(422, "encoding_format must be 'float' or 'base64'",
                        code="invalid_value", param="encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool)):
        raise HTTPError(422, "dimensions must be an integer", code="invalid_type",
                        param="dimensions")
    if dims is not None and dims != emb.dim:
        raise HTTPError(400, f"{emb.name} makes {emb.dim} dimensions; it cannot shorten them "
                        f"to {dims}", code="unsupported_dimensions", param="dimensions")
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
    _authorize(request, service.settings.api_key)
    # decimals kept as written: a numeric key 1.50 must stay "1.50", as ::text gives it
    body = _object(await _read_json(request, service.settings.max_body_bytes,
                                    parse_float=Decimal))
    op = body.get("type")
    if op not in ("INSERT", "UPDATE", "DELETE"):
        raise HTTPError(422, "type must be INSERT, UPDATE or DELETE", code="invalid_value",
                        param="type")
    schema, table = body.get("schema", "public"), body.get("table")
    for key, value in (("schema", schema), ("table", table)):
        if not isinstance(value, str) or not value:
            raise HTTPError(422, f"{key} must be a non-empty string", code="invalid_type",
                            param=key)
    row_key = "old_record" if op == "DELETE" else "record"
    row, old = body.get(row_key), body.get("old_record")
    if not isinstance(row, dict):
        raise HTTPError(422, f"{op} needs {row_key} (an object)", code="invalid_type",
                        param=row_key)
    if old is not None and not isinstance(old, dict):
        raise HTTPError(422, "old_record must be an object or null", code="invalid_type",
                        param="old_record")
    if service.pool is None:
        raise HTTPError(503, "no database configured: set DATABASE_URL to accept webhooks",
                        code="no_database", kind="server_error")
    try:
        async with service.pool.connection() as conn:
            watches = [
                Watch(**r) for r in await fetch_dicts(conn, q("watches"))
                if r["schema"] == schema and r["table_name"] == table
            ]
            if not watches:
                raise HTTPError(404, f"table {schema}.{table} is not watched "
                                f"(autoembed watch {schema}.{table} --column COLUMN)",
                                code="table_not_watched", param="table")
            keys = [await _pk_text(conn, w, row, row_key) for w in watches]
            queued = dropped = 0
            async with conn.transaction():
                for w, pk in zip(watches, keys, strict=True):
                    if op == "DELETE":
                        cur = await conn.execute(q("drop_jobs"), {"watch": w.id, "pks": [pk]})
                        dropped += max(cur.rowcount, 0)
                    elif _changed(op, w, row, old):
                        cur = await conn.execute(
                            q("enqueue"),
                            {"watch": w.id, "pks": [pk], "summary_column": w.summary_column},
                        )
                        queued += max(cur.rowcount, 0)
                        await conn.execute(q("notify"), {"payload": str(w.id)})
    except psycopg.errors.UndefinedTable as exc:
        raise HTTPError(503, "the autoembed schema is missing: run `autoembed migrate`",
                        code="no_schema", kind="server_error") from exc
    except DB_ERRORS as exc:
        raise HTTPError(503, f"database unavailable: {describe(exc)}", code="database_unavailable",
                        kind="server_error", headers={"Retry-After": "1"}) from exc
    return JSONResponse({"table": f"{schema}.{table}", "queued": queued, "dropped": dropped}, 202)


async def _pk_text(
    conn: psycopg.AsyncConnection[Any], watch: Watch, row: Mapping[str, Any], where: str
) -> str:
    """The row's key as ``pk::text`` gives it (the form the queue stores)."""
    param = f"{where}.{watch.pk_column}"
    value = row.get(watch.pk_column)
    if value is None or isinstance(value, dict | list):
        raise HTTPError(422, f"{param} must hold the row's primary key value",
                        code="invalid_value", param=param)
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    if isinstance(value, int) and not isinstance(value, bool) and watch.pk_type in _INT_TYPES:
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
        raise HTTPError(422, f"{param}: {describe(exc)}", code="invalid_value",
                        param=param) from None
    assert found is not None
    return str(found[0])


def _changed(op: str, watch: Watch, row: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    """Whether the triggers would queue this change: an INSERT with text, an UPDATE whose
    text (or key) changed. Where the payload cannot tell, queue: the worker reads the row."""
    new = row.get(watch.content_column, _MISSING)
    if op == "INSERT":
        return new is not None
    if old is None or new is _MISSING or watch.content_column not in old:
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
                rows = await fetch_dicts(conn, q("outstanding"),
                                         {"watches": ids, "lanes": ["embed", "summary"]})
            for status in ("pending", "running", "failed"):
                service.metrics.queue_depth.labels(status).set(rows[0][status])
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------------- the app


class _BatchingCollector(Collector):
    """The micro-batchers' counters: requests / engine calls is the batching factor."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "autoembed_http_embed_requests", "Embedding requests served", labels=["model"]
        )
        calls = CounterMetricFamily(
            "autoembed_http_engine_calls", "Engine calls those requests were merged into",
            labels=["model"],
        )
        for batcher in self.service.batchers.values():
            requests.add_metric([batcher.embedder.name], batcher.requests)
            calls.add_metric([batcher.embedder.name], batcher.calls)
        yield requests
        yield calls


class _CountRequests:
    """Counts requests by path and status in ``autoembed_http_requests``."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope["path"] if scope["path"] in PATHS else "other"
            self.metrics.http_requests.labels(path, str(status)).inc()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    return exc.response()


async def _starlette_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return HTTPError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return HTTPError(500, f"internal error: {type(exc).__name__}", code="internal_error",
                     kind="server_error").response()


def create_app(
    settings: Settings,
    embedder: Embedder,
    *,
    pool: AsyncConnectionPool[Any] | None = None,
    metrics: Metrics | None = None,
    engine_lock: asyncio.Lock | None = None,
    worker: Worker | None = None,
) -> Starlette:
    """The ASGI app. With ``worker``, its pool, metrics, engine lock and models are shared
    (and /healthz also checks its listener); otherwise ``pool`` (optional: only /webhook
    needs a database) and fresh metrics and lock."""
    if worker is not None:
        pool = pool or worker.pool
        metrics = metrics or worker.metrics
        engine_lock = engine_lock or worker.engine_lock
    metrics = metrics or Metrics()
    metrics.track(embedder.name, embedder.stats)
    service = Service(
        settings, embedder, pool=pool, metrics=metrics,
        engine_lock=engine_lock or asyncio.Lock(), worker=worker,
        embedders=worker.embedders if worker is not None else {},
    )

    collector = _BatchingCollector(service)
    metrics.registry.register(collector)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            metrics.registry.unregister(collector)
            await service.aclose()

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        HTTPError: _http_error, StarletteHTTPException: _starlette_error, Exception: _server_error,
    }
    app = Starlette(
        routes=[
            Route("/webhook", webhook, methods=["POST"]),
            Route("/embed", embed_supabase, methods=["POST"]),
            Route("/v1/embeddings", embed_openai, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics_page, methods=["GET"]),
        ],
        middleware=[Middleware(_CountRequests, metrics=metrics)],
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    app.state.service = service
    return app



# ---------------------------------------------------------------------------- serving


def listen_address(settings: Settings) -> tuple[str, int]:
    """HOST and PORT of ``settings.http``; without an API key only a loopback address."""
    text = settings.http or "127.0.0.1:8080"
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"cannot listen on {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    if not settings.api_key and not _loopback(host):
        raise ConfigError(
            f"refusing to listen on {text} without an API key: anyone who can reach it could "
            "embed and queue work. Set AUTOEMBED_API_KEY (clients then send Authorization: "
            "Bearer <key>), or listen on a loopback address such as 127.0.0.1"
        )
    return host, int(port_text)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals are ours (and the worker's): see serve() and serve_with_worker()


class HttpServer:
    """uvicorn serving ``app`` in the running event loop, on a socket bound here (so a
    busy port is a clear error, and port 0 picks a free one: see ``port``)."""

    def __init__(
        self, app: ASGIApp, host: str, port: int, *, shutdown_seconds: float = 30.0,
        sock: socket.socket | None = None,
    ) -> None:
        self.app, self.host = app, host
        self.sock = sock  # bound already (see bind()), or bound by start()
        self._port = port if sock is None else sock.getsockname()[1]
        self.shutdown_seconds = shutdown_seconds
        self.task: asyncio.Task[None] | None = None
        self.server: Any = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        sock = self.sock or bind(self.host, self._port)
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, ws="none", lifespan="on",
            server_header=False, timeout_graceful_shutdown=max(1, int(self.shutdown_seconds)),
        )
        self.server = _Uvicorn(config)
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]), name="http")
        while not self.server.started:
            if self.task.done():
                sock.close()
                await self.task  # raises what stopped it
                raise AutoembedError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    def request_stop(self, why: str | None = None) -> None:
        if why and self.server is not None and not self.server.should_exit:
            log.info("%s: stopping the HTTP server", why)
        if self.server is not None:
            self.server.should_exit = True

    async def wait(self) -> None:
        if self.task is not None:
            await self.task

    async def stop(self) -> None:
        self.request_stop()
        await self.wait()


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to HOST:PORT (not listening yet); ConfigError if that fails."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def _announce(server: HttpServer, settings: Settings, emb: Embedder) -> None:
    log.info("HTTP API on %s (model %s, %d dimensions, %s)", server.url, emb.name, emb.dim,
             emb.device)
    if settings.api_key:
        log.info("HTTP API: /webhook, /embed and /v1/embeddings need Authorization: Bearer <key>")
    else:
        log.warning("no AUTOEMBED_API_KEY set: the HTTP API has no authentication, so it "
                    "listens on loopback only (%s)", server.url)


async def serve(settings: Settings) -> int:
    """``autoembed serve``: the HTTP API alone, until SIGTERM or SIGINT. Returns 0."""
    host, port = listen_address(settings)
    sock = bind(host, port)  # a busy port fails now, not after loading the model
    try:
        emb = await asyncio.to_thread(
            Embedder.load, settings.model, device=settings.device,
            precision=settings.precision, threads=settings.threads,
        )
    except BaseException:
        sock.close()
        raise
    pool: AsyncConnectionPool[Any] | None = None
    if settings.database_url:
        pool = AsyncConnectionPool(
            settings.database_url, min_size=1, max_size=8, kwargs={"autocommit": True},
            configure=configure, open=False, timeout=10.0, name="autoembed-http",
        )
        await pool.open(wait=False)  # a database that is down now only fails /webhook
    loop = asyncio.get_running_loop()
    server = HttpServer(create_app(settings, emb, pool=pool), host, port,
                        shutdown_seconds=settings.shutdown_seconds, sock=sock)
    try:
        await server.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, server.request_stop, sig.name)
        _announce(server, settings, emb)
        await server.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        if pool is not None:
            await pool.close()
    log.info("HTTP server stopped")
    return 0


async def serve_with_worker(worker: Worker, settings: Settings) -> int:
    """``autoembed run --http``: the worker and the HTTP API in one event loop, sharing the
    pool, metrics, models and engine lock. When either ends (the queue drained, a signal,
    a failure) both stop; returns the worker's exit code."""
    host, port = listen_address(settings)
    sock = bind(host, port)
    spec = lookup(settings.model)
    name = spec.name if spec is not None else settings.model
    # loaded before the worker starts, so its watches find the model already there
    emb = await worker.embedder(name)
    if emb is None:
        # the default model is not here: serve the model the watches use, if one loads
        await worker.pool.open(wait=False)
        with contextlib.suppress(Exception):
            for watch in (await worker.queue.watches()).values():
                emb = await worker.embedder(watch.model)
                if emb is not None:
                    log.warning("%s is not available; the HTTP API serves %s, the model of %s",
                                name, watch.model, watch.label)
                    break
    if emb is None:
        sock.close()
        raise ModelError(worker.model_errors.get(name))
    await worker.pool.open(wait=False)  # idempotent: worker.run() opens it too
    worker_task = asyncio.create_task(worker.run(), name="worker")
    server = HttpServer(create_app(settings, emb, worker=worker), host, port,
                        shutdown_seconds=settings.shutdown_seconds, sock=sock)
    try:
        await server.start()
    except BaseException:
        worker.request_stop("the HTTP server did not start")
        with contextlib.suppress(Exception):
            await worker_task
        raise
    _announce(server, settings, emb)
    stopping = asyncio.create_task(worker.stop.wait(), name="worker-stop")
    assert server.task is not None
    await asyncio.wait({worker_task, server.task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    server.request_stop("worker stopping")
    if server.task.done() and not worker_task.done():
        worker.request_stop("HTTP server stopped")
    stopping.cancel()
    try:
        await server.wait()
    except Exception:
        log.exception("the HTTP server failed")
        worker.request_stop("HTTP server failed")
    return await worker_task
