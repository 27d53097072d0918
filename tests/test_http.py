"""The HTTP API through a real uvicorn server on 127.0.0.1 (httpx over TCP), with the real
model and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from autoembed.batcher import Batcher, TextRejected
from autoembed.config import Settings
from autoembed.engine import Embedder
from autoembed.errors import ConfigError
from autoembed.http import (
    TRUNCATED_HEADER,
    HttpServer,
    Service,
    create_app,
    listen_address,
    serve,
    serve_with_worker,
)
from autoembed.runner import Worker

from .helpers import worker_pool

AUTOEMBED = [sys.executable, "-m", "autoembed.cli"]  # as conftest.AUTOEMBED

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
MODEL = "all-minilm-l6-v2"
LONG_TEXT = "PostgreSQL keeps embeddings next to the rows they describe. " * 60


def make_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "model": MODEL,
        "device": "cpu",
        "api_key": KEY,
        "max_inputs": 8,
        "max_body_bytes": 64 * 1024,
        "poll_seconds": 0.2,
        "shutdown_seconds": 5.0,
        "batch_size": 16,
    }
    base.update(overrides)
    return Settings(**base)


@dataclass
class Api:
    server: HttpServer
    client: httpx.AsyncClient
    service: Service


@contextlib.asynccontextmanager
async def running(app: Any) -> AsyncIterator[Api]:
    server = HttpServer(app, "127.0.0.1", 0, shutdown_seconds=2)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            yield Api(server, client, app.state.service)
    finally:
        await server.stop()


@pytest.fixture(scope="module")
async def api(minilm: Embedder) -> AsyncIterator[Api]:
    """The API without a database (/embed, /v1/embeddings, health, metrics)."""
    async with running(create_app(make_settings(), minilm)) as api:
        yield api


@pytest.fixture
async def db_api(db_url: str, minilm: Embedder) -> AsyncIterator[Api]:
    """The API with a pool on the test's database (for /webhook)."""
    async with (
        worker_pool(db_url) as pool,
        running(create_app(make_settings(database_url=db_url), minilm, pool=pool)) as a,
    ):
        yield a


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``check`` (a function or a coroutine function) until it gives a true value."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert {"type", "code", "param"} <= set(error)
    return error


# ---------------------------------------------------------------------------- /embed


async def test_embed_matches_the_command_line(api: Api, minilm: Embedder, cache_dir: Any) -> None:
    text = "Build an index without blocking writes"
    r = await api.client.post("/embed", json={"input": text}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"embedding"}  # the Edge Function's body, nothing more
    served = np.array(r.json()["embedding"])
    assert served.shape == (384,)
    proc = await asyncio.create_subprocess_exec(
        *AUTOEMBED,
        "embed",
        "--model",
        MODEL,
        "--device",
        "cpu",
        text,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    cli = np.array([float(x) for x in out.decode().strip().strip("[]").split(",")])
    np.testing.assert_allclose(served, cli, rtol=0, atol=1e-6)


async def test_embed_lists_options_and_truncation(api: Api, minilm: Embedder) -> None:
    texts = ["first text", "second, longer text about vacuum"]
    r = await api.client.post("/embed", json={"input": texts}, headers=AUTH)
    assert r.status_code == 200
    np.testing.assert_allclose(np.array(r.json()["embedding"]), minilm.embed(texts), atol=1e-5)
    assert r.headers[TRUNCATED_HEADER] == "0"

    body = {"input": texts, "mean_pool": False, "normalize": False}
    r = await api.client.post("/embed", json=body, headers=AUTH)
    expected = minilm.embed(texts, mean_pool=False, normalize=False)
    np.testing.assert_allclose(np.array(r.json()["embedding"]), expected, atol=1e-4)
    assert abs(np.linalg.norm(r.json()["embedding"][0]) - 1) > 0.01  # really not normalised

    r = await api.client.post("/embed", json={"input": [LONG_TEXT, "short"]}, headers=AUTH)
    assert r.status_code == 200 and r.headers[TRUNCATED_HEADER] == "1"


# ---------------------------------------------------------------------------- /v1/embeddings


async def test_openai_compatible(api: Api, minilm: Embedder) -> None:
    texts = ["hello world", "vacuum reclaims storage"]
    r = await api.client.post("/v1/embeddings", json={"model": MODEL, "input": texts}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    vectors = np.array([d["embedding"] for d in body["data"]])
    np.testing.assert_allclose(vectors, minilm.embed(texts), atol=1e-5)
    tokens = minilm.encode(texts).total_tokens
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert r.headers[TRUNCATED_HEADER] == "0"

    # base64: little-endian float32 bytes; a registry alias names the same model; a string
    request = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "input": texts[0],
        "encoding_format": "base64",
        "dimensions": 384,
        "user": "pgai",
    }
    r = await api.client.post("/v1/embeddings", json=request, headers=AUTH)
    assert r.status_code == 200, r.text
    decoded = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, vectors[0], atol=1e-6)

    r = await api.client.post(
        "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"}, headers=AUTH
    )
    assert r.status_code == 404
    assert error_of(r)["code"] == "model_not_found"
    r = await api.client.post(
        "/v1/embeddings", json={"model": MODEL, "input": "x", "dimensions": 256}, headers=AUTH
    )
    assert r.status_code == 400 and error_of(r)["param"] == "dimensions"


