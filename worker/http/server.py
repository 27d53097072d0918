"""Serving: the listening address, uvicorn inside our event loop, `autoembed serve` and
`autoembed run --http`."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from psycopg_pool import AsyncConnectionPool
from starlette.types import ASGIApp

from ..config import Settings
from ..db import session_pool
from ..engine import Embedder
from ..engine.registry import lookup
from ..errors import AutoembedError, ConfigError, ModelError

if TYPE_CHECKING:
    from ..runner import Worker
from .app import create_app
from .common import Service
from .connections import ConnectionGuard, Limits, fd_budget, throttle_accept_errors
from .hosts import HostPolicy

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- serving


def listen_address(settings: Settings) -> tuple[str, int]:
    """HOST and PORT of ``settings.http``; without an API key only a loopback address.
    ConfigError for that, and for Host/Origin settings that are not valid (checked here
    too, so that they fail before a model is loaded)."""
    HostPolicy.from_settings(settings)
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


def limits_of(settings: Settings) -> Limits:
    return Limits(
        header_timeout=settings.http_header_timeout,
        body_timeout=settings.http_body_timeout,
        max_connections=settings.http_max_connections,
    )


class HttpServer:
    """uvicorn serving ``app`` in the running event loop, on a socket bound here (so a
    busy port is a clear error, and port 0 picks a free one: see ``port``), with the
    connection limits of ``limits`` (see connections.py; ``guard`` once started)."""

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        *,
        shutdown_seconds: float = 30.0,
        sock: socket.socket | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.app, self.host = app, host
        self.limits = limits or Limits()
        self.guard: ConnectionGuard | None = None
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
        cap, backlog = fd_budget(self.limits.max_connections)
        self.guard = guard = ConnectionGuard(self.limits, cap)
        service = getattr(getattr(self.app, "state", None), "service", None)
        if isinstance(service, Service):
            service.connections = guard  # for /metrics
        config = uvicorn.Config(
            self.app,
            http=guard.protocol(),
            backlog=backlog,
            log_config=None,
            access_log=False,
            ws="none",
            lifespan="on",
            server_header=False,
            timeout_graceful_shutdown=max(1, int(self.shutdown_seconds)),
        )
        self.server = _Uvicorn(config)
        undo = throttle_accept_errors(asyncio.get_running_loop(), guard.throttle)
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]), name="http")
        self.task.add_done_callback(lambda _: undo())
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
    log.info(
        "HTTP API on %s (model %s, %d dimensions, %s)", server.url, emb.name, emb.dim, emb.device
    )
    if server.guard is not None:
        limits = server.guard.limits
        log.info(
            "HTTP limits: request headers within %g s, bodies within %g s, %d connections",
            limits.header_timeout,
            limits.body_timeout,
            server.guard.cap,
        )
    if settings.api_key:
        log.info("HTTP API: /webhook, /embed and /v1/embeddings need Authorization: Bearer <key>")
    else:
        log.warning(
            "no AUTOEMBED_API_KEY set: the HTTP API has no authentication, so it "
            "listens on loopback only (%s)",
            server.url,
        )


async def serve(settings: Settings) -> int:
    """``autoembed serve``: the HTTP API alone, until SIGTERM or SIGINT. Returns 0."""
    host, port = listen_address(settings)
    sock = bind(host, port)  # a busy port fails now, not after loading the model
    try:
        emb = await asyncio.to_thread(
            Embedder.load,
            settings.model,
            device=settings.device,
            precision=settings.precision,
            threads=settings.threads,
        )
    except BaseException:
        sock.close()
        raise
    pool: AsyncConnectionPool[Any] | None = None
    if settings.database_url:
        # the worker's session set-up: the webhook's statements resolve only what they
        # mean to, whatever another role created in a schema on the default search_path
        pool = session_pool(settings.database_url, max_size=8, name="autoembed-http")
        await pool.open(wait=False)  # a database that is down now only fails /webhook
    loop = asyncio.get_running_loop()
    server = HttpServer(
        create_app(settings, emb, pool=pool),
        host,
        port,
        shutdown_seconds=settings.shutdown_seconds,
        sock=sock,
        limits=limits_of(settings),
    )
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
                    log.warning(
                        "%s is not available; the HTTP API serves %s, the model of %s",
                        name,
                        watch.model,
                        watch.label,
                    )
                    break
    if emb is None:
        sock.close()
        raise ModelError(worker.model_errors.get(name))
    await worker.pool.open(wait=False)  # idempotent: worker.run() opens it too
    worker_task = asyncio.create_task(worker.run(), name="worker")
    server = HttpServer(
        create_app(settings, emb, worker=worker),
        host,
        port,
        shutdown_seconds=settings.shutdown_seconds,
        sock=sock,
        limits=limits_of(settings),
    )
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
