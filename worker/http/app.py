"""The Starlette application: routes, middleware, error handlers, lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Settings
from ..engine import Embedder
from ..metrics import Metrics

if TYPE_CHECKING:
    from ..runner import Worker
from .common import PATHS, HTTPError, Service
from .hosts import HostGuard, HostPolicy
from .routes import embed_openai, embed_supabase, healthz, metrics_page
from .search import search_route
from .webhook import webhook

log = logging.getLogger(__name__)


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
            "autoembed_http_engine_calls",
            "Engine calls those requests were merged into",
            labels=["model"],
        )
        for batcher in self.service.batchers.values():
            requests.add_metric([batcher.embedder.name], batcher.requests)
            calls.add_metric([batcher.embedder.name], batcher.calls)
        yield requests
        yield calls
        guard = self.service.connections
        if guard is not None:  # served by HttpServer: its connection limits
            closed = CounterMetricFamily(
                "autoembed_http_connections_closed",
                "HTTP connections the server closed: header_timeout, body_timeout, evicted "
                "(the oldest unfinished one, at the connection limit), refused (all busy)",
                labels=["reason"],
            )
            for reason in ("header_timeout", "body_timeout", "evicted", "refused"):
                closed.add_metric([reason], guard.closed[reason])
            yield closed
            yield GaugeMetricFamily(
                "autoembed_http_open_connections", "Open HTTP connections", len(guard.open)
            )


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
    return HTTPError(
        500, f"internal error: {type(exc).__name__}", code="internal_error", kind="server_error"
    ).response()


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
    needs a database) and fresh metrics and lock. ConfigError for Host/Origin settings
    that are not valid (see hosts.py)."""
    policy = HostPolicy.from_settings(settings)
    if worker is not None:
        pool = pool or worker.pool
        metrics = metrics or worker.metrics
        engine_lock = engine_lock or worker.engine_lock
    metrics = metrics or Metrics()
    metrics.track(embedder.name, embedder.stats)
    service = Service(
        settings,
        embedder,
        pool=pool,
        metrics=metrics,
        engine_lock=engine_lock or asyncio.Lock(),
        worker=worker,
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
        HTTPError: _http_error,
        StarletteHTTPException: _starlette_error,
        Exception: _server_error,
    }
    app = Starlette(
        routes=[
            Route("/webhook", webhook, methods=["POST"]),
            Route("/embed", embed_supabase, methods=["POST"]),
            Route("/v1/embeddings", embed_openai, methods=["POST"]),
            Route("/search", search_route, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics_page, methods=["GET"]),
        ],
        middleware=[
            Middleware(_CountRequests, metrics=metrics),
            Middleware(HostGuard, policy=policy),
        ],
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    app.state.service = service
    return app