# ---------------------------------------------------------------------------- bad input, auth

BAD = [
    # path, body (bytes: sent as is), status, param
    ("/embed", b"{not json", 400, None),
    ("/embed", b"", 400, None),
    ("/embed", b"[" * 5000 + b"]" * 5000, 400, None),  # nesting past the parser's recursion
    ("/embed", [1, 2], 422, "body"),
    ("/embed", {"text": "no input"}, 422, "input"),
    ("/embed", {"input": 5}, 422, "input"),
    ("/embed", {"input": ["a", 3]}, 422, "input[1]"),
    ("/embed", {"input": []}, 400, "input"),
    ("/embed", {"input": ""}, 400, "input"),
    ("/embed", {"input": ["ok", ""]}, 400, "input[1]"),
    ("/embed", {"input": ["t"] * 9}, 413, "input"),
    ("/embed", {"input": "x", "mean_pool": "yes"}, 422, "mean_pool"),
    ("/embed", {"input": "x", "normalize": 1}, 422, "normalize"),
    ("/embed", b'{"input": "\\ud800 lone surrogate"}', 422, "input"),
    ("/embed", {"input": "x", "model": "no-such-model"}, 404, "model"),
    ("/v1/embeddings", {"model": MODEL, "input": [[101, 2023]]}, 422, "input[0]"),
    ("/v1/embeddings", {"model": 7, "input": "x"}, 422, "model"),
    (
        "/v1/embeddings",
        {"model": MODEL, "input": "x", "encoding_format": "hex"},
        422,
        "encoding_format",
    ),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": "384"}, 422, "dimensions"),
    ("/v1/embeddings", {"model": MODEL, "input": []}, 400, "input"),
    ("/v1/embeddings", {"model": MODEL, "input": ["t"] * 9}, 413, "input"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
async def test_bad_input_is_a_json_4xx(
    api: Api, path: str, body: Any, status: int, param: str | None
) -> None:
    if isinstance(body, bytes):
        r = await api.client.post(path, content=body, headers={**AUTH, **JSON})
    else:
        r = await api.client.post(path, json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert error_of(r)["param"] == param
    assert (await api.client.get("/healthz")).status_code == 200  # still serving


async def test_body_limit_is_enforced_while_reading(api: Api) -> None:
    big = {"input": "word " * 20_000}  # ~100 KB against a 64 KB limit
    r = await api.client.post("/embed", json=big, headers=AUTH)
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length at all: chunked
        yield b'{"input": "'
        for _ in range(20):
            yield b"x" * 4096
        yield b'"}'

    r = await api.client.post("/embed", content=chunks(), headers={**AUTH, **JSON})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"


@pytest.mark.parametrize("path", ["/embed", "/v1/embeddings", "/webhook"])
async def test_auth(api: Api, path: str) -> None:
    body = {"input": "x", "type": "INSERT", "table": "t", "record": {}}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY}x"},
    ):
        r = await api.client.post(path, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert error_of(r)["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    r = await api.client.post(path, json=body, headers=AUTH)
    assert r.status_code != 401
    # no auth for health and metrics
    assert (await api.client.get("/healthz")).status_code == 200
    assert (await api.client.get("/metrics")).status_code == 200


async def test_unknown_path_and_method_are_json(api: Api) -> None:
    r = await api.client.get("/nope")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = await api.client.get("/embed")
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


# ---------------------------------------------------------------------------- health, metrics


async def test_healthz_and_metrics(api: Api) -> None:
    r = await api.client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["ok"] is True
    assert body["checks"]["model"] == {"ok": True, "name": MODEL, "dim": 384, "device": "cpu"}
    assert body["checks"]["database"]["ok"] is True  # none configured: nothing to fail
    assert "listener" not in body["checks"]  # no worker in this process

    await api.client.post("/embed", json={"input": "count me"}, headers=AUTH)
    await api.client.post("/embed", json={"input": "count me"})
    text = (await api.client.get("/metrics")).text
    assert 'autoembed_http_requests_total{path="/embed",status="200"}' in text
    assert 'autoembed_http_requests_total{path="/embed",status="401"}' in text
    assert f'autoembed_texts_total{{model="{MODEL}"}}' in text
    assert f'autoembed_truncated_texts_total{{model="{MODEL}"}}' in text
    assert "autoembed_batch_seconds" in text and "autoembed_jobs_claimed" in text


async def test_webhook_without_database_is_503(api: Api) -> None:
    body = {"type": "INSERT", "table": "docs", "schema": "public", "record": {"id": 1}}
    r = await api.client.post("/webhook", json=body, headers=AUTH)
    assert r.status_code == 503 and error_of(r)["code"] == "no_database"


# ---------------------------------------------------------------------------- micro-batching


async def test_concurrent_requests_share_engine_calls(api: Api, minilm: Embedder) -> None:
    batcher = api.service.batcher(api.service.default)
    texts = [f"concurrent request number {i} about autovacuum" for i in range(32)]

    async def one(text: str, client: httpx.AsyncClient = api.client) -> np.ndarray:
        r = await client.post("/embed", json={"input": text}, headers=AUTH)
        assert r.status_code == 200, r.text
        return np.array(r.json()["embedding"])

    # 32 clients at once (each on a connection of its own): an idle engine lets the burst
    # settle, and while one batch runs the next accumulates
    calls = batcher.calls
    async with httpx.AsyncClient(base_url=api.server.url, timeout=60) as fresh:
        results = await asyncio.gather(*(one(t, fresh) for t in texts))
    natural = batcher.calls - calls
    assert natural <= 16, f"32 concurrent requests took {natural} engine calls"
    np.testing.assert_allclose(np.stack(results), minilm.embed(texts), atol=1e-5)

    # with the engine busy (the worker's inference holds the lock), all 32 go in one call
    calls, requests = batcher.calls, batcher.requests
    async with api.service.engine_lock:
        pending = [asyncio.create_task(one(t)) for t in texts]
        await wait_for(lambda: batcher.requests - requests == 32)
    results = await asyncio.gather(*pending)
    assert batcher.calls - calls == 1
    np.testing.assert_allclose(np.stack(results), minilm.embed(texts), atol=1e-5)


async def test_one_bad_request_fails_alone(minilm: Embedder) -> None:
    batcher = Batcher(minilm)
    lock_holder = batcher.lock
    try:
        async with lock_holder:  # let all of them queue up for one batch
            tasks = [asyncio.create_task(batcher.embed([f"good text {i}"])) for i in range(5)]
            tasks.insert(2, asyncio.create_task(batcher.embed(["bad \ud800 text"])))
            tasks.append(asyncio.create_task(batcher.embed(["cls"], mean_pool=False)))
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await batcher.aclose()
    assert isinstance(results[2], TextRejected)
    good = [r for i, r in enumerate(results[:-1]) if i != 2]
    expected = minilm.embed([f"good text {i}" for i in range(5)])
    np.testing.assert_allclose(np.stack([r.vectors[0] for r in good]), expected, atol=1e-5)
    cls = results[-1]
    assert not isinstance(cls, BaseException)
    np.testing.assert_allclose(cls.vectors, minilm.embed(["cls"], mean_pool=False), atol=1e-5)
    assert batcher.calls == 2  # the five good ones together; the CLS one (other options) apart


# ---------------------------------------------------------------------------- webhooks


async def http_only_table(db: Any, table: str = "docs", pk: str = "bigint") -> int:
    """A watched table whose triggers do not fire for ``db``'s writes (replica mode, for
    this connection only): only webhooks queue its rows. (ALTER TABLE ... DISABLE TRIGGER
    would not do: autoembed's event triggers put a watch's triggers back after DDL.)"""
    await db.execute(f"CREATE TABLE {table} (id {pk} PRIMARY KEY, content text, title text)")
    cur = await db.execute(
        f"SELECT autoembed.watch('{table}'::regclass, 'content', model => '{MODEL}')"
    )
    watch_id = (await cur.fetchone())[0]
    await db.execute("SET session_replication_role = replica")
    return int(watch_id)


async def jobs(db: Any) -> list[tuple[Any, ...]]:
    cur = await db.execute("SELECT pk, lane, generation FROM autoembed.jobs ORDER BY pk")
    return list(await cur.fetchall())


def hook(op: str, record: Any = None, old: Any = None, table: str = "docs") -> dict[str, Any]:
    return {"type": op, "table": table, "schema": "public", "record": record, "old_record": old}


async def test_webhook_insert_ends_as_a_vector(
    db: Any, db_url: str, db_api: Api, minilm: Embedder
) -> None:
    watch_id = await http_only_table(db)
    text = "Vacuum reclaims storage occupied by dead tuples"
    await db.execute("INSERT INTO docs (id, content) VALUES (1, %s)", (text,))
    assert await jobs(db) == []  # the triggers are off

    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as listener:
        await listener.execute("LISTEN autoembed")
        r = await db_api.client.post(
            "/webhook", json=hook("INSERT", {"id": 1, "content": text}), headers=AUTH
        )
        assert r.status_code == 202, r.text
        assert r.json() == {"table": "public.docs", "queued": 1, "dropped": 0}
        notes = [n.payload async for n in listener.notifies(timeout=5, stop_after=1)]
    assert notes == [str(watch_id)]
    assert await jobs(db) == [("1", "embed", 1)]

    worker = Worker(
        make_settings(database_url=db_url),
        drain=True,
        embedder_factory=lambda name: minilm,
        progress=False,
    )
    assert await asyncio.wait_for(worker.run(), 60) == 0
    cur = await db.execute("SELECT embedding FROM docs WHERE id = 1")
    vector = np.asarray((await cur.fetchone())[0].to_numpy())
    np.testing.assert_allclose(vector, minilm.embed([text])[0], atol=1e-5)
    assert await jobs(db) == []


async def test_webhook_update_queues_only_changed_text(db: Any, db_api: Api) -> None:
    await http_only_table(db)
    old = {"id": 7, "content": "same text", "title": "a"}
    post = db_api.client.post

    r = await post("/webhook", json=hook("UPDATE", {**old, "title": "b"}, old), headers=AUTH)
    assert r.status_code == 202 and r.json()["queued"] == 0
    assert await jobs(db) == []

    r = await post("/webhook", json=hook("UPDATE", {**old, "content": "new"}, old), headers=AUTH)
    assert r.status_code == 202 and r.json()["queued"] == 1
    # the same deduplication as the triggers: one job per row, its generation counts changes
    r = await post("/webhook", json=hook("UPDATE", {**old, "content": "newer"}, old), headers=AUTH)
    assert await jobs(db) == [("7", "embed", 2)]

    # an INSERT of a NULL text queues nothing, like the trigger
    r = await post("/webhook", json=hook("INSERT", {"id": 8, "content": None}), headers=AUTH)
    assert r.status_code == 202 and r.json()["queued"] == 0


async def test_webhook_delete_drops_the_job(db: Any, db_api: Api) -> None:
    await http_only_table(db)
    await db.execute("SET session_replication_role = origin")  # queued by the triggers
    await db.execute("INSERT INTO docs (id, content) VALUES (3, 'to be deleted'), (4, 'stays')")
    assert [j[0] for j in await jobs(db)] == ["3", "4"]
    await db.execute("SET session_replication_role = replica")  # deleted without them
    await db.execute("DELETE FROM docs WHERE id = 3")
    r = await db_api.client.post(
        "/webhook",
        json=hook("DELETE", None, {"id": 3, "content": "to be deleted"}),
        headers=AUTH,
    )
    assert r.status_code == 202 and r.json()["dropped"] == 1
    assert [j[0] for j in await jobs(db)] == ["4"]


async def test_webhook_uuid_key_as_postgres_writes_it(db: Any, db_api: Api) -> None:
    await http_only_table(db, "notes", "uuid")
    key = uuid.uuid4()
    r = await db_api.client.post(
        "/webhook",
        json=hook("INSERT", {"id": str(key).upper(), "content": "x"}, table="notes"),
        headers=AUTH,
    )
    assert r.status_code == 202, r.text
    assert await jobs(db) == [(str(key), "embed", 1)]
    r = await db_api.client.post(
        "/webhook",
        json=hook("INSERT", {"id": "not-a-uuid", "content": "x"}, table="notes"),
        headers=AUTH,
    )
    assert r.status_code == 422 and error_of(r)["param"] == "record.id"


async def test_webhook_two_watches_on_one_table(db: Any, db_api: Api) -> None:
    """Both watches of a table get the row queued (this was a 500: the loop rebound the
    row to the statement's result)."""
    await db.execute("CREATE TABLE docs (id bigint PRIMARY KEY, content text)")
    ids = []
    for sql in (
        f"SELECT autoembed.watch('docs', 'content', 'embedding', '{MODEL}')",
        f"SELECT autoembed.watch('docs', 'content', 'embedding2', '{MODEL}', "
        "match_function => 'match_docs2')",
    ):
        ids.append((await (await db.execute(sql)).fetchone())[0])
    record = {"id": 5, "content": "one row, two embeddings"}
    r = await db_api.client.post("/webhook", json=hook("INSERT", record), headers=AUTH)
    assert r.status_code == 202, r.text
    assert r.json() == {"table": "public.docs", "queued": 2, "dropped": 0}
    cur = await db.execute("SELECT watch_id, pk FROM autoembed.jobs ORDER BY watch_id")
    assert await cur.fetchall() == [(ids[0], "5"), (ids[1], "5")]
    r = await db_api.client.post("/webhook", json=hook("DELETE", None, record), headers=AUTH)
    assert r.status_code == 202 and r.json()["dropped"] == 2
    assert await jobs(db) == []


async def test_webhook_bad_payloads(db: Any, db_api: Api) -> None:
    await http_only_table(db)
    cases = [
        (hook("INSERT", {"id": 1, "content": "x"}, table="nope"), 404, "table"),
        (hook("TRUNCATE", {"id": 1}), 422, "type"),
        (hook("INSERT", None), 422, "record"),
        (hook("DELETE", {"id": 1}, None), 422, "old_record"),
        (hook("INSERT", {"content": "no key"}), 422, "record.id"),
        ({**hook("INSERT", {"id": 1}), "table": 5}, 422, "table"),
    ]
    for body, status, param in cases:
        r = await db_api.client.post("/webhook", json=body, headers=AUTH)
        assert r.status_code == status, (body, r.text)
        assert error_of(r)["param"] == param
    r = await db_api.client.post("/webhook", json=cases[0][0], headers=AUTH)
    assert "public.nope" in error_of(r)["message"]
    assert await jobs(db) == []


# ---------------------------------------------------------------------------- serving


async def test_serve_with_worker_in_one_process(db: Any, db_url: str, minilm: Embedder) -> None:
    await http_only_table(db)
    await db.execute("INSERT INTO docs (id, content) VALUES (1, 'served and embedded')")
    port = free_port()
    settings = make_settings(database_url=db_url, http=f"127.0.0.1:{port}")
    worker = Worker(settings, embedder_factory=lambda name: minilm, progress=False)
    task = asyncio.create_task(serve_with_worker(worker, settings))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:

            async def healthy() -> bool:
                r = await client.get("/healthz")
                return r.status_code == 200 and r.json()["checks"]["listener"]["ok"]

            await wait_for(healthy)
            r = await client.post(
                "/webhook",
                headers=AUTH,
                json=hook("INSERT", {"id": 1, "content": "served and embedded"}),
            )
            assert r.status_code == 202, r.text

            async def embedded() -> bool:
                cur = await db.execute("SELECT embedding IS NOT NULL FROM docs WHERE id = 1")
                return bool((await cur.fetchone())[0])

            await wait_for(embedded)
            metrics = (await client.get("/metrics")).text
            assert 'autoembed_jobs_completed_total{lane="embed"} 1.0' in metrics
            assert 'autoembed_http_requests_total{path="/webhook",status="202"} 1.0' in metrics
        worker.request_stop("test over")
        assert await asyncio.wait_for(task, 30) == 0
    finally:
        if not task.done():
            worker.request_stop("test failed")
            await asyncio.wait_for(task, 30)


async def test_serve_alone_stops_on_sigterm(
    minilm: Embedder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(Embedder, "load", classmethod(lambda cls, *a, **k: minilm))
    port = free_port()
    settings = make_settings(api_key=None, http=f"127.0.0.1:{port}")
    caplog.set_level(logging.INFO, logger="autoembed.http")
    task = asyncio.create_task(serve(settings))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        await wait_for(lambda: _ok(client.get("/healthz")))
        r = await client.post("/embed", json={"input": "no key, no auth"})  # loopback, no key
        assert r.status_code == 200
    assert "loopback only" in caplog.text
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(task, 30) == 0


async def _ok(request: Awaitable[httpx.Response]) -> bool:
    return (await request).status_code == 200


def test_listen_address() -> None:
    no_key = Settings(api_key=None)
    assert listen_address(no_key.with_(http="127.0.0.1:8080")) == ("127.0.0.1", 8080)
    assert listen_address(no_key.with_(http="localhost:1")) == ("localhost", 1)
    assert listen_address(no_key.with_(http="[::1]:9000")) == ("::1", 9000)
    with pytest.raises(ConfigError, match="AUTOEMBED_API_KEY"):
        listen_address(no_key.with_(http="0.0.0.0:8080"))
    assert listen_address(no_key.with_(http="0.0.0.0:8080", api_key="k")) == ("0.0.0.0", 8080)
    for bad in ("8080", "host:", "host:port", ":8080", "h:70000"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            listen_address(no_key.with_(http=bad, api_key="k"))


def test_cli_refuses_public_address_without_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != "AUTOEMBED_API_KEY"}
    done = subprocess.run(
        [*AUTOEMBED, "serve", "--listen", "0.0.0.0:8080"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "AUTOEMBED_API_KEY" in done.stderr and "0.0.0.0:8080" in done.stderr
