"""autoembed.llm against the Ollama stand-in (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import httpx
import pytest

# The project is not installed into the virtualenv: import it (and tests.fakes) from the checkout.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from autoembed.errors import (  # noqa: E402
    ConfigError,
    LLMError,
    LLMModelMissing,
    LLMRefused,
    LLMTimeout,
    LLMUnavailable,
    PromptError,
)
from autoembed.llm import (  # noqa: E402
    DEFAULT_SUMMARY_PROMPT,
    GenerateOptions,
    LLMClient,
    check_template,
    llm_host_from_env,
    render_prompt,
)

from tests.fakes.ollama import (  # noqa: E402
    OllamaStandIn,
    ResettingServer,
    answer_words,
    free_port_url,
)

MODES: list[Literal["ollama", "openai"]] = ["ollama", "openai"]
PROMPT = "Summarize this.\n\nPostgres keeps embeddings next to the rows they describe"
EXPECTED = "Summary: Postgres keeps embeddings next to the rows they describe"
GEN_PATH = {"ollama": "/api/generate", "openai": "/v1/chat/completions"}
FAST = GenerateOptions(timeout=5.0)


@pytest.fixture(scope="module")
def stand_in() -> Iterator[OllamaStandIn]:
    with OllamaStandIn() as server:
        yield server


@pytest.fixture
def server(stand_in: OllamaStandIn) -> OllamaStandIn:
    stand_in.reset()
    return stand_in


def client(server: OllamaStandIn, mode: Literal["ollama", "openai"], retries: int = 3) -> LLMClient:
    return LLMClient(server.url, mode, retries=retries, backoff=0.01)


async def until(predicate: Callable[[], bool], what: str, deadline: float = 60.0) -> None:
    """Wait for an event the server records (never for a fixed time)."""
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"not seen within {deadline:g} s: {what}")
        await asyncio.sleep(0.01)


# -- happy paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_generate(server: OllamaStandIn, mode: Literal["ollama", "openai"]) -> None:
    async with client(server, mode) as llm:
        text = await llm.generate("mistral", PROMPT, FAST)
    assert text == EXPECTED
    (req,) = server.requests_to(GEN_PATH[mode])
    assert req.body["stream"] is True  # streamed underneath, so that it can be cancelled
    assert req.body["model"] == "mistral"
    assert req.completed and not req.abandoned


@pytest.mark.parametrize("mode", MODES)
async def test_stream_yields_pieces_incrementally(
    server: OllamaStandIn, mode: Literal["ollama", "openai"]
) -> None:
    # The server stops making progress after two words: those reach us all the same, while the
    # server is still generating; and closing the stream makes the server stop.
    server.set_faults(stall=1, drop_after=2)
    pieces: list[str] = []
    async with client(server, mode) as llm:
        async with contextlib.aclosing(llm.stream("mistral", PROMPT, FAST)) as stream:
            async for piece in stream:
                pieces.append(piece)
                if len(pieces) == 2:
                    (req,) = server.requests_to(GEN_PATH[mode])
                    assert not req.completed and req.finished_at is None
                    break
        await until(server.settled, "the server noticing the client left")
    assert pieces == ["Summary:", " Postgres"]
    (req,) = server.requests_to(GEN_PATH[mode])
    assert req.body["stream"] is True
    assert req.abandoned and not req.completed and req.words == 2


@pytest.mark.parametrize("mode", MODES)
async def test_list_models(server: OllamaStandIn, mode: Literal["ollama", "openai"]) -> None:
    async with client(server, mode) as llm:
        assert await llm.list_models() == ["mistral:latest", "llama3.2:1b"]
    path = "/api/tags" if mode == "ollama" else "/v1/models"
    assert len(server.requests_to(path)) == 1


@pytest.mark.parametrize("mode", MODES)
async def test_require_model(server: OllamaStandIn, mode: Literal["ollama", "openai"]) -> None:
    server.models = ["mistral:latest", "llama3.2:1b", "smollm2"]
    async with client(server, mode) as llm:
        assert await llm.require_model("mistral") == "mistral:latest"  # Ollama's implicit tag
        assert await llm.require_model("mistral:latest") == "mistral:latest"
        assert await llm.require_model("smollm2:latest") == "smollm2"
        assert await llm.require_model("llama3.2:1b") == "llama3.2:1b"
        with pytest.raises(LLMModelMissing) as info:
            await llm.require_model("qwen2:7b")
        with pytest.raises(LLMModelMissing):
            await llm.require_model("llama3.2")  # :latest is not :1b
    message = str(info.value)
    assert "'qwen2:7b'" in message and server.url in message
    assert "has: mistral:latest, llama3.2:1b, smollm2" in message
    hint = "ollama pull qwen2:7b" if mode == "ollama" else "--model_alias qwen2:7b"
    assert hint in message
    assert isinstance(info.value, LLMError) and info.value.exit_code == 5
    assert server.requests_to(GEN_PATH[mode]) == []  # nothing was generated to find out


async def test_require_model_on_a_server_that_lists_none(server: OllamaStandIn) -> None:
    server.models = []
    async with client(server, "openai") as llm:
        with pytest.raises(LLMModelMissing, match="which has: none"):
            await llm.require_model("smollm2")


async def test_options_sent_in_ollama_field_names(server: OllamaStandIn) -> None:
    opts = GenerateOptions(
        max_tokens=3,
        temperature=0.2,
        top_k=5,
        top_p=0.5,
        repeat_penalty=1.3,
        repeat_penalty_last_n_token_count=32,
        timeout=5,
    )
    async with client(server, "ollama") as llm:
        text = await llm.generate("mistral", PROMPT, opts)
    assert text == "Summary: Postgres keeps"  # num_predict honoured as a word limit
    (req,) = server.requests_to("/api/generate")
    assert req.body["options"] == {
        "num_predict": 3,
        "temperature": 0.2,
        "top_k": 5,
        "top_p": 0.5,
        "repeat_penalty": 1.3,
        "repeat_last_n": 32,
    }
    assert req.body["prompt"] == PROMPT
    assert "max_tokens" not in req.body and "timeout" not in req.body["options"]


async def test_options_sent_in_openai_field_names(
    server: OllamaStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    opts = GenerateOptions(max_tokens=2, temperature=0.0, top_k=7, top_p=1.0, timeout=5)
    async with client(server, "openai") as llm:
        pieces = [p async for p in llm.stream("llama3.2:1b", PROMPT, opts)]
    assert "".join(pieces) == "Summary: Postgres"
    (req,) = server.requests_to("/v1/chat/completions")
    body = req.body
    assert body["messages"] == [{"role": "user", "content": PROMPT}]
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (2, 0.0, 1.0)
    assert (body["top_k"], body["repeat_penalty"], body["repeat_last_n"]) == (7, 1.1, 64)
    assert "options" not in body and "num_predict" not in body
    assert "repeat_last_n" not in caplog.text  # the default is every server's default


async def test_openai_mode_warns_that_repeat_last_n_may_be_ignored(
    server: OllamaStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    opts = GenerateOptions(repeat_penalty_last_n_token_count=8, timeout=5)
    with caplog.at_level(logging.WARNING, logger="autoembed.llm"):
        async with client(server, "openai") as llm:
            await llm.generate("mistral", PROMPT, opts)
            await llm.generate("mistral", PROMPT, opts)
    warnings = [r for r in caplog.records if "repeat_last_n" in r.getMessage()]
    assert len(warnings) == 1  # once per client
    assert "--last_n_tokens_size" in warnings[0].getMessage()
    assert [r.body["repeat_last_n"] for r in server.requests_to("/v1/chat/completions")] == [8, 8]


# -- faults --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_slow_answer_times_out_once(
    server: OllamaStandIn, mode: Literal["ollama", "openai"]
) -> None:
    server.set_faults(slow=30.0)
    async with client(server, mode, retries=3) as llm:
        with pytest.raises(LLMTimeout, match=r"within 1\.5 s") as info:
            await llm.generate("mistral", PROMPT, GenerateOptions(timeout=1.5))
    assert "gave up" not in str(info.value)
    assert info.value.exit_code == 5
    # one request: the server was there, only slow, and retrying would double its load
    assert len(server.requests_to(GEN_PATH[mode])) == 1


@pytest.mark.parametrize("mode", MODES)
async def test_timeout_cancels_the_generation_on_the_server(
    server: OllamaStandIn, mode: Literal["ollama", "openai"]
) -> None:
    # The server sends two words, then generates no more: the client's deadline passes while
    # the server is mid-answer. Giving up must close the connection (so the server stops) and
    # not send the prompt again.
    server.set_faults(stall=1, drop_after=2)
    async with client(server, mode, retries=3) as llm:
        with pytest.raises(LLMTimeout, match="finish the generation|answer"):
            await llm.generate("mistral", PROMPT, GenerateOptions(timeout=1.5))
        await until(server.settled, "the server noticing the client left")
        assert await llm.generate("mistral", PROMPT, FAST) == EXPECTED  # the server still serves
    first, second = server.requests_to(GEN_PATH[mode])
    assert first.abandoned and not first.completed and first.words <= 2
    assert second.completed


async def test_stream_timeout_covers_the_whole_generation(server: OllamaStandIn) -> None:
    # The first words come, then the server stalls: the timeout ends the whole generation.
    server.set_faults(stall=1, drop_after=2)
    pieces: list[str] = []
    async with client(server, "ollama") as llm:
        with pytest.raises(LLMTimeout, match=r"within 1\.5 s"):
            async for piece in llm.stream("mistral", PROMPT, GenerateOptions(timeout=1.5)):
                pieces.append(piece)
        await until(server.settled, "the server noticing the client left")
    assert pieces == ["Summary:", " Postgres"][: len(pieces)]
    (req,) = server.requests_to("/api/generate")  # not retried
    assert req.abandoned


@pytest.mark.parametrize("mode", MODES)
async def test_dropped_connection_is_retried(
    server: OllamaStandIn, mode: Literal["ollama", "openai"]
) -> None:
    server.set_faults(drop=1)
    async with client(server, mode) as llm:
        assert await llm.generate("mistral", PROMPT, FAST) == EXPECTED
    assert len(server.requests_to(GEN_PATH[mode])) == 2


async def test_stream_drop_before_any_text_is_retried(server: OllamaStandIn) -> None:
    server.set_faults(drop=1, drop_after=0)
    async with client(server, "openai") as llm:
        pieces = [p async for p in llm.stream("mistral", PROMPT, FAST)]
    assert "".join(pieces) == EXPECTED
    assert len(server.requests_to("/v1/chat/completions")) == 2


@pytest.mark.parametrize("mode", MODES)
async def test_stream_drop_after_text_is_not_retried(
    server: OllamaStandIn, mode: Literal["ollama", "openai"]
) -> None:
    server.set_faults(drop=1, drop_after=3)
    pieces: list[str] = []
    async with client(server, mode) as llm:
        with pytest.raises(LLMError, match="not retried") as info:
            async for piece in llm.stream("mistral", PROMPT, FAST):
                pieces.append(piece)
    assert not isinstance(info.value, LLMTimeout | LLMUnavailable)
    assert "".join(pieces) == "Summary: Postgres keeps"
    assert len(server.requests_to(GEN_PATH[mode])) == 1


@pytest.mark.parametrize("mode", MODES)
async def test_stream_cut_short_is_not_taken_for_the_answer(
    server: OllamaStandIn, mode: Literal["ollama", "openai"]
) -> None:
    # llama-cpp-python ends a stream with [DONE] and no finish_reason when another request
    # arrives: the text so far is not the answer.
    server.set_faults(interrupt=1, drop_after=3)
    pieces: list[str] = []
    async with client(server, mode) as llm:
        with pytest.raises(LLMError, match="not retried") as info:
            async for piece in llm.stream("mistral", PROMPT, FAST):
                pieces.append(piece)
        assert "".join(pieces) == "Summary: Postgres keeps"
        if mode == "openai":
            assert "--interrupt_requests False" in str(info.value)
        server.set_faults(interrupt=1, drop_after=3)
        # generate() has handed out nothing yet: it asks again
        assert await llm.generate("mistral", PROMPT, FAST) == EXPECTED
    assert len(server.requests_to(GEN_PATH[mode])) == 3


@pytest.mark.parametrize("mode", MODES)
async def test_500_is_retried_then_succeeds(
    server: OllamaStandIn, mode: Literal["ollama", "openai"]
) -> None:
    server.set_faults(error500=2)
    async with client(server, mode, retries=2) as llm:
        assert await llm.generate("mistral", PROMPT, FAST) == EXPECTED
    assert len(server.requests_to(GEN_PATH[mode])) == 3


@pytest.mark.parametrize("mode", MODES)
async def test_500_after_all_retries_raises(
    server: OllamaStandIn, mode: Literal["ollama", "openai"]
) -> None:
    server.set_faults(error500=10)
    async with client(server, mode, retries=2) as llm:
        with pytest.raises(LLMError, match="HTTP 500") as info:
            await llm.generate("mistral", PROMPT, FAST)
    assert "injected internal server error" in str(info.value)
    assert "gave up after 3 attempts" in str(info.value)
    # the server answered: this is not an outage
    assert not isinstance(info.value, LLMModelMissing | LLMTimeout | LLMUnavailable)
    assert len(server.requests_to(GEN_PATH[mode])) == 3


@pytest.mark.parametrize("mode", MODES)
async def test_503_loading_is_retried_then_unavailable(
    server: OllamaStandIn, mode: Literal["ollama", "openai"]
) -> None:
    server.set_faults(error503=1)
    async with client(server, mode, retries=2) as llm:
        assert await llm.generate("mistral", PROMPT, FAST) == EXPECTED
        server.set_faults(error503=10)
        with pytest.raises(LLMUnavailable, match="HTTP 503") as info:
            await llm.generate("mistral", PROMPT, FAST)
        server.set_faults(error503=10)
        with pytest.raises(LLMUnavailable, match="Loading model"):
            await llm.list_models()
    assert "Loading model" in str(info.value) and "gave up after 3 attempts" in str(info.value)
    assert len(server.requests_to(GEN_PATH[mode])) == 2 + 3


async def test_500_on_stream_and_list_models_is_retried(server: OllamaStandIn) -> None:
    server.set_faults(error500=1)
    async with client(server, "ollama") as llm:
        assert await llm.list_models() == ["mistral:latest", "llama3.2:1b"]
        server.set_faults(error500=1)
        assert "".join([p async for p in llm.stream("mistral", PROMPT, FAST)]) == EXPECTED
    assert len(server.requests_to("/api/tags")) == 2
    assert len(server.requests_to("/api/generate")) == 2


@pytest.mark.parametrize("mode", MODES)
async def test_malformed_chunk_raises(
    server: OllamaStandIn, mode: Literal["ollama", "openai"]
) -> None:
    server.set_faults(malformed=1)
    async with client(server, mode) as llm:
        with pytest.raises(LLMError, match="malformed stream chunk"):
            async for _ in llm.stream("mistral", PROMPT, FAST):
                pass
        server.set_faults(malformed=1)
        with pytest.raises(LLMError, match="malformed stream chunk") as info:
            await llm.generate("mistral", PROMPT, FAST)
    assert not isinstance(info.value, LLMUnavailable | LLMTimeout)
    assert len(server.requests_to(GEN_PATH[mode])) == 2  # a garbled answer is not retried


@pytest.mark.parametrize("mode", MODES)
async def test_missing_model_is_not_retried(
    server: OllamaStandIn, mode: Literal["ollama", "openai"]
) -> None:
    async with client(server, mode) as llm:
        with pytest.raises(LLMModelMissing) as info:
            await llm.generate("qwen2:7b", PROMPT, FAST)
        message = str(info.value)
        assert "qwen2:7b" in message and server.url in message
        assert "ollama pull qwen2:7b" in message
        assert len(server.requests_to(GEN_PATH[mode])) == 1
        with pytest.raises(LLMModelMissing):
            async for _ in llm.stream("qwen2:7b", PROMPT, FAST):
                pass
    assert len(server.requests_to(GEN_PATH[mode])) == 2


async def test_model_name_without_tag_matches_latest(server: OllamaStandIn) -> None:
    server.models = ["phi3:latest"]
    async with client(server, "ollama") as llm:
        assert await llm.generate("phi3", PROMPT, FAST) == EXPECTED
        with pytest.raises(LLMModelMissing):
            await llm.generate("mistral", PROMPT, FAST)


async def test_other_4xx_is_a_refusal_and_not_retried(server: OllamaStandIn) -> None:
    async with client(server, "ollama") as llm:
        with pytest.raises(LLMRefused, match="model is required") as info:
            await llm.generate("", PROMPT, FAST)
    assert "HTTP 400" in str(info.value)
    assert not isinstance(info.value, LLMModelMissing | LLMUnavailable)
    assert len(server.requests_to("/api/generate")) == 1


async def test_wrong_mode_is_a_refusal(server: OllamaStandIn) -> None:
    async with LLMClient(server.url + "/v1", "ollama", retries=0) as llm:
        with pytest.raises(LLMRefused, match="Try mode='openai'"):
            await llm.list_models()


async def test_per_model_faults_leave_other_models_alone(server: OllamaStandIn) -> None:
    server.set_faults("llama3.2:1b", error500=5)
    async with client(server, "ollama", retries=0) as llm:
        assert await llm.generate("mistral", PROMPT, FAST) == EXPECTED
        with pytest.raises(LLMError, match="HTTP 500"):
            await llm.generate("llama3.2:1b", PROMPT, FAST)


@pytest.mark.parametrize("what", ["generate", "stream", "list_models"])
async def test_connection_refused_is_retried_then_unavailable(what: str) -> None:
    url = free_port_url()
    async with LLMClient(url, retries=2, backoff=0.01) as llm:
        with pytest.raises(LLMUnavailable, match="could not connect") as info:
            if what == "generate":
                await llm.generate("mistral", PROMPT, FAST)
            elif what == "stream":
                async for _ in llm.stream("mistral", PROMPT, FAST):
                    pass
            else:
                await llm.list_models()
    assert url in str(info.value)
    assert "gave up after 3 attempts" in str(info.value)
    assert info.value.exit_code == 5


@pytest.mark.parametrize("mode", MODES)
async def test_connection_reset_before_any_answer_is_unavailable(
    mode: Literal["ollama", "openai"],
) -> None:
    with ResettingServer() as dead:
        async with LLMClient(dead.url, mode, retries=2, backoff=0.01) as llm:
            with pytest.raises(LLMUnavailable, match="without answering") as info:
                await llm.generate("mistral", PROMPT, FAST)
            with pytest.raises(LLMUnavailable):
                await llm.require_model("mistral")
    assert "gave up after 3 attempts" in str(info.value)
    assert dead.connections == 3 + 3


async def test_stand_in_chat_endpoint(server: OllamaStandIn) -> None:
    messages = [{"role": "user", "content": "one two three"}]
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post("/api/chat", json={"model": "mistral", "messages": messages})
        lines = [line for line in r.text.splitlines() if line]
        body = {"model": "mistral", "messages": messages, "stream": False}
        whole = (await http.post("/api/chat", json=body)).json()
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert len(lines) == 5  # four words, then the final object
    assert whole["message"] == {"role": "assistant", "content": "Summary: one two three"}
    assert whole["done"] is True and whole["done_reason"] == "stop"
    assert whole["eval_count"] == 4


async def test_stand_in_runs_a_non_streamed_answer_to_its_end(server: OllamaStandIn) -> None:
    # What a non-streamed request costs a real server: the client leaving does not stop it.
    server.set_faults(word_delay=0.05)
    body = {"model": "mistral", "prompt": PROMPT, "stream": False}
    async with httpx.AsyncClient(base_url=server.url) as http:
        request = asyncio.create_task(http.post("/api/generate", json=body))
        await until(lambda: bool(server.requests_to("/api/generate")), "the request arriving")
        request.cancel()  # the client goes away while the server generates
        with contextlib.suppress(asyncio.CancelledError):
            await request
    await until(server.settled, "the non-streamed answer finishing")
    (req,) = server.requests_to("/api/generate")
    assert req.completed and not req.abandoned and req.words == len(EXPECTED.split())


# -- autoembed generate ------------------------------------------------------------------------


def autoembed_generate(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OLLAMA_HOST", None)
    return subprocess.run(
        [sys.executable, "-m", "autoembed.cli", "generate", *args],
        env=env,
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("autoembed: ") and not line.startswith("autoembed: autoembed")
    return line


def test_generate_command_checks_the_model_first(server: OllamaStandIn) -> None:
    done = autoembed_generate("hi", "--llm-model", "qwen2:7b", "--llm-host", server.url)
    assert done.returncode == 5, done.stderr
    line = error_line(done)
    assert "'qwen2:7b'" in line and "has: mistral:latest, llama3.2:1b" in line
    assert server.requests_to("/api/tags") and not server.requests_to("/api/generate")


def test_generate_command_options(server: OllamaStandIn) -> None:
    done = autoembed_generate(
        "Say it.\n\none two three four",
        *("--llm-model", "mistral", "--llm-host", server.url),
        *("--repeat-last-n", "8", "--repeat-penalty", "1.2", "--top-k", "3", "--max-tokens", "3"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Summary: one two\n"
    (req,) = server.requests_to("/api/generate")
    assert req.body["options"]["repeat_last_n"] == 8
    assert req.body["options"]["repeat_penalty"] == 1.2 and req.body["options"]["top_k"] == 3


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--top-p", "3"], "'top_p' must be between 0 and 1"),
        (["--repeat-last-n", "-5"], "'repeat_penalty_last_n_token_count' must be at least -1"),
        (["--timeout", "0"], "'timeout' must be greater than 0"),
        (["--llm-host", "ftp://x"], "invalid LLM host"),
    ],
)
def test_generate_command_bad_settings_exit_2(
    server: OllamaStandIn, flags: list[str], needle: str
) -> None:
    host = [] if "--llm-host" in flags else ["--llm-host", server.url]
    done = autoembed_generate("hi", "--llm-model", "mistral", *host, *flags)
    assert done.returncode == 2, done.stderr
    assert needle in error_line(done)
    assert server.requests == []  # refused before anything was sent


@pytest.mark.parametrize("mode", MODES)
def test_generate_command_streamed_timeout_ends_the_line(
    server: OllamaStandIn, mode: Literal["ollama", "openai"]
) -> None:
    server.set_faults(stall=1, drop_after=2)
    done = autoembed_generate(
        PROMPT,
        *("--llm-model", "mistral", "--llm-host", server.url, "--llm-mode", mode),
        *("--stream", "--timeout", "2"),
    )
    assert done.returncode == 5, done.stderr
    assert "within 2 s" in error_line(done)
    # whatever text came is a whole line on its own, before the error on stderr
    assert done.stdout in ("", "Summary:\n", "Summary: Postgres\n")
    assert len(server.requests_to(GEN_PATH[mode])) == 1  # a timeout is not retried


# -- configuration and helpers -------------------------------------------------------------------


def test_llm_host_from_env_precedence() -> None:
    both = {"OLLAMA_HOST": "http://a:1", "AI_INFERENCE_API_HOST": "http://b:2"}
    assert llm_host_from_env(both) == "http://a:1"
    assert llm_host_from_env({"AI_INFERENCE_API_HOST": "http://b:2/"}) == "http://b:2"
    assert llm_host_from_env({"OLLAMA_HOST": "", "AI_INFERENCE_API_HOST": "b:2"}) == "http://b:2"
    assert llm_host_from_env({}) == "http://127.0.0.1:11434"
    assert llm_host_from_env({"OLLAMA_HOST": "gpu-box:8080"}) == "http://gpu-box:8080"
    assert llm_host_from_env({"OLLAMA_HOST": "gpu-box"}) == "http://gpu-box:11434"
    assert llm_host_from_env({"OLLAMA_HOST": "https://llm.example"}) == "https://llm.example"
    with pytest.raises(ConfigError, match="invalid LLM host") as info:
        llm_host_from_env({"OLLAMA_HOST": "ftp://x"})
    assert info.value.exit_code == 2 and not isinstance(info.value, LLMError)


def test_llm_host_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    monkeypatch.setenv("AI_INFERENCE_API_HOST", "inference:9000")
    assert llm_host_from_env() == "http://inference:9000"


def test_client_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown LLM mode"):
        LLMClient("http://127.0.0.1:1", "vllm")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must not be negative"):
        LLMClient("http://127.0.0.1:1", retries=-1)


def test_render_prompt() -> None:
    row = {"content": "Some text.", "title": "T", "n": 3, "missing": None}
    assert render_prompt(DEFAULT_SUMMARY_PROMPT, row).endswith("\n\nSome text.")
    assert render_prompt("{{literal}} {title}: {n:03d}{missing}", row) == "{literal} T: 003"
    assert render_prompt("{title!r} {content!s}", row) == "'T' Some text."


def test_render_prompt_errors_are_prompt_errors() -> None:
    with pytest.raises(PromptError, match=r"\{body\}") as info:
        render_prompt("Summarize {body}", {"content": "x", "title": "y"})
    assert "available columns: content, title" in str(info.value)
    # a configuration error (exit 2), not an LLM-server problem: retrying cannot help
    assert isinstance(info.value, ConfigError) and not isinstance(info.value, LLMError)
    with pytest.raises(PromptError, match="whole column names"):  # no attribute access
        render_prompt("{content.__class__}", {"content": "x"})
    with pytest.raises(PromptError, match="malformed"):
        render_prompt("unbalanced {", {"content": "x"})
    with pytest.raises(PromptError, match=r"\{n\}"):  # a spec that does not fit the value
        render_prompt("{n:03d}", {"n": "text"})


def test_check_template_returns_the_columns_used() -> None:
    assert check_template(DEFAULT_SUMMARY_PROMPT) == {"content"}
    template = "Title: {title}\n\n{{not a column}} {content} {title!r} {n:>5}"
    assert check_template(template) == {"title", "content", "n"}
    assert check_template("{content}", columns=["id", "content"]) == {"content"}


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("unbalanced {", "malformed"),
        ("closing } alone", "malformed"),
        ("{}", "positional"),
        ("{0}", "positional"),
        ("{content.upper}", "whole column names"),
        ("{content[0]}", "whole column names"),
        ("{content!x}", "unknown conversion !x"),
        ("{content:{width}}", "nested placeholders"),
        ("no placeholder at all", "uses no column"),
    ],
)
def test_check_template_rejects(template: str, needle: str) -> None:
    with pytest.raises(PromptError) as info:
        check_template(template)
    assert needle in str(info.value)


def test_check_template_against_the_table_columns() -> None:
    with pytest.raises(PromptError, match=r"\{body\}.*its columns: id, content"):
        check_template("{body} {content}", columns=["id", "content"])


def test_generate_options_from_mapping() -> None:
    opts = GenerateOptions.from_mapping({"max_tokens": 20, "temperature": 1, "timeout": 5})
    assert opts == GenerateOptions(max_tokens=20, temperature=1.0, timeout=5.0)
    assert isinstance(opts.temperature, float)
    assert opts.to_dict()["max_tokens"] == 20
    assert GenerateOptions.from_mapping(opts.to_dict()) == opts


@pytest.mark.parametrize(
    ("mapping", "needle"),
    [
        ({"top_p": 1.5}, "'top_p' must be between 0 and 1"),
        ({"max_tokens": 0}, "'max_tokens' must be at least 1"),
        ({"max_tokens": 2.5}, "'max_tokens' must be an integer"),
        ({"max_tokens": True}, "'max_tokens' must be an integer"),
        ({"temperature": "0.5"}, "'temperature' must be a number"),
        ({"timeout": 0}, "'timeout' must be greater than 0"),
        ({"temperature": float("nan")}, "must be finite"),
        ({"temprature": 0.5}, "unknown LLM option(s) 'temprature'"),
    ],
)
def test_generate_options_from_mapping_rejects(mapping: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        GenerateOptions.from_mapping(mapping)
    assert needle in str(info.value)
    assert info.value.exit_code == 2 and not isinstance(info.value, LLMError)


def test_stand_in_answer_words() -> None:
    assert answer_words("a\n\nb c d", 2) == (["Summary:", "b"], True)
    assert answer_words("b c", None) == (["Summary:", "b", "c"], False)


async def test_stream_can_be_closed_early(server: OllamaStandIn) -> None:
    server.set_faults(word_delay=0.02)
    async with client(server, "ollama") as llm:
        async with contextlib.aclosing(llm.stream("mistral", PROMPT, FAST)) as pieces:
            async for piece in pieces:
                assert piece == "Summary:"
                break
        assert await llm.generate("mistral", PROMPT, FAST) == EXPECTED
