"""Text generation over Ollama's own API or the OpenAI-compatible chat API.

``mode="ollama"`` speaks ``/api/generate`` (NDJSON streaming); ``mode="openai"`` speaks
``/v1/chat/completions`` (SSE streaming) as llamafile, llama.cpp's server, llama-cpp-python's
server and vLLM offer it.

Every generation is a streamed request, also :meth:`LLMClient.generate`: when autoembed gives
up on one (timeout, cancellation) it closes the connection, and the server stops generating
(Ollama, llama.cpp and llama-cpp-python do when their client goes away; a non-streamed request
would run to its end for nobody).

What each failure raises, after the client's own quick retries:

* :class:`LLMUnavailable`: the server could not be reached (connection refused, unknown host,
  connection reset before any answer) or answered HTTP 502/503 (not ready, loading a model).
* :class:`LLMTimeout`: the server was reached but did not finish within ``timeout``. Never
  retried: one request per call, abandoned (and so cancelled) at the deadline.
* :class:`LLMModelMissing`: the server does not have the model (see :meth:`require_model`).
* :class:`LLMRefused`: any other HTTP 4xx.
* :class:`LLMError`: anything else (HTTP 500, a malformed answer, a stream cut short).

Connection failures and HTTP 5xx are retried quickly (exponential backoff); the rest is not.
Bad options, hosts and modes raise :class:`ConfigError`; a bad prompt template
:class:`PromptError` (see :func:`check_template`).
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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
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

from .errors import (
    ConfigError,
    LLMError,
    LLMModelMissing,
    LLMRefused,
    LLMTimeout,
    LLMUnavailable,
    PromptError,
)

logger = logging.getLogger(__name__)

Mode = Literal["ollama", "openai"]
DEFAULT_HOST = "http://127.0.0.1:11434"
OLLAMA_DEFAULT_PORT = 11434
DEFAULT_SUMMARY_PROMPT = "Summarize the following text in one or two sentences.\n\n{content}"
_LIST_TIMEOUT = 30.0
_UNAVAILABLE_STATUS = (502, 503)  # a proxy without its upstream; a server still loading
_INTERRUPTED_HINT = (
    "llama-cpp-python's server cuts a stream short like this when another request arrives: "
    "start it with --interrupt_requests False"
)
_T = TypeVar("_T")


class _Transient(LLMError):
    """A failure worth a quick retry: the connection failed or broke, HTTP 5xx."""

    def __init__(self, message: str, *, unavailable: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable  # the server was not reached, or said it is not ready


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
    """Sampling options; names and defaults as Fermyon Spin's ``infer_with_options``.

    Invalid values raise :class:`ConfigError` (exit code 2): they are the caller's mistake.
    """

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
                    raise ConfigError(f"LLM option {f.name!r} must be an integer, got {value!r}")
            else:
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise ConfigError(f"LLM option {f.name!r} must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise ConfigError(f"LLM option {f.name!r} must be finite, got {value!r}")
                object.__setattr__(self, f.name, float(value))
            check, wanted = _CHECKS[f.name]
            if not check(value):
                raise ConfigError(f"LLM option {f.name!r} must be {wanted}, got {value!r}")

    @classmethod
    def from_mapping(cls, m: Mapping[str, object]) -> GenerateOptions:
        """Options from a config mapping; unknown keys and bad values raise ConfigError."""
        if not isinstance(m, Mapping):
            raise ConfigError(f"LLM options must be a mapping of name to value, got {m!r:.100}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in m if k not in known)
        if unknown:
            raise ConfigError(
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
        raise ConfigError(f"invalid LLM host {raw!r}: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"invalid LLM host {raw!r}: want http(s)://host[:port] or host:port")
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


@dataclass(frozen=True)
class _Field:
    literal: str
    name: str | None
    spec: str | None
    conversion: str | None


def _parse_template(template: str) -> list[_Field]:
    """The template's parts; PromptError for anything render_prompt could never fill."""
    if not isinstance(template, str):
        raise PromptError(f"prompt template must be text, got {template!r:.100}")
    try:
        parsed = [_Field(*part) for part in string.Formatter().parse(template)]
    except ValueError as exc:
        raise PromptError(
            f"prompt template is malformed ({exc}); write literal braces as {{{{ and }}}}"
        ) from exc
    for f in parsed:
        if f.name is None:
            continue
        where = f"prompt template placeholder {{{f.name}}}"
        if f.name == "" or f.name.isdigit():
            raise PromptError(f"{where} is positional; name a column, e.g. {{content}}")
        if any(c in f.name for c in ".[]"):
            raise PromptError(
                f"{where}: only whole column names can be used (no attribute or index access)"
            )
        if f.conversion not in (None, "s", "r", "a"):
            raise PromptError(f"{where}: unknown conversion !{f.conversion} (use !s, !r or !a)")
        if f.spec and ("{" in f.spec or "}" in f.spec):
            raise PromptError(f"{where}: nested placeholders in a format spec are not supported")
    return parsed


