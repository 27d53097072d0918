"""autoembed.llm against the Ollama stand-in (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import pytest

# The project is not installed into the virtualenv: import it (and tests.fakes) from the checkout.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from autoembed.errors import LLMError, LLMModelMissing, LLMTimeout  # noqa: E402
from autoembed.llm import (  # noqa: E402
    DEFAULT_SUMMARY_PROMPT,
    GenerateOptions,
    LLMClient,
    llm_host_from_env,
    render_prompt,
)

from tests.fakes.ollama import OllamaStandIn, answer_words, free_port_url  # noqa: E402

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


# -- happy paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_generate(server: OllamaStandIn, mode: Literal["ollama", "openai"]) -> None:
    async with client(server, mode) as llm:
        text = await llm.generate("mistral", PROMPT, FAST)
    assert text == EXPECTED
    (req,) = server.requests_to(GEN_PATH[mode])
    assert req.body["stream"] is False
    assert req.body["model"] == "mistral"


@pytest.mark.parametrize("mode", MODES)
async def test_stream_yields_pieces_incrementally(
    server: OllamaStandIn, mode: Literal["ollama", "openai"]
) -> None:
    server.set_faults(word_delay=0.05)
    arrivals: list[float] = []
    pieces: list[str] = []
    async with client(server, mode) as llm:
        async for piece in llm.stream("mistral", PROMPT, FAST):
            arrivals.append(time.monotonic())
            pieces.append(piece)
    assert "".join(pieces) == EXPECTED
    assert len(pieces) == len(EXPECTED.split()) >= 5
    (req,) = server.requests_to(GEN_PATH[mode])
    assert req.body["stream"] is True
    assert req.finished_at is not None
    # The first piece was in our hands while the server was still generating the rest.
    assert arrivals[0] < req.finished_at - 0.2
    assert arrivals[-1] - arrivals[0] > 0.2


@pytest.mark.parametrize("mode", MODES)
async def test_list_models(server: OllamaStandIn, mode: Literal["ollama", "openai"]) -> None:
    async with client(server, mode) as llm:
        assert await llm.list_models() == ["mistral:latest", "llama3.2:1b"]
    path = "/api/tags" if mode == "ollama" else "/v1/models"
    assert len(server.requests_to(path)) == 1


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


async def test_options_sent_in_openai_field_names(server: OllamaStandIn) -> None:
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


# -- faults --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_slow_answer_times_out(
    server: OllamaStandIn, mode: Literal["ollama", "openai"]
) -> None:
    server.set_faults(slow=2.0)
    started = time.monotonic()
    async with client(server, mode, retries=1) as llm:
        with pytest.raises(LLMTimeout, match=r"within 0\.2 s") as info:
            await llm.generate("mistral", PROMPT, GenerateOptions(timeout=0.2))
    assert time.monotonic() - started < 1.5
    assert "gave up after 2 attempts" in str(info.value)
    assert len(server.requests_to(GEN_PATH[mode])) == 2  # timeouts are retried


async def test_stream_timeout_covers_the_whole_generation(server: OllamaStandIn) -> None:
    # Each word comes well within the timeout, but the whole answer does not.
    server.set_faults(word_delay=0.1)
    pieces: list[str] = []
    started = time.monotonic()
    async with client(server, "ollama") as llm:
        with pytest.raises(LLMTimeout, match=r"within 0\.35 s"):
            async for piece in llm.stream("mistral", PROMPT, GenerateOptions(timeout=0.35)):
                pieces.append(piece)
    assert 1 <= len(pieces) < len(EXPECTED.split())
    assert time.monotonic() - started < 0.8
    assert len(server.requests_to("/api/generate")) == 1  # not retried after text was yielded


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
    assert not isinstance(info.value, LLMTimeout)
    assert "".join(pieces) == "Summary: Postgres keeps"
    assert len(server.requests_to(GEN_PATH[mode])) == 1


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
    assert not isinstance(info.value, LLMModelMissing | LLMTimeout)
    assert len(server.requests_to(GEN_PATH[mode])) == 3


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
        with pytest.raises(LLMError, match="malformed answer"):
            await llm.generate("mistral", PROMPT, FAST)


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


async def test_other_4xx_is_not_retried(server: OllamaStandIn) -> None:
    async with client(server, "ollama") as llm:
        with pytest.raises(LLMError, match="model is required") as info:
            await llm.generate("", PROMPT, FAST)
    assert "HTTP 400" in str(info.value)
    assert not isinstance(info.value, LLMModelMissing)
    assert len(server.requests_to("/api/generate")) == 1


async def test_per_model_faults_leave_other_models_alone(server: OllamaStandIn) -> None:
    server.set_faults("llama3.2:1b", error500=5)
    async with client(server, "ollama", retries=0) as llm:
        assert await llm.generate("mistral", PROMPT, FAST) == EXPECTED
        with pytest.raises(LLMError, match="HTTP 500"):
            await llm.generate("llama3.2:1b", PROMPT, FAST)


async def test_connection_refused_is_retried_then_raises() -> None:
    url = free_port_url()
    async with LLMClient(url, retries=2, backoff=0.01) as llm:
        with pytest.raises(LLMError, match="could not connect") as info:
            await llm.generate("mistral", PROMPT, FAST)
    assert url in str(info.value)
    assert "gave up after 3 attempts" in str(info.value)


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
    with pytest.raises(LLMError, match="invalid LLM host"):
        llm_host_from_env({"OLLAMA_HOST": "ftp://x"})


def test_llm_host_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    monkeypatch.setenv("AI_INFERENCE_API_HOST", "inference:9000")
    assert llm_host_from_env() == "http://inference:9000"


def test_render_prompt() -> None:
    row = {"content": "Some text.", "title": "T", "n": 3, "missing": None}
    assert render_prompt(DEFAULT_SUMMARY_PROMPT, row).endswith("\n\nSome text.")
    assert render_prompt("{{literal}} {title}: {n:03d}{missing}", row) == "{literal} T: 003"


def test_render_prompt_unknown_column() -> None:
    with pytest.raises(LLMError, match=r"\{body\}") as info:
        render_prompt("Summarize {body}", {"content": "x", "title": "y"})
    assert "available columns: content, title" in str(info.value)
    with pytest.raises(LLMError, match="no column"):  # no attribute access into values
        render_prompt("{content.__class__}", {"content": "x"})
    with pytest.raises(LLMError, match="malformed"):
        render_prompt("unbalanced {", {"content": "x"})


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
    with pytest.raises(LLMError) as info:
        GenerateOptions.from_mapping(mapping)
    assert needle in str(info.value)


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
