"""LLM summaries in their own lane, against a protocol-faithful Ollama stand-in (a real
HTTP server on loopback: Ollama itself cannot run on the test machines)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
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


async def test_a_model_the_server_lacks_is_refused_before_any_generation(
    db: Any,
    db_url: str,
    minilm: Embedder,
    ollama: OllamaStandIn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await summarised_documents(db, llm_model="no-such-llm")
    await db.execute("INSERT INTO documents (content) VALUES ('text')")
    caplog.set_level(logging.ERROR)
    # the lane checks the server's model list first: nothing is generated (a server that
    # answers with whatever it loaded would otherwise write another model's text), the job
    # keeps its attempts, and the drain ends non-zero, naming the model and the way out
    await drain(db_url, minilm, expect=3, llm_host=ollama.url, max_attempts=5)
    assert ollama.requests_to("/api/generate") == []
    assert await fetch(db, "SELECT lane, status, attempts FROM autoembed.jobs") == [
        ("summary", "pending", 0)
    ]
    assert "no-such-llm" in caplog.text and "ollama pull no-such-llm" in caplog.text
    assert (await vectors(db))[1][1] is not None  # the embedding did not wait for it
    # once the server has it, the same row is summarised
    ollama.models.append("no-such-llm:latest")
    await drain(db_url, minilm, llm_host=ollama.url)
    assert await fetch(db, "SELECT summary FROM documents") == [("Summary: text",)]


async def test_an_llm_outage_costs_the_rows_nothing(db: Any, db_url: str, minilm: Embedder) -> None:
    await summarised_documents(db)
    await db.execute("INSERT INTO documents (content) VALUES ('nobody is listening')")
    url = free_port_url()
    worker = Worker(
        settings(db_url, llm_host=url, llm_retries=0, max_attempts=2, lease_seconds=3),
        progress=False,
        embedder_factory=lambda _n: minilm,
    )
    task = asyncio.create_task(worker.run())
    try:

        async def embedded() -> bool:
            return (await vectors(db))[1][1] is not None

        await wait_for(embedded, timeout=60)

        async def reported() -> bool:
            rows = await fetch(db, "SELECT problems FROM autoembed.workers")
            return bool(rows) and "llm" in rows[0][0]

        await wait_for(reported, timeout=60)  # `autoembed status` shows the outage
        jobs = await fetch(db, "SELECT status, attempts FROM autoembed.jobs WHERE lane = 'summary'")
        assert jobs == [("pending", 0)]
        # the server comes back on its address: the lane finds it and the row is summarised
        port = int(url.rsplit(":", 1)[1])
        with OllamaStandIn(port=port):

            async def summarised() -> bool:
                rows = await fetch(db, "SELECT summary FROM documents")
                return rows[0][0] is not None

            await wait_for(summarised, timeout=120)
    finally:
        worker.request_stop("test done")
        assert await task == 0
    assert await fetch(db, "SELECT count(*) FROM autoembed.jobs") == [(0,)]


async def test_slow_llm_and_the_stale_guard(
    db: Any, db_url: str, minilm: Embedder, ollama: OllamaStandIn
) -> None:
    await summarised_documents(db)
    await db.execute(
        "CREATE TABLE summaries_written (summary text, at timestamptz DEFAULT clock_timestamp())"
    )
    await db.execute(
        """CREATE FUNCTION log_summary() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO public.summaries_written (summary) VALUES (NEW.summary);
           RETURN NULL; END $$"""
    )
    await db.execute(
        "CREATE TRIGGER log_summary AFTER UPDATE OF summary ON documents FOR EACH ROW "
        "WHEN (NEW.summary IS NOT NULL) EXECUTE FUNCTION log_summary()"
    )
    ollama.set_faults("mistral", slow=5.0)
    await db.execute("INSERT INTO documents (content) VALUES ('first version of the text')")
    worker = Worker(
        settings(db_url, llm_host=ollama.url), progress=False, embedder_factory=lambda _n: minilm
    )
    task = asyncio.create_task(worker.run())
    try:

        async def generating() -> bool:
            return bool(ollama.requests_to("/api/generate"))

        await wait_for(generating, timeout=60, every=0.02)

        async def embedded() -> bool:
            return (await vectors(db))[1][1] is not None

        await wait_for(embedded, timeout=60)  # the slow LLM does not hold the embedding up
        # the text changes under the generation
        await db.execute("UPDATE documents SET content = 'second version' WHERE id = 1")
        changed_at = time.monotonic()

        async def final() -> Any:
            rows = await fetch(db, "SELECT summary FROM documents")
            return rows[0][0] and "second version" in rows[0][0]

        await wait_for(final, timeout=60)
    finally:
        worker.request_stop("test done")
        await task
    first = ollama.requests_to("/api/generate")[0]
    assert "first version" in first.body["prompt"]
    written = [r[0] for r in await fetch(db, "SELECT summary FROM summaries_written ORDER BY at")]
    if first.finished_at is not None and first.finished_at > changed_at:
        # the first summary was made for a text that had changed before it was done: the
        # stale-write guard kept it out
        assert not any("first version" in w for w in written), written
    assert written[-1].endswith("second version")


async def test_prompt_columns_requeue_the_summary(
    db: Any, db_url: str, minilm: Embedder, ollama: OllamaStandIn
) -> None:
    """A prompt template may use any column: a change of one of them re-summarises the row
    (and does not re-embed it); other columns change nothing."""
    await summarised_documents(db, llm_prompt="About {title}: {content}")
    await db.execute("ALTER TABLE documents ADD COLUMN views int DEFAULT 0")
    await db.execute("INSERT INTO documents (title, content) VALUES ('Cats', 'they purr')")
    await drain(db_url, minilm, llm_host=ollama.url)
    await db.execute("UPDATE documents SET title = 'Felines'")
    assert await fetch(db, "SELECT lane FROM autoembed.jobs") == [("summary",)]
    await db.execute("UPDATE documents SET views = views + 1")
    assert await fetch(db, "SELECT lane FROM autoembed.jobs") == [("summary",)]
    await drain(db_url, minilm, llm_host=ollama.url)
    assert await fetch(db, "SELECT summary FROM documents") == [
        ("Summary: About Felines: they purr",)
    ]


async def test_a_broken_prompt_is_a_configuration_error(
    db: Any, db_url: str, minilm: Embedder, ollama: OllamaStandIn
) -> None:
    from autoembed.errors import WatchError

    with pytest.raises(WatchError, match="unmatched brace"):
        await summarised_documents(db, llm_prompt="Summarize {content")
    # a template that parses but cannot be rendered for a row fails that job at once
    await db.execute("DROP TABLE documents, documents_writes CASCADE")
    await db.execute("DROP FUNCTION documents_log_write")
    await summarised_documents(db, llm_prompt="Summarize {content:d}")
    await db.execute("INSERT INTO documents (content) VALUES ('not a number')")
    await drain(db_url, minilm, llm_host=ollama.url, max_attempts=5)
    failed = await fetch(db, "SELECT lane, attempts, last_error FROM autoembed.failed_jobs")
    assert failed[0][:2] == ("summary", 1) and "template" in failed[0][2]
    assert ollama.requests_to("/api/generate") == []


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
