"""A stand-in for Ollama, which cannot run on the test machines.

:class:`OllamaStandIn` is a real HTTP server on 127.0.0.1 (a free port), a Starlette app served
by uvicorn in a background thread. It speaks Ollama's own API (``/api/generate``, ``/api/chat``,
``/api/tags``, ``/api/version``; NDJSON streaming or one JSON object) and the OpenAI-compatible
API that Ollama, llamafile, llama.cpp's server and vLLM offer (``/v1/chat/completions`` with SSE
streaming or not, ``/v1/models``), with the fields and error bodies Ollama's API docs give.

Its text is deterministic: ``"Summary:"`` followed by the first (up to 12) words of the prompt's
last paragraph, one word per streamed chunk, cut to ``num_predict`` / ``max_tokens`` words.

Faults, server-wide or per model (``set_faults(model=...)``; per-model settings win):

* ``slow``: seconds to sleep before answering (every request, also ``/api/tags``);
* ``word_delay``: seconds before each generated word (a non-streamed answer waits for all);
* ``drop``: the next N generation requests lose their connection after ``drop_after`` words
  (streamed) or half their body (not streamed);
* ``error500``: the next K requests answer HTTP 500, then the server recovers;
* ``error503``: the next K requests answer HTTP 503 as llama.cpp's server does while it loads
  its model ("Loading model");
* ``interrupt``: the next N streamed generations end early after ``drop_after`` words, the way
  llama-cpp-python's server cuts a stream when another request arrives (OpenAI API: ``[DONE]``
  with no ``finish_reason`` before it; Ollama API: the stream just ends, with no ``done``);
* ``stall``: the next N generations stop making progress after ``drop_after`` words (streamed)
  or at once (not streamed) until the client goes away (streamed) or the server stops;
* ``malformed``: the next N generation requests get a non-JSON chunk (after one good word when
  streamed) or a non-JSON body.

Every request is recorded (method, path, JSON body, monotonic receive and finish times) with
what the server generated for it: ``words`` generated, whether it ``completed`` the answer, and
whether it was ``abandoned`` (the client went away before the end: a streamed generation then
stops, as Ollama's and llama.cpp's do; a non-streamed one runs to its end, as theirs do)::

    with OllamaStandIn() as server:
        server.set_faults(error500=2)
        ...  # talk to server.url
        assert len(server.requests_to("/api/generate")) == 3
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

DEFAULT_MODELS = ("mistral:latest", "llama3.2:1b")
SUMMARY_WORDS = 12
_FOREVER = 3600.0  # a stall: ended by the client going away or the server stopping
_COUNTERS = ("drop", "error500", "error503", "interrupt", "malformed", "stall")


@dataclass
class Faults:
    slow: float = 0.0
    word_delay: float = 0.0
    drop: int = 0
    drop_after: int = 2
    error500: int = 0
    error503: int = 0
    interrupt: int = 0
    malformed: int = 0
    stall: int = 0


@dataclass
class RecordedRequest:
    method: str
    path: str
    body: Any  # the parsed JSON body, the raw text if it was not JSON, None if empty
    received_at: float  # time.monotonic()
    finished_at: float | None = None  # when the server finished (or gave up on) its answer
    words: int = 0  # words generated (streamed: sent) for this request
    completed: bool = False  # the whole answer was generated
    abandoned: bool = False  # the client went away before the end of a streamed answer


class _Dropped(Exception):
    """Raised inside a response body to make uvicorn close the connection midway."""


class _QuietDrops(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        seen: set[int] = set()
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            if isinstance(exc, _Dropped):
                return False
            if isinstance(exc, BaseExceptionGroup) and exc.subgroup(_Dropped) is not None:
                return False
            exc = exc.__cause__ or exc.__context__
        return True


def answer_words(prompt: str, limit: int | None = None) -> tuple[list[str], bool]:
    """The stand-in's answer to ``prompt`` as words, and whether ``limit`` cut it."""
    paragraphs = [p for p in prompt.split("\n\n") if p.strip()]
    words = ["Summary:", *(paragraphs[-1].split()[:SUMMARY_WORDS] if paragraphs else [])]
    if limit is None or limit < 0 or limit >= len(words):
        return words, False
    return words[:limit], True


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ndjson(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _sse(obj: object) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


class OllamaStandIn:
    """A protocol-faithful Ollama stand-in; ``with OllamaStandIn() as server: server.url``."""

    def __init__(self, models: Iterable[str] = DEFAULT_MODELS, port: int = 0) -> None:
        self.port = port  # 0: a free one; another: that one (a server "coming back")
        self.initial_models = list(models)
        self.models = list(self.initial_models)
        self._lock = threading.Lock()
        self._faults: dict[str | None, Faults] = {}
        self._requests: list[RecordedRequest] = []
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._startup_error: BaseException | None = None
        self._log_filter = _QuietDrops()
        self.url = ""
        post, get = ["POST"], ["GET"]
        self.app = Starlette(
            routes=[
                Route("/", self._root, methods=["GET", "HEAD"]),
                Route("/api/version", self._version, methods=get),
                Route("/api/tags", self._tags, methods=get),
                Route("/api/generate", self._generate, methods=post),
                Route("/api/chat", self._chat, methods=post),
                Route("/v1/models", self._v1_models, methods=get),
                Route("/v1/chat/completions", self._v1_chat, methods=post),
            ]
        )

    # -- control -----------------------------------------------------------------------------

    def start(self) -> OllamaStandIn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self._sock = sock
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            self.app, log_config=None, lifespan="off", http="h11", timeout_graceful_shutdown=2
        )
        self._server = uvicorn.Server(config)
        logging.getLogger("uvicorn.error").addFilter(self._log_filter)
        self._thread = threading.Thread(target=self._run, name="ollama-stand-in", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 5
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Ollama stand-in did not start: {self._startup_error!r}")
            time.sleep(0.002)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            if self._loop is not None and self._stopping is not None:
                with contextlib.suppress(RuntimeError):  # loop already closed
                    self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        logging.getLogger("uvicorn.error").removeFilter(self._log_filter)
        self._server = self._thread = self._sock = None

    def __enter__(self) -> OllamaStandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def set_faults(
        self,
        model: str | None = None,
        *,
        slow: float | None = None,
        word_delay: float | None = None,
        drop: int | None = None,
        drop_after: int | None = None,
        error500: int | None = None,
        error503: int | None = None,
        interrupt: int | None = None,
        malformed: int | None = None,
        stall: int | None = None,
    ) -> None:
        """Change the faults of one model (by the name requested) or of the whole server."""
        given = {"slow": slow, "word_delay": word_delay, "drop": drop, "drop_after": drop_after}
        given |= {"error500": error500, "error503": error503, "interrupt": interrupt}
        given |= {"malformed": malformed, "stall": stall}
        changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        with self._lock:
            self._faults[model] = dataclasses.replace(self._faults.get(model, Faults()), **changes)

    def reset(self) -> None:
        """Forget faults and recorded requests; restore the initial models."""
        with self._lock:
            self._faults.clear()
            self._requests.clear()
            self.models = list(self.initial_models)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    def settled(self) -> bool:
        """Whether every request received so far has been finished or given up on."""
        return all(r.finished_at is not None for r in self.requests)

    # -- server thread -----------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by start()
            self._startup_error = exc
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        assert self._server is not None and self._sock is not None
        await self._server.serve(sockets=[self._sock])

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self._stopping is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), seconds)

    def _resolve(self, name: str) -> str | None:
        if name in self.models:
            return name
        if ":" not in name and f"{name}:latest" in self.models:
            return f"{name}:latest"
        return None

    def _take(self, model: str | None, counters: Iterable[str] = _COUNTERS) -> Faults:
        """This request's faults: per-model settings over server-wide ones; counters count down.

        Only ``counters`` are counted down (a listing takes no generation faults).
        """
        with self._lock:
            scopes = [f for f in (self._faults.get(model), self._faults.get(None)) if f]
            took = Faults()
            for name in ("slow", "word_delay", "drop_after"):
                for scope in scopes:
                    if getattr(scope, name) != getattr(Faults, name):
                        setattr(took, name, getattr(scope, name))
                        break
            for name in counters:
                for scope in scopes:
                    if getattr(scope, name) > 0:
                        setattr(scope, name, getattr(scope, name) - 1)
                        setattr(took, name, 1)
                        break
            return took

    async def _record(self, request: Request) -> tuple[RecordedRequest, Any]:
        raw = await request.body()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        rec = RecordedRequest(request.method, request.url.path, body, time.monotonic())
        with self._lock:
            self._requests.append(rec)
        return rec, body

    # -- endpoints ---------------------------------------------------------------------------

    async def _root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def _version(self, request: Request) -> Response:
        return JSONResponse({"version": "0.6.5"})

    async def _listing(self, request: Request, openai: bool) -> Response:
        rec, _ = await self._record(request)
        faults = self._take(None, ("error500", "error503"))
        await self._sleep(faults.slow)
        rec.finished_at = time.monotonic()
        if faults.error500:
            return self._error(openai, 500, "stand-in: injected internal server error")
        if faults.error503:
            return self._error(openai, 503, "Loading model")
        if openai:
            data = [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "library"}
                for m in self.models
            ]
            return JSONResponse({"object": "list", "data": data})
        details = {"format": "gguf", "family": "llama", "quantization_level": "Q4_K_M"}
        models = [
            {
                "name": m,
                "model": m,
                "modified_at": "2024-01-01T00:00:00Z",
                "size": 1_000_000 + i,
                "digest": f"{i:064x}",
                "details": details,
            }
            for i, m in enumerate(self.models)
        ]
        return JSONResponse({"models": models})

    async def _tags(self, request: Request) -> Response:
        return await self._listing(request, openai=False)

    async def _v1_models(self, request: Request) -> Response:
        return await self._listing(request, openai=True)

    async def _generate(self, request: Request) -> Response:
        return await self._complete(request, "generate")

    async def _chat(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    async def _v1_chat(self, request: Request) -> Response:
        return await self._complete(request, "openai")

    @staticmethod
    def _error(openai: bool, status: int, message: str) -> Response:
        if openai:
            kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
            body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": None}}
        else:
            body = {"error": message}
        return JSONResponse(body, status_code=status)

    async def _complete(self, request: Request, api: str) -> Response:
        openai = api == "openai"
        rec, body = await self._record(request)
        if not isinstance(body, dict):
            return self._error(openai, 400, "invalid character in request body: not a JSON object")
        name = body.get("model")
        if not isinstance(name, str) or not name:
            return self._error(openai, 400, "model is required")
        options = body.get("options") if api != "openai" else body
        if not isinstance(options, dict):
            options = {}
        limit = options.get("num_predict") if not openai else body.get("max_tokens")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            key = "max_tokens" if openai else "num_predict"
            return self._error(openai, 400, f'option "{key}" must be of type integer')
        if api == "generate":
            prompt = body.get("prompt") or ""
        else:
            messages = body.get("messages") or []
            users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
            prompt = str(users[-1].get("content") or "") if users else ""
        faults = self._take(name)
        await self._sleep(faults.slow)
        if faults.error500:
            rec.finished_at = time.monotonic()
            return self._error(openai, 500, "stand-in: injected internal server error")
        if faults.error503:
            rec.finished_at = time.monotonic()
            return self._error(openai, 503, "Loading model")
        if self._resolve(name) is None:
            rec.finished_at = time.monotonic()
            return self._error(openai, 404, f'model "{name}" not found, try pulling it first')
        words, cut = answer_words(prompt, limit)
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        reason = "length" if cut else "stop"
        make = self._openai_chunks if openai else self._ollama_chunks
        stream = body.get("stream", not openai)  # Ollama streams by default, OpenAI does not
        if stream:
            chunks = make(api, name, pieces, reason, prompt, stream=True)
            media = "text/event-stream" if openai else "application/x-ndjson"
            content = self._stream_body(rec, chunks, faults, openai)
            return StreamingResponse(content, media_type=media)
        if faults.stall:
            await self._sleep(_FOREVER)
        await self._sleep(faults.word_delay * len(pieces))  # runs to its end, client or not
        rec.words, rec.completed = len(pieces), True
        payload = next(iter(make(api, name, pieces, reason, prompt, stream=False)))
        data = b"{not json" if faults.malformed else payload
        if not faults.drop:
            rec.finished_at = time.monotonic()
            return Response(data, media_type="application/json")
        headers = {"content-length": str(len(data))}

        async def half() -> AsyncIterator[bytes]:
            yield data[: len(data) // 2]
            rec.finished_at = time.monotonic()
            raise _Dropped

        return StreamingResponse(half(), media_type="application/json", headers=headers)

    async def _stream_body(
        self, rec: RecordedRequest, chunks: Iterable[bytes], faults: Faults, openai: bool
    ) -> AsyncIterator[bytes]:
        items = list(chunks)
        last = len(items) - (2 if openai else 1)  # the chunk that ends the answer
        ended = False  # by the server: finished, dropped or interrupted
        try:
            for i, chunk in enumerate(items):
                if faults.drop and i == faults.drop_after:
                    ended = True
                    raise _Dropped
                if faults.interrupt and i == faults.drop_after:
                    ended = True
                    if openai:
                        yield _sse(b"[DONE]")
                    return
                if faults.stall and i == faults.drop_after:
                    await self._sleep(_FOREVER)  # until the client leaves or the server stops
                if faults.malformed and i == 1:
                    yield _sse(b"{not json") if openai else b'{"response": "oops\n'
                    continue
                await self._sleep(faults.word_delay)  # "generating" the next word
                if i < last:
                    rec.words += 1
                # Set before the client can read the chunk that ends the answer (OpenAI: the
                # one with finish_reason, which precedes "[DONE]").
                if i == last:
                    rec.completed, ended = True, True
                    rec.finished_at = time.monotonic()
                yield chunk
        finally:
            # Cancelled by Starlette when the client disconnects: generation stops here.
            rec.abandoned = not ended
            if rec.finished_at is None:
                rec.finished_at = time.monotonic()

    def _ollama_chunks(
        self, api: str, model: str, pieces: list[str], reason: str, prompt: str, *, stream: bool
    ) -> Iterable[bytes]:
        def content(text: str) -> dict[str, Any]:
            if api == "chat":
                return {"message": {"role": "assistant", "content": text}}
            return {"response": text}

        stats: dict[str, Any] = {
            "done_reason": reason if prompt else "load",
            "total_duration": 123_456_789,
            "load_duration": 1_234_567,
            "prompt_eval_count": len(prompt.split()),
            "prompt_eval_duration": 2_345_678,
            "eval_count": len(pieces),
            "eval_duration": 98_765_432,
        }
        if api == "generate":
            stats["context"] = list(range(1, len(pieces) + 1))
        if not prompt:
            pieces = []
        if not stream:
            text = "".join(pieces)
            yield _ndjson(
                {"model": model, "created_at": _now(), **content(text), "done": True, **stats}
            )
            return
        for piece in pieces:
            yield _ndjson({"model": model, "created_at": _now(), **content(piece), "done": False})
        yield _ndjson({"model": model, "created_at": _now(), **content(""), "done": True, **stats})

    def _openai_chunks(
        self, api: str, model: str, pieces: list[str], reason: str, prompt: str, *, stream: bool
    ) -> Iterable[bytes]:
        head = {"id": "chatcmpl-42", "created": int(time.time()), "model": model}
        head["system_fingerprint"] = "fp_ollama"
        if not stream:
            message = {"role": "assistant", "content": "".join(pieces)}
            choice = {"index": 0, "message": message, "finish_reason": reason}
            n, m = len(prompt.split()), len(pieces)
            usage = {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}
            obj = {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
            yield json.dumps(obj).encode()
            return
        for piece in [*pieces, None]:
            delta = {"role": "assistant", "content": piece or ""}
            choice = {"index": 0, "delta": delta, "finish_reason": None if piece else reason}
            yield _sse({**head, "object": "chat.completion.chunk", "choices": [choice]})
        yield _sse(b"[DONE]")


class ResettingServer:
    """A TCP server on 127.0.0.1 that resets every connection before answering anything.

    What a client sees of a server that accepts and then dies, or of a proxy without its
    upstream: ``with ResettingServer() as srv: srv.url``; ``srv.connections`` counts them.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, name="resetting-server", daemon=True)

    def __enter__(self) -> ResettingServer:
        self._sock.listen(16)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed by __exit__
            self.connections += 1
            with contextlib.suppress(OSError):
                conn.recv(65536)  # the request's head: the client is waiting for an answer
                # linger 0: close() sends RST, not FIN ("connection reset by peer")
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()


def free_port_url() -> str:
    """The URL of a 127.0.0.1 port that nothing listens on (for connection-refused tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"
