"""LLM summaries in their own lane, against a protocol-faithful Ollama stand-in (a real
HTTP server on loopback: Ollama itself cannot run on the test machines)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from autoembed.engine import Embedder
from autoembed.runner import Worker

from .conftest import AUTOEMBED, ROOT, worker_env
from .fakes.ollama import OllamaStandIn, free_port_url
from .helpers import drain, fetch, make_documents, settings, vectors, wait_for


@pytest.fixture
def ollama() -> Iterator[OllamaStandIn]:
    with OllamaStandIn() as server:
        yield server


async def summarised_documents(db: Any, **kw: Any) -> None:
    from autoembed.watches import watch

    await make_documents(db)
    await db.execute("ALTER TABLE documents ADD COLUMN summary text")
    await watch(
        db,
        "documents",
        "content",
        model="all-minilm-l6-v2",
        summary_column="summary",
        llm_model=kw.pop("llm_model", "mistral"),
        **kw,
    )


async def test_summaries_and_embeddings_both_written(
    db: Any, db_url: str, minilm: Embedder, ollama: OllamaStandIn
) -> None:
    await summarised_documents(
        db, llm_prompt="Title: {title}\n\nSummarize: {content}", llm_options={"max_tokens": 5}
    )
    await db.execute(
        "INSERT INTO documents (title, content) VALUES ('Foxes', 'the quick brown fox jumps')"
    )
    status = await fetch(db, "SELECT lane, pending FROM autoembed.status ORDER BY lane")
    assert status == [("embed", 1), ("summary", 1)]
    await drain(db_url, minilm, llm_host=ollama.url)
    row = await fetch(db, "SELECT summary, embedding IS NOT NULL FROM documents")
    # the stand-in answers "Summary:" + the prompt's last paragraph, cut at max_tokens words
    assert row == [("Summary: Summarize: the quick brown", True)]
    sent = ollama.requests_to("/api/generate")[0].body
    assert sent["model"] == "mistral" and sent["prompt"].startswith("Title: Foxes\n\n")
    assert sent["options"]["num_predict"] == 5 and sent["options"]["top_k"] == 40


async def test_openai_mode(db: Any, db_url: str, minilm: Embedder, ollama: OllamaStandIn) -> None:
    await summarised_documents(db)
    await db.execute("INSERT INTO documents (content) VALUES ('llamafile speaks openai')")
    await drain(db_url, minilm, llm_host=ollama.url, llm_mode="openai")
    assert await fetch(db, "SELECT summary FROM documents") == [
        ("Summary: llamafile speaks openai",)
    ]
    sent = ollama.requests_to("/v1/chat/completions")[0].body
    assert sent["messages"][0]["role"] == "user" and sent["max_tokens"] == 100


async def test_missing_model_fails_at_once(
    db: Any, db_url: str, minilm: Embedder, ollama: OllamaStandIn
) -> None:
    await summarised_documents(db, llm_model="no-such-llm")
    await db.execute("INSERT INTO documents (content) VALUES ('text')")
    worker = await drain(db_url, minilm, llm_host=ollama.url, max_attempts=5)
    failed = await fetch(db, "SELECT lane, attempts, last_error FROM autoembed.failed_jobs")
    assert len(failed) == 1 and failed[0][:2] == ("summary", 1)
    assert "no-such-llm" in failed[0][2] and "ollama pull no-such-llm" in failed[0][2]
    assert len(ollama.requests_to("/api/generate")) == 1  # no retry storm
    assert worker.failed_jobs == 1
    assert (await vectors(db))[1][1] is not None  # the embedding did not wait for it


async def test_absent_llm_never_delays_embeddings(db: Any, db_url: str, minilm: Embedder) -> None:
    await summarised_documents(db)
    await db.execute("INSERT INTO documents (content) VALUES ('nobody is listening')")
    worker = Worker(
        settings(db_url, llm_host=free_port_url(), llm_retries=0, max_attempts=2),
        progress=False,
        embedder_factory=lambda _n: minilm,
    )
    task = asyncio.create_task(worker.run())
    try:

        async def embedded() -> bool:
            return (await vectors(db))[1][1] is not None

        await wait_for(embedded, timeout=30)

        async def summary_failed() -> bool:
            rows = await fetch(
                db, "SELECT count(*) FROM autoembed.failed_jobs WHERE lane = 'summary'"
            )
            return rows[0][0] == 1

        await wait_for(summary_failed, timeout=30)
    finally:
        worker.request_stop("test done")
        await task
    error = (await fetch(db, "SELECT last_error FROM autoembed.failed_jobs"))[0][0]
    assert "127.0.0.1" in error


async def test_slow_llm_and_the_stale_guard(
    db: Any, db_url: str, minilm: Embedder, ollama: OllamaStandIn
) -> None:
    await summarised_documents(db)
    ollama.set_faults("mistral", slow=1.5)
    await db.execute("INSERT INTO documents (content) VALUES ('first version of the text')")
    worker = Worker(
        settings(db_url, llm_host=ollama.url), progress=False, embedder_factory=lambda _n: minilm
    )
    task = asyncio.create_task(worker.run())
    try:

        async def generating() -> bool:
            return bool(ollama.requests_to("/api/generate"))

        await wait_for(generating, timeout=30, every=0.02)
        # the embedding lands while the LLM is still thinking
        rows = await fetch(db, "SELECT embedding IS NOT NULL, summary FROM documents")
        assert rows == [(True, None)]
        # and the text changes under the generation: its summary must not be written
        await db.execute("UPDATE documents SET content = 'second version' WHERE id = 1")

        async def final() -> Any:
            rows = await fetch(db, "SELECT summary FROM documents")
            return rows[0][0] and "second version" in rows[0][0]

        await wait_for(final, timeout=30)
    finally:
        worker.request_stop("test done")
        await task
    summaries = [r.body["prompt"] for r in ollama.requests_to("/api/generate")]
    assert any("first version" in p for p in summaries)
    assert (await fetch(db, "SELECT summary FROM documents"))[0][0].endswith("second version")


def test_generate_command_streams(ollama: OllamaStandIn) -> None:
    ollama.set_faults(word_delay=0.01)
    done = subprocess.run(
        [
            *AUTOEMBED,
            "generate",
            "Write a haiku about coding",
            "--llm-model",
            "mistral",
            "--stream",
            "--llm-host",
            ollama.url,
        ],
        env=worker_env("dbname=none"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Summary: Write a haiku about coding"
    assert ollama.requests_to("/api/generate")[0].body["stream"] is True
    missing = subprocess.run(
        [*AUTOEMBED, "generate", "hi", "--llm-model", "nope", "--llm-host", ollama.url],
        env=worker_env("dbname=none"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 5 and "ollama pull nope" in missing.stderr