def check_template(template: str, columns: Sequence[str] | None = None) -> frozenset[str]:
    """The column names a prompt template uses; raises PromptError if it can never render.

    With ``columns`` (the table's columns) every placeholder must name one of them. Call it when
    a watch is created, so that a broken template is refused before any row is queued.
    """
    names = frozenset(f.name for f in _parse_template(template) if f.name is not None)
    if not names:
        raise PromptError(
            "prompt template uses no column, so every row would get the same summary; "
            "put the text in with a placeholder such as {content}"
        )
    if columns is not None:
        unknown = sorted(names - set(columns))
        if unknown:
            raise PromptError(
                f"prompt template placeholder(s) {', '.join('{' + n + '}' for n in unknown)} "
                f"name no column of the table; its columns: {', '.join(columns) or '(none)'}"
            )
    return names


def render_prompt(template: str, row: Mapping[str, object]) -> str:
    """Fill ``{column}`` placeholders from a table row; ``{{`` and ``}}`` are literal braces.

    Only whole column names are looked up (no attribute or index access); NULL renders as "".
    A template that cannot be filled raises PromptError (a ConfigError: retrying cannot help).
    """
    out: list[str] = []
    for f in _parse_template(template):
        out.append(f.literal)
        if f.name is None:
            continue
        if f.name not in row:
            columns = ", ".join(sorted(map(str, row))) or "(none)"
            raise PromptError(
                f"prompt template placeholder {{{f.name}}} names no column of the row; "
                f"available columns: {columns}"
            )
        value: object = "" if row[f.name] is None else row[f.name]
        if f.conversion == "r":
            value = repr(value)
        elif f.conversion == "a":
            value = ascii(value)
        try:
            out.append(format(value, f.spec or ""))
        except (TypeError, ValueError) as exc:
            raise PromptError(f"prompt template placeholder {{{f.name}}}: {exc}") from exc
    return "".join(out)


