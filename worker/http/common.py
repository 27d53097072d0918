"""What the HTTP endpoints share: the error type, the service object, request parsing
and authentication."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from ..batcher import Batcher, BatcherClosed, TextRejected
from ..config import Settings
from ..engine import Embedder, Embedding
from ..engine.registry import lookup
from ..errors import AutoembedError
from ..metrics import Metrics

if TYPE_CHECKING:
    from ..runner import Worker
    from .connections import ConnectionGuard

log = logging.getLogger(__name__)

TRUNCATED_HEADER = "X-Autoembed-Truncated"
PATHS = ("/webhook", "/embed", "/v1/embeddings", "/search", "/healthz", "/metrics")
DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, OSError)
MISSING = object()
OUTAGE_STATES = frozenset({"57P01", "57P02", "57P03"})  # admin / crash shutdown, cannot connect


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
        self.connections: ConnectionGuard | None = None  # set by the server that runs the app

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
            404,
            f"model {name!r} is not loaded here; this server has: {', '.join(served)}",
            code="model_not_found",
            param="model",
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
            raise HTTPError(
                503, "the server is shutting down", code="shutting_down", kind="server_error"
            ) from exc

    async def aclose(self) -> None:
        for batcher in self.batchers.values():
            await batcher.aclose()


# ---------------------------------------------------------------------------- request parsing


def require_json(request: Request) -> None:
    """415 unless the body is declared JSON: the one type a web page cannot send to
    another site without a CORS preflight (which this server does not answer)."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    structured = media.startswith("application/") and media.endswith("+json")
    if media != "application/json" and not structured:
        raise HTTPError(
            415,
            f"the body must be sent as Content-Type: application/json, not {media or 'none'}",
            code="unsupported_media_type",
        )


async def read_json(request: Request, limit: int, **loads: Any) -> Any:
    """The body as JSON (declared so: see ``require_json``), refused with 413 as soon as it
    passes ``limit`` bytes (whatever Content-Length said, or without one)."""
    require_json(request)
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
        raise HTTPError(
            400, "the client went away mid-request", code="client_disconnected"
        ) from None
    try:
        return json.loads(body, **loads)
    except (ValueError, RecursionError) as exc:
        raise HTTPError(400, f"the body is not JSON: {exc}", code="invalid_json") from None


def json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise HTTPError(422, "the body must be a JSON object", code="invalid_type", param="body")
    return body


def texts_of(value: Any, max_inputs: int) -> tuple[list[str], bool]:
    """``input`` as a list of texts, and whether it was one string."""
    single = isinstance(value, str)
    texts = [value] if single else value
    if not isinstance(texts, list):
        what = "missing" if value is None else f"a {type(value).__name__}"
        raise HTTPError(
            422,
            f"input must be a string or a list of strings, not {what}",
            code="invalid_type",
            param="input",
        )
    if not texts:
        raise HTTPError(400, "input is an empty list", code="empty_input", param="input")
    if len(texts) > max_inputs:
        raise HTTPError(
            413,
            f"input has {len(texts)} texts; at most {max_inputs} per request",
            code="too_many_inputs",
            param="input",
        )
    for i, text in enumerate(texts):
        param = "input" if single else f"input[{i}]"
        if not isinstance(text, str):
            hint = (
                "; token ids are not accepted (the model has its own tokenizer): send text "
                "(LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))"
                if isinstance(text, int | list) and not isinstance(text, bool)
                else ""
            )
            raise HTTPError(
                422,
                f"{param} is a {type(text).__name__}, not a string{hint}",
                code="invalid_type",
                param=param,
            )
        if not text:
            raise HTTPError(400, f"{param} is an empty string", code="empty_input", param=param)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPError(
                422,
                f"{param} is not valid Unicode (a lone surrogate)",
                code="invalid_value",
                param=param,
            ) from None
    return texts, single


def bool_of(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HTTPError(422, f"{key} must be true or false", code="invalid_type", param=key)
    return value


def authorize(request: Request, key: str | None) -> None:
    if not key:
        return  # no key: the server listens on loopback only
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode("latin-1")  # the header's own bytes
    if not (scheme.lower() == "bearer" and hmac.compare_digest(given, key.encode())):
        raise HTTPError(
            401,
            "missing or wrong API key: send Authorization: Bearer <key>",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
