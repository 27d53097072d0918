"""Text generation over Ollama's own API or the OpenAI-compatible chat API.

``mode="ollama"`` speaks ``/api/generate`` (NDJSON streaming); ``mode="openai"`` speaks
``/v1/chat/completions`` (SSE streaming) as llamafile, llama.cpp's server and vLLM offer it.
Connection failures, HTTP 5xx and timeouts are retried with exponential backoff; a missing
model and other 4xx answers are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import string
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from .errors import LLMError, LLMModelMissing, LLMTimeout

logger = logging.getLogger(__name__)

Mode = Literal["ollama", "openai"]
DEFAULT_HOST = "http://127.0.0.1:11434"
OLLAMA_DEFAULT_PORT = 11434
DEFAULT_SUMMARY_PROMPT = "Summarize the following text in one or two sentences.\n\n{content}"
_LIST_TIMEOUT = 30.0
_T = TypeVar("_T")


class _Transient(LLMError):
    """A failure worth retrying: connection refused or lost, HTTP 5xx."""


_CHECKS: dict[str, tuple[Callable[[float], bool], str]] = {
    "max_tokens": (lambda v: v >= 1, "at least 1"),
    "temperature": (lambda v: v >= 0, "at least 0"),
    "top_k": (lambda v: v >= 0, "at least 0 (0 disables top-k)"),
    "top_p": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "repeat_penalty": (lambda v: v > 0, "greater than 0"),
    "repeat_penalty_last_n_token_count": (lambda v: v >= -1, "at least -1 (-1: whole context)"),
    "timeout": (lambda v: v > 0, "greater than 0 (seconds)"),
}


@dataclass(frozen=True)
class GenerateOptions:
    """Sampling options; names and defaults as Fermyon Spin's ``infer_with_options``."""

    max_tokens: int = 100
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    repeat_penalty: float = 1.1
    repeat_penalty_last_n_token_count: int = 64
    timeout: float = 60.0  # seconds for the whole request (Supabase's ``timeout`` option)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise LLMError(f"LLM option {f.name!r} must be an integer, got {value!r}")
            else:
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise LLMError(f"LLM option {f.name!r} must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise LLMError(f"LLM option {f.name!r} must be finite, got {value!r}")
                object.__setattr__(self, f.name, float(value))
            check, wanted = _CHECKS[f.name]
            if not check(value):
                raise LLMError(f"LLM option {f.name!r} must be {wanted}, got {value!r}")

    @classmethod
    def from_mapping(cls, m: Mapping[str, object]) -> GenerateOptions:
        """Options from a config mapping; unknown keys and bad values raise LLMError."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in m if k not in known)
        if unknown:
            raise LLMError(
                f"unknown LLM option(s) {', '.join(map(repr, unknown))}; "
                f"known options: {', '.join(known)}"
            )
        changes: dict[str, Any] = dict(m)
        return cls(**changes)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _normalize_host(raw: str) -> str:
    value = raw.strip().rstrip("/")
    bare = "://" not in value
    if bare:  # Ollama accepts "host", "host:port" and ":port" without a scheme
        value = "http://" + (f"127.0.0.1{value}" if value.startswith(":") else value)
    parts = urllib.parse.urlsplit(value)
    try:
        port = parts.port
    except ValueError as exc:
        raise LLMError(f"invalid LLM host {raw!r}: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LLMError(f"invalid LLM host {raw!r}: want http(s)://host[:port] or host:port")
    if bare and port is None:
        value = f"{value}:{OLLAMA_DEFAULT_PORT}"
    return value


def llm_host_from_env(env: Mapping[str, str] | None = None) -> str:
    """OLLAMA_HOST, else Supabase's AI_INFERENCE_API_HOST, else http://127.0.0.1:11434."""
    source = os.environ if env is None else env
    for var in ("OLLAMA_HOST", "AI_INFERENCE_API_HOST"):
        value = (source.get(var) or "").strip()
        if value:
            return _normalize_host(value)
    return DEFAULT_HOST


def render_prompt(template: str, row: Mapping[str, object]) -> str:
    """Fill ``{column}`` placeholders from a table row; ``{{`` and ``}}`` are literal braces.

    Only whole column names are looked up (no attribute or index access); NULL renders as "".
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise LLMError(f"prompt template is malformed ({exc}); write braces as {{{{ }}}}") from exc
    out: list[str] = []
    for literal, name, spec, conversion in parsed:
        out.append(literal)
        if name is None:
            continue
        if name not in row:
            columns = ", ".join(sorted(map(str, row))) or "(none)"
            raise LLMError(
                f"prompt template placeholder {{{name}}} names no column of the row; "
                f"available columns: {columns}"
            )
        value: object = "" if row[name] is None else row[name]
        if conversion == "r":
            value = repr(value)
        elif conversion == "a":
            value = ascii(value)
        try:
            out.append(format(value, spec or ""))
        except (TypeError, ValueError) as exc:
            raise LLMError(f"prompt template placeholder {{{name}}}: {exc}") from exc
    return "".join(out)


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(data, dict):
        err = data.get("error", data.get("message", data.get("detail")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)
    return json.dumps(data)[:500]


@dataclass
class _OpenStream:
    response: httpx.Response
    lines: AsyncIterator[str]
    first: str
    done: bool
    deadline: float


class LLMClient:
    """Async client for one LLM server; use ``async with`` or call :meth:`aclose`."""

    def __init__(
        self,
        host: str | None = None,
        mode: Mode = "ollama",
        *,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        if mode not in ("ollama", "openai"):
            raise LLMError(f"unknown LLM mode {mode!r}; use 'ollama' or 'openai'")
        if retries < 0 or backoff < 0:
            raise LLMError("LLM retries and backoff must not be negative")
        self.host = _normalize_host(host) if host else llm_host_from_env()
        self.mode: Mode = mode
        self.retries = retries  # retries after the first attempt
        self.backoff = backoff
        self._who = f"the LLM server at {self.host}"
        self._http = httpx.AsyncClient(base_url=self.host, timeout=_LIST_TIMEOUT)

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def generate(
        self, model: str, prompt: str, options: GenerateOptions | None = None
    ) -> str:
        """The whole generated text (one non-streaming request, retried when transient)."""
        opts = options or GenerateOptions()
        path, body = self._payload(model, prompt, opts, stream=False)
        data = await self._retried(lambda: self._request_json("POST", path, body, model, opts))
        return self._text_of(data)

    def stream(
        self, model: str, prompt: str, options: GenerateOptions | None = None
    ) -> AsyncIterator[str]:
        """Text pieces as the server sends them.

        Failures before the first piece are retried; after it they raise LLMError. The timeout
        covers the whole generation. Close early with ``contextlib.aclosing``.
        """
        return self._stream(model, prompt, options or GenerateOptions())

    async def list_models(self) -> list[str]:
        """Names of the models the server has."""
        path = "/api/tags" if self.mode == "ollama" else "/v1/models"
        opts = GenerateOptions(timeout=_LIST_TIMEOUT)
        data = await self._retried(lambda: self._request_json("GET", path, None, None, opts))
        key, field = ("models", "name") if self.mode == "ollama" else ("data", "id")
        try:
            return [str(m[field]) for m in data[key]]
        except (KeyError, TypeError) as exc:
            raise LLMError(
                f"{self.host}{path} answered in an unexpected shape: {data!r:.300}"
            ) from exc

    def _payload(
        self, model: str, prompt: str, o: GenerateOptions, *, stream: bool
    ) -> tuple[str, dict[str, object]]:
        # Ollama's option names, which llama.cpp's server also takes at the top level.
        sampling = {"temperature": o.temperature, "top_k": o.top_k, "top_p": o.top_p}
        sampling |= {"repeat_penalty": o.repeat_penalty}
        sampling |= {"repeat_last_n": o.repeat_penalty_last_n_token_count}
        if self.mode == "ollama":
            options = {"num_predict": o.max_tokens, **sampling}
            body = {"model": model, "prompt": prompt, "stream": stream, "options": options}
            return "/api/generate", body
        messages = [{"role": "user", "content": prompt}]
        body = {"model": model, "messages": messages, "max_tokens": o.max_tokens, **sampling}
        return "/v1/chat/completions", {**body, "stream": stream}

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        n, of = state.attempt_number, self.retries
        logger.warning("LLM request failed (%s); retry %d of %d in %.2f s", exc, n, of, wait)

    async def _retried(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_exponential(multiplier=self.backoff, max=30),
            retry=retry_if_exception_type((_Transient, LLMTimeout)),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for try_ in retrying:
                with try_:
                    return await attempt()
        except (_Transient, LLMTimeout) as exc:
            n = self.retries + 1
            message = f"{exc} (gave up after {n} attempt{'s' if n > 1 else ''})"
            raise (LLMTimeout if isinstance(exc, LLMTimeout) else LLMError)(message) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.contextmanager
    def _translated(self, limit: float, what: str = "answer") -> Iterator[None]:
        """httpx and asyncio failures as LLMTimeout or _Transient (both retried)."""
        try:
            yield
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise LLMTimeout(f"{self._who} did not {what} within {limit:g} s") from exc
        except httpx.ConnectError as exc:
            raise _Transient(
                f"could not connect to {self._who} ({exc}); is it running? "
                "Set OLLAMA_HOST to point elsewhere"
            ) from exc
        except httpx.TransportError as exc:
            raise _Transient(f"lost the connection to {self._who} midway ({exc!r})") from exc

    async def _check_status(self, response: httpx.Response, model: str | None) -> None:
        if response.status_code < 400:
            return
        with self._translated(_LIST_TIMEOUT):
            await response.aread()
        code, text = response.status_code, _error_text(response)
        path = response.request.url.path
        if code == 404 and model is not None and ("model" in text.lower() or model in text):
            where = "" if self.mode == "ollama" else ", or load it into your llamafile/vLLM server"
            raise LLMModelMissing(
                f"model {model!r} is not on the LLM server at {self.host} ({text}); "
                f"pull it there with `ollama pull {model}`{where}"
            )
        if code == 404:
            other = "openai" if self.mode == "ollama" else "ollama"
            raise LLMError(
                f"{self.host}{path} answered 404 ({text}); is this an {self.mode!r}-mode "
                f"server? Try mode={other!r}"
            )
        if code >= 500:
            raise _Transient(f"{self._who} answered HTTP {code}: {text}")
        raise LLMError(f"{self._who} refused the request (HTTP {code}): {text}")

    async def _request_json(
        self, method: str, path: str, body: object, model: str | None, o: GenerateOptions
    ) -> Any:
        logger.debug("LLM %s %s%s", method, self.host, path)
        with self._translated(o.timeout):
            async with asyncio.timeout(o.timeout):
                response = await self._http.request(method, path, json=body, timeout=o.timeout)
        await self._check_status(response, model)
        try:
            return response.json()
        except ValueError as exc:
            raise LLMError(
                f"{self._who} sent a malformed answer (not JSON): {response.text[:200]!r}"
            ) from exc

    def _text_of(self, data: Any) -> str:
        try:
            if isinstance(data, dict) and "error" in data:
                raise LLMError(f"{self._who} reported: {data['error']}")
            text = (
                data["response"]
                if self.mode == "ollama"
                else data["choices"][0]["message"]["content"]
            )
        except (KeyError, IndexError, TypeError) as exc:
            raise LLMError(f"{self._who} answered in an unexpected shape: {data!r:.300}") from exc
        if not isinstance(text, str):
            raise LLMError(f"{self._who} answered a non-text response: {text!r:.200}")
        return text

    def _parse_line(self, line: str) -> tuple[str, bool]:
        """(text piece, done) of one NDJSON or SSE line."""
        payload = line.strip()
        if self.mode == "openai":
            if not payload.startswith("data:"):
                return "", False  # blank separators, comments, event:/id:/retry: fields
            payload = payload[5:].strip()
            if payload == "[DONE]":
                return "", True
        if not payload:
            return "", False
        try:
            obj = json.loads(payload)
            if not isinstance(obj, dict):
                raise TypeError(type(obj).__name__)
        except (ValueError, TypeError) as exc:
            raise LLMError(
                f"{self._who} sent a malformed stream chunk (not a JSON object): {payload[:200]!r}"
            ) from exc
        if "error" in obj:
            raise LLMError(f"{self._who} reported mid-stream: {obj['error']}")
        try:
            if self.mode == "ollama":
                piece, done = obj.get("response") or "", bool(obj.get("done"))
            else:
                choice = obj["choices"][0] if obj.get("choices") else {}
                piece = (choice.get("delta") or {}).get("content") or ""
                done = choice.get("finish_reason") is not None
        except (KeyError, IndexError, AttributeError) as exc:
            raise LLMError(f"{self._who} sent an unexpected chunk: {obj!r:.200}") from exc
        if not isinstance(piece, str):
            raise LLMError(f"{self._who} sent a non-text piece: {piece!r:.200}")
        return piece, done

    async def _read_piece(
        self, lines: AsyncIterator[str], deadline: float, limit: float
    ) -> tuple[str, bool]:
        while True:
            try:
                with self._translated(limit, "finish the generation"):
                    async with asyncio.timeout_at(deadline):
                        line = await anext(lines)
            except StopAsyncIteration:
                raise _Transient(f"{self._who} ended the stream before it was done") from None
            piece, done = self._parse_line(line)
            if piece or done:
                return piece, done

    async def _open_stream(self, path: str, body: object, model: str, limit: float) -> _OpenStream:
        """Send the request and read up to the first piece of text (the retried part)."""
        deadline = asyncio.get_running_loop().time() + limit
        logger.debug("LLM POST %s%s (stream)", self.host, path)
        request = self._http.build_request("POST", path, json=body, timeout=limit)
        with self._translated(limit):
            async with asyncio.timeout_at(deadline):
                response = await self._http.send(request, stream=True)
        try:
            with self._translated(limit):
                async with asyncio.timeout_at(deadline):
                    await self._check_status(response, model)
            lines = response.aiter_lines()
            first, done = await self._read_piece(lines, deadline, limit)
        except BaseException:
            await response.aclose()
            raise
        return _OpenStream(response, lines, first, done, deadline)

    async def _stream(self, model: str, prompt: str, o: GenerateOptions) -> AsyncIterator[str]:
        path, body = self._payload(model, prompt, o, stream=True)
        opened = await self._retried(lambda: self._open_stream(path, body, model, o.timeout))
        piece, done, sent = opened.first, opened.done, 0
        try:
            while True:
                if piece:
                    yield piece
                    sent += 1
                if done:
                    return
                try:
                    piece, done = await self._read_piece(opened.lines, opened.deadline, o.timeout)
                except _Transient as exc:
                    raise LLMError(
                        f"{exc} after {sent} piece(s) of text; not retried because text was "
                        "already delivered"
                    ) from exc
        finally:
            await opened.response.aclose()