def _match_model(name: str, have: Sequence[str]) -> str | None:
    """The server's name for ``name``: exact, or Ollama's implicit ``:latest`` tag either way."""
    if name in have:
        return name
    base, _, tag = name.partition(":")
    if not tag and f"{name}:latest" in have:
        return f"{name}:latest"
    if tag == "latest" and base in have:
        return base
    return None


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
            raise ConfigError(f"unknown LLM mode {mode!r}; use 'ollama' or 'openai'")
        if retries < 0 or backoff < 0:
            raise ConfigError("LLM retries and backoff must not be negative")
        self.host = _normalize_host(host) if host else llm_host_from_env()
        self.mode: Mode = mode
        self.retries = retries  # quick retries after the first try (connection errors, 5xx)
        self.backoff = backoff
        self._who = f"the LLM server at {self.host}"
        self._http = httpx.AsyncClient(base_url=self.host, timeout=_LIST_TIMEOUT)
        self._warned_last_n = False

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def generate(
        self, model: str, prompt: str, options: GenerateOptions | None = None
    ) -> str:
        """The whole generated text.

        Streamed underneath, so that a request given up on stops on the server too. Connection
        failures and HTTP 5xx are retried quickly (no text has been handed out); a timeout is
        not: it raises LLMTimeout after one request.
        """
        o = options or GenerateOptions()
        path, body = self._payload(model, prompt, o)
        return await self._retried(lambda: self._generate_once(path, body, model, o.timeout))

    def stream(
        self, model: str, prompt: str, options: GenerateOptions | None = None
    ) -> AsyncIterator[str]:
        """Text pieces as the server sends them.

        Connection failures before the first piece are retried; after it they raise LLMError.
        The timeout covers the whole generation and is not retried. Close early with
        ``contextlib.aclosing``: the server then stops generating.
        """
        return self._stream(model, prompt, options or GenerateOptions())

    async def list_models(self) -> list[str]:
        """Names of the models the server has (``/api/tags`` or ``/v1/models``)."""
        path = "/api/tags" if self.mode == "ollama" else "/v1/models"
        data = await self._retried(lambda: self._request_json("GET", path, _LIST_TIMEOUT))
        key, field = ("models", "name") if self.mode == "ollama" else ("data", "id")
        try:
            return [str(m[field]) for m in data[key]]
        except (KeyError, TypeError) as exc:
            raise LLMError(
                f"{self.host}{path} answered in an unexpected shape: {data!r:.300}"
            ) from exc

    async def require_model(self, name: str) -> str:
        """The server's name for model ``name``; LLMModelMissing if it does not list it.

        Servers that serve one model whatever is asked (llama-cpp-python, llamafile) would
        otherwise answer with another model than the one configured. Ollama's ``name`` and
        ``name:latest`` are the same model.
        """
        have = await self.list_models()
        found = _match_model(name, have)
        if found is None:
            listed = ", ".join(have) or "none"
            raise LLMModelMissing(
                f"model {name!r} is not on the LLM server at {self.host}, which has: {listed}; "
                f"{self._how_to_get(name)}"
            )
        return found

    def _how_to_get(self, name: str) -> str:
        if self.mode == "ollama":
            return f"pull it there with `ollama pull {name}`, or use one of those names"
        return (
            "use one of those names, or serve it under that name (llama-cpp-python: "
            f"--model_alias {name}; llama.cpp's llama-server: --alias {name}; vLLM: "
            f"--served-model-name {name})"
        )

    def _payload(self, model: str, prompt: str, o: GenerateOptions) -> tuple[str, dict[str, Any]]:
        if self.mode == "ollama":  # every Spin option has an Ollama option of its own
            options = {
                "num_predict": o.max_tokens,
                "temperature": o.temperature,
                "top_k": o.top_k,
                "top_p": o.top_p,
                "repeat_penalty": o.repeat_penalty,
                "repeat_last_n": o.repeat_penalty_last_n_token_count,
            }
            body = {"model": model, "prompt": prompt, "stream": True, "options": options}
            return "/api/generate", body
        # OpenAI's own fields, then llama.cpp's extensions at the top level (llama-cpp-python
        # takes top_k and repeat_penalty; llama.cpp's llama-server and llamafile also
        # repeat_last_n; servers ignore fields they do not know).
        if o.repeat_penalty_last_n_token_count != 64 and not self._warned_last_n:
            self._warned_last_n = True
            logger.warning(
                "repeat_penalty_last_n_token_count is sent as repeat_last_n, which llama.cpp's "
                "llama-server and llamafile honour; llama-cpp-python ignores it (start it with "
                "--last_n_tokens_size instead), and so do vLLM and Ollama's OpenAI endpoint"
            )
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
            "max_tokens": o.max_tokens,
            "temperature": o.temperature,
            "top_p": o.top_p,
            "top_k": o.top_k,
            "repeat_penalty": o.repeat_penalty,
            "repeat_last_n": o.repeat_penalty_last_n_token_count,
        }
        return "/v1/chat/completions", body

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        n, of = state.attempt_number, self.retries
        logger.warning("LLM request failed (%s); retry %d of %d in %.2f s", exc, n, of, wait)

    async def _retried(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_exponential(multiplier=self.backoff, max=30),
            retry=retry_if_exception_type(_Transient),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for try_ in retrying:
                with try_:
                    return await attempt()
        except _Transient as exc:
            n = self.retries + 1
            message = f"{exc} (gave up after {n} attempt{'s' if n > 1 else ''})"
            raise (LLMUnavailable if exc.unavailable else LLMError)(message) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.contextmanager
    def _translated(
        self, limit: float, what: str = "answer", *, answered: bool = True
    ) -> Iterator[None]:
        """httpx and asyncio failures as LLMTimeout (final) or _Transient (retried).

        ``answered``: whether the server has begun its answer; a connection lost before that
        means the server is not there (a refusal or reset), after it that it broke midway.
        """
        try:
            yield
        except httpx.ConnectTimeout as exc:
            raise _Transient(
                f"could not connect to {self._who} within {limit:g} s; is it running? "
                "Set OLLAMA_HOST to point elsewhere",
                unavailable=True,
            ) from exc
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise LLMTimeout(
                f"{self._who} did not {what} within {limit:g} s (the timeout option)"
            ) from exc
        except httpx.ConnectError as exc:
            raise _Transient(
                f"could not connect to {self._who} ({exc}); is it running? "
                "Set OLLAMA_HOST to point elsewhere",
                unavailable=True,
            ) from exc
        except httpx.TransportError as exc:
            if not answered:
                raise _Transient(
                    f"{self._who} closed the connection without answering ({exc!r})",
                    unavailable=True,
                ) from exc
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
            raise LLMRefused(
                f"{self.host}{path} answered 404 ({text}); is this an {self.mode!r}-mode "
                f"server? Try mode={other!r}"
            )
        if code in _UNAVAILABLE_STATUS:
            raise _Transient(f"{self._who} is not ready (HTTP {code}: {text})", unavailable=True)
        if code >= 500:
            raise _Transient(f"{self._who} answered HTTP {code}: {text}")
        raise LLMRefused(f"{self._who} refused the request (HTTP {code}): {text}")

    async def _request_json(self, method: str, path: str, limit: float) -> Any:
        logger.debug("LLM %s %s%s", method, self.host, path)
        with self._translated(limit, answered=False):
            async with asyncio.timeout(limit):
                response = await self._http.request(method, path, timeout=limit)
        await self._check_status(response, None)
        try:
            return response.json()
        except ValueError as exc:
            raise LLMError(
                f"{self._who} sent a malformed answer (not JSON): {response.text[:200]!r}"
            ) from exc

    def _parse_line(self, line: str) -> tuple[str, bool]:
        """(text piece, done) of one NDJSON or SSE line."""
        payload = line.strip()
        if self.mode == "openai":
            if not payload.startswith("data:"):
                return "", False  # blank separators, comments, event:/id:/retry: fields
            payload = payload[5:].strip()
            if payload == "[DONE]":
                # The chunk with a finish_reason ends a whole answer before this.
                raise _Transient(
                    f"{self._who} ended the stream without a finish_reason, cutting the text "
                    f"short; {_INTERRUPTED_HINT}"
                )
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
        """Send the request and read up to the first piece of text."""
        deadline = asyncio.get_running_loop().time() + limit
        logger.debug("LLM POST %s%s (stream)", self.host, path)
        request = self._http.build_request("POST", path, json=body, timeout=limit)
        with self._translated(limit, answered=False):
            async with asyncio.timeout_at(deadline):
                response = await self._http.send(request, stream=True)
        try:
            with self._translated(limit):
                async with asyncio.timeout_at(deadline):
                    await self._check_status(response, model)
            lines = response.aiter_lines()
            first, done = await self._read_piece(lines, deadline, limit)
        except BaseException:
            await response.aclose()  # closing an unfinished stream makes the server stop
            raise
        return _OpenStream(response, lines, first, done, deadline)

    async def _generate_once(self, path: str, body: object, model: str, limit: float) -> str:
        opened = await self._open_stream(path, body, model, limit)
        parts, done = [opened.first], opened.done
        try:
            while not done:
                piece, done = await self._read_piece(opened.lines, opened.deadline, limit)
                parts.append(piece)
        finally:
            await opened.response.aclose()
        return "".join(parts)

    async def _stream(self, model: str, prompt: str, o: GenerateOptions) -> AsyncIterator[str]:
        path, body = self._payload(model, prompt, o)
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
