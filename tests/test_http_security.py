"""Attacks on the HTTP server, each performed against a real server (uvicorn on loopback,
or `autoembed serve` in its own process), and the legitimate path next to each: slow
clients, webhook keys the database cannot take, cross-site requests, and the official
OpenAI client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import psycopg
import pytest
from autoembed.config import Settings
from autoembed.engine import Embedder
from autoembed.errors import ConfigError
from autoembed.http import HttpServer, Limits, create_app, listen_address
from autoembed.outcomes import is_db_outage as _is_outage
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .helpers import worker_pool
from .test_http import (
    AUTH,
    AUTOEMBED,
    KEY,
    MODEL,
    Api,
    error_of,
    free_port,
    hook,
    http_only_table,
    jobs,
    make_settings,
    running,
)

JSON = {"Content-Type": "application/json"}
SLOW = Limits(header_timeout=2.0, body_timeout=2.0, max_connections=40)


# ---------------------------------------------------------------------------- helpers


async def open_slow(port: int, sent: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that sends ``sent`` (part of a request, or nothing) and stalls."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if sent:
        writer.write(sent)
        await writer.drain()
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 60.0) -> bytes:
    """What the server wrote before it closed the connection (it must close it in time)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionError:  # reset, or a write found it closed
        return b""


def raw_get(port: int, path: str = "/healthz") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return status, await asyncio.wait_for(reader.readexactly(length), 60)


@contextlib.asynccontextmanager
async def guarded(app: Any, limits: Limits = SLOW) -> AsyncIterator[Api]:
    server = HttpServer(app, "127.0.0.1", 0, shutdown_seconds=2, limits=limits)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            yield Api(server, client, app.state.service)
    finally:
        await server.stop()


@pytest.fixture
async def open_api(minilm: Embedder) -> AsyncIterator[Api]:
    """No API key (loopback mode: Host, Origin and JSON checked), short deadlines, 40
    connections at most."""
    app = create_app(make_settings(api_key=None), minilm)
    async with guarded(app) as api:
        yield api


@pytest.fixture
async def webhook_api(db_url: str, minilm: Embedder) -> AsyncIterator[Api]:
    async with (
        worker_pool(db_url) as pool,
        running(create_app(make_settings(database_url=db_url), minilm, pool=pool)) as a,
    ):
        yield a


# ---------------------------------------------------------------------------- slow clients


async def test_slow_clients_are_cut_and_never_lock_others_out(
    open_api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = open_api.server
    assert server.guard is not None
    port = server.port
    partial = b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Ty" % port
    # 3x the connection limit: connected and silent, or a request cut off mid-header
    slow = [await open_slow(port, partial if i % 2 else b"") for i in range(120)]
    try:
        # while they are all held open, new clients are served
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as fresh:
            assert (await fresh.get("/healthz")).status_code == 200
            r = await fresh.post("/embed", json={"input": "still serving"})
            assert r.status_code == 200 and len(r.json()["embedding"]) == 384
        # and every slow one is closed: evicted for a newer one, or at its header deadline
        # (with a 408 when it had begun a request)
        answers = await asyncio.gather(*(closed_by_server(reader) for reader, _ in slow))
    finally:
        for _, writer in slow:
            writer.close()
    assert all(a == b"" or a.startswith(b"HTTP/1.1 408 ") for a in answers), answers
    timed_out = [a for a in answers if a]
    assert timed_out, "no slow client was answered 408"
    body = json.loads(timed_out[0].split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout"
    closed = server.guard.closed
    assert closed["evicted"] >= 120 - SLOW.max_connections
    assert closed["header_timeout"] >= 1
    assert len(server.guard.open) <= 2  # what is left: at most our own client's connection
    metrics = (await open_api.client.get("/metrics")).text
    assert 'autoembed_http_connections_closed_total{reason="evicted"}' in metrics
    # a few lines about it, not one per connection
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) <= 10, [r.getMessage() for r in lines]


async def test_slow_body_is_cut_with_408(open_api: Api) -> None:
    port = open_api.server.port
    head = (
        b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: 200\r\n\r\n" % port
    )
    reader, writer = await open_slow(port, head + b'{"input": "a body that ne')
    try:
        answer = await closed_by_server(reader)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert open_api.server.guard is not None
    assert open_api.server.guard.closed["body_timeout"] == 1
    # the server is none the worse
    assert (await open_api.client.get("/healthz")).status_code == 200


async def test_keep_alive_and_split_requests_still_work(open_api: Api) -> None:
    """The deadlines restart per request: one connection serves request after request, and
    a request that arrives in pieces (within the deadline) is served."""
    port = open_api.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(3):
            writer.write(raw_get(port))
            await writer.drain()
            status, body = await read_response(reader)
            assert status == 200 and json.loads(body)["ok"] is True
        payload = json.dumps({"input": "sent in pieces"}).encode()
        request = (
            b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (port, len(payload))
        ) + payload
        for i in range(0, len(request), 16):
            writer.write(request[i : i + 16])
            await writer.drain()
        status, body = await read_response(reader)
        assert status == 200 and len(json.loads(body)["embedding"]) == 384
    finally:
        writer.close()


@pytest.fixture(scope="module")
def served(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`autoembed serve` in its own process, with an API key, under an open-file limit of
    256, with 2 s request deadlines; its log goes to a file."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env.update(
        AUTOEMBED_MODEL=MODEL,
        AUTOEMBED_DEVICE="cpu",
        AUTOEMBED_THREADS="1",
        AUTOEMBED_API_KEY=KEY,
        AUTOEMBED_HTTP_HEADER_TIMEOUT="2",
        AUTOEMBED_HTTP_BODY_TIMEOUT="2",
        PYTHONUNBUFFERED="1",
    )
    # the incident's small open-file limit (soft and hard), then the server
    limited = ["bash", "-c", 'ulimit -n 256 && exec "$@"', "bash"]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [*limited, *AUTOEMBED, "serve", "--listen", f"127.0.0.1:{port}"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield {"url": url, "port": port, "log": log_path, "proc": proc}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def test_serve_survives_a_slow_client_flood(served: dict[str, Any]) -> None:
    """The incident: slow connections past the process's open-file limit. `autoembed serve`
    keeps answering /healthz, closes them all, and logs a few lines, not a line per accept."""
    port, log_path = served["port"], served["log"]
    lines_before = len(log_path.read_text().splitlines())
    partial = b"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port

    async def one(i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        with contextlib.suppress(OSError, TimeoutError):
            return await asyncio.wait_for(open_slow(port, partial if i % 2 else b""), 60)
        return None

    slow = [c for c in await asyncio.gather(*(one(i) for i in range(400))) if c is not None]
    try:
        assert len(slow) > 256  # more than the server could ever hold open
        async with httpx.AsyncClient(base_url=served["url"], timeout=60) as client:
            r = await client.get("/healthz")
            assert r.status_code == 200, r.text
        # A flood overflows the kernel's queues: past the SYN backlog Linux answers with
        # SYN cookies and keeps no state, and a handshake's last ACK that meets a full accept
        # queue is dropped. The client then believes open a connection that the server has
        # not accepted yet or never will (no retry, no RST: an idle client would wait for
        # ever; seen once in CI). One byte from each connection settles it: the kernel queues
        # it (the server then closes it), or resets it.
        for _, writer in slow:
            with contextlib.suppress(OSError):
                writer.write(b"P")
        answers = await asyncio.gather(*(closed_by_server(reader) for reader, _ in slow))
    finally:
        for _, writer in slow:
            writer.close()
    assert all(a == b"" or a.startswith(b"HTTP/1.1 408 ") for a in answers)
    async with httpx.AsyncClient(base_url=served["url"], timeout=60) as client:
        r = await client.post("/embed", json={"input": "after the flood"}, headers=AUTH)
        assert r.status_code == 200
        metrics = (await client.get("/metrics")).text
    assert 'autoembed_http_connections_closed_total{reason="evicted"}' in metrics
    logged = log_path.read_text().splitlines()[lines_before:]
    assert len(logged) <= 20, "\n".join(logged[:50])
    assert not any("out of system resource" in line for line in logged)


# ---------------------------------------------------------------------------- OpenAI's client


@pytest.fixture
async def oai(served: dict[str, Any]) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(api_key=KEY, base_url=f"{served['url']}/v1", max_retries=0)
    async with client:
        yield client


async def test_openai_client_default_is_base64_decoded(
    oai: openai.AsyncOpenAI, minilm: Embedder
) -> None:
    # without encoding_format the SDK asks for base64 and decodes it itself
    texts = ["hello world", "vacuum reclaims storage", "an index without blocking writes"]
    result = await oai.embeddings.create(model=MODEL, input=texts)
    assert result.model == MODEL and result.object == "list"
    assert [d.index for d in result.data] == [0, 1, 2]
    vectors = np.array([d.embedding for d in result.data])
    np.testing.assert_allclose(vectors, minilm.embed(texts), atol=1e-5)
    tokens = minilm.encode(texts).total_tokens
    assert result.usage.prompt_tokens == tokens and result.usage.total_tokens == tokens


async def test_openai_client_float_and_base64(oai: openai.AsyncOpenAI, minilm: Embedder) -> None:
    text = "PostgreSQL keeps embeddings next to the rows they describe"
    expected = minilm.embed([text])[0]
    floats = await oai.embeddings.create(model=MODEL, input=text, encoding_format="float")
    np.testing.assert_allclose(np.array(floats.data[0].embedding), expected, atol=1e-5)
    b64 = await oai.embeddings.create(model=MODEL, input=[text], encoding_format="base64")
    raw = b64.data[0].embedding
    assert isinstance(raw, str)  # asked for explicitly: the SDK leaves it as sent
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(raw), "<f4"), expected, atol=1e-6)
    aliased = await oai.embeddings.create(
        model="sentence-transformers/all-MiniLM-L6-v2", input=text, dimensions=384
    )
    np.testing.assert_allclose(np.array(aliased.data[0].embedding), expected, atol=1e-5)


async def test_openai_client_errors(oai: openai.AsyncOpenAI) -> None:
    # token ids (what LangChain's OpenAIEmbeddings sends by default): 422 with the setting
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await oai.embeddings.create(model=MODEL, input=[[101, 7592, 2088, 102]])
    assert "check_embedding_ctx_length=False" in str(caught.value)
    with pytest.raises(openai.NotFoundError):
        await oai.embeddings.create(model="text-embedding-3-small", input="x")
    wrong = openai.AsyncOpenAI(api_key="wrong", base_url=str(oai.base_url), max_retries=0)
    async with wrong:
        with pytest.raises(openai.AuthenticationError):
            await wrong.embeddings.create(model=MODEL, input="x")


# ---------------------------------------------------------------------------- cross-site


async def test_json_is_required(open_api: Api) -> None:
    body = json.dumps({"input": "a simple cross-site request"})
    for headers in (
        {"Content-Type": "text/plain"},
        {},
        {"Content-Type": "application/x-www-form-urlencoded"},
    ):
        r = await open_api.client.post("/embed", content=body, headers=headers)
        assert r.status_code == 415, (headers, r.text)
        assert error_of(r)["code"] == "unsupported_media_type"
    for media in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        r = await open_api.client.post("/embed", content=body, headers={"Content-Type": media})
        assert r.status_code == 200, (media, r.text)


async def test_foreign_host_and_origin_are_refused(open_api: Api) -> None:
    port, get = open_api.server.port, open_api.client.get
    # DNS rebinding: the page's own name in Host, pointed at 127.0.0.1
    for host in (f"evil.example:{port}", "evil.example", f"localhost:{port + 1}", "localhost"):
        r = await get("/healthz", headers={"Host": host})
        assert r.status_code == 400, (host, r.text)
        assert error_of(r)["code"] == "invalid_host" and "ok" not in r.text
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"LOCALHOST.:{port}"):
        assert (await get("/healthz", headers={"Host": host})).status_code == 200, host
    # a page on another site (or another local port) posting JSON
    for origin in ("https://evil.example", f"http://localhost:{port + 1}", "null", "garbage"):
        r = await open_api.client.post("/embed", json={"input": "x"}, headers={"Origin": origin})
        assert r.status_code == 403, (origin, r.text)
        assert error_of(r)["code"] == "origin_not_allowed"
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
        r = await open_api.client.post("/embed", json={"input": "x"}, headers={"Origin": origin})
        assert r.status_code == 200, origin


async def test_configured_hosts_and_origins(minilm: Embedder) -> None:
    settings = make_settings(
        api_key=None,
        http_allowed_hosts="embed.internal, 10.1.2.3:9000",
        http_allowed_origins="https://app.example.com",
    )
    async with guarded(create_app(settings, minilm)) as api:
        get = api.client.get
        for host, status in (
            ("embed.internal", 200),
            ("embed.internal:1234", 200),
            ("10.1.2.3:9000", 200),
            ("10.1.2.3:9001", 400),
            ("other.internal", 400),
        ):
            assert (await get("/healthz", headers={"Host": host})).status_code == status, host
        ok = {"Origin": "https://app.example.com"}
        assert (await api.client.post("/embed", json={"input": "x"}, headers=ok)).status_code == 200
        bad = {"Origin": "https://app.example.com.evil"}
        assert (
            await api.client.post("/embed", json={"input": "x"}, headers=bad)
        ).status_code == 403


async def test_with_a_key_host_is_free_unless_configured(minilm: Embedder) -> None:
    async with guarded(create_app(make_settings(), minilm)) as api:  # key, behind a proxy
        r = await api.client.post(
            "/embed", json={"input": "x"}, headers={**AUTH, "Host": "embed.example.com"}
        )
        assert r.status_code == 200
        r = await api.client.post(
            "/embed", content=b'{"input": "x"}', headers={**AUTH, "Content-Type": "text/plain"}
        )
        assert r.status_code == 415  # JSON is required all the same
    settings = make_settings(http_allowed_hosts="embed.example.com")
    async with guarded(create_app(settings, minilm)) as api:
        for host, status in (("embed.example.com", 200), ("evil.example", 400)):
            r = await api.client.post("/embed", json={"input": "x"}, headers={**AUTH, "Host": host})
            assert r.status_code == status, host


def test_host_settings_are_checked() -> None:
    no_key = Settings(api_key=None, http="127.0.0.1:8080")
    for field in ("http_allowed_hosts", "http_allowed_origins"):
        with pytest.raises(ConfigError, match="AUTOEMBED_API_KEY"):
            listen_address(no_key.with_(**{field: "*"}))
        assert listen_address(no_key.with_(api_key="k", **{field: "*"})) == ("127.0.0.1", 8080)
    with pytest.raises(ConfigError, match="ALLOWED_HOSTS"):
        listen_address(no_key.with_(http_allowed_hosts="http://x.example/"))
    with pytest.raises(ConfigError, match="ALLOWED_ORIGINS"):
        listen_address(no_key.with_(http_allowed_origins="app.example.com"))
    env = {"AUTOEMBED_HTTP_HEADER_TIMEOUT": "2.5", "AUTOEMBED_HTTP_MAX_CONNECTIONS": "7"}
    settings = Settings.from_env(env)
    assert (settings.http_header_timeout, settings.http_max_connections) == (2.5, 7)
    with pytest.raises(ConfigError, match="http_body_timeout"):
        Settings(http_body_timeout=0)


# ---------------------------------------------------------------------------- webhook input


async def test_webhook_keys_the_column_cannot_hold_are_422(db: Any, webhook_api: Api) -> None:
    await http_only_table(db)  # id bigint
    post = webhook_api.client.post
    for key in (10**30, 2**63, -(2**63) - 1, "99999999999999999999999", "12x", 1.5, True):
        r = await post("/webhook", json=hook("INSERT", {"id": key, "content": "x"}), headers=AUTH)
        assert r.status_code == 422, (key, r.text)
        assert error_of(r)["param"] == "record.id"
    assert await jobs(db) == []  # nothing queued: no batch to poison
    for key, stored in ((2**63 - 1, str(2**63 - 1)), (-(2**63), str(-(2**63))), (" 12 ", "12")):
        r = await post("/webhook", json=hook("INSERT", {"id": key, "content": "x"}), headers=AUTH)
        assert r.status_code == 202, (key, r.text)
        assert stored in [j[0] for j in await jobs(db)]


async def test_webhook_small_and_text_keys(db: Any, webhook_api: Api) -> None:
    await http_only_table(db, "small", "smallint")
    await http_only_table(db, "named", "text")
    await http_only_table(db, "coded", "varchar(4)")
    post = webhook_api.client.post
    cases: list[tuple[str, Any, int]] = [
        ("small", 32767, 202),
        ("small", 32768, 422),
        ("named", "k" * 3000, 422),  # was 503 database_unavailable, retried for ever
        ("named", "é" * 600, 422),  # 1,200 bytes
        ("named", "nul\x00key", 422),
        ("named", "k" * 1024, 202),
        ("coded", "abcd", 202),
        ("coded", "abcdef", 422),  # an explicit cast would cut it to another row's key
    ]
    for table, key, status in cases:
        r = await post(
            "/webhook", json=hook("INSERT", {"id": key, "content": "x"}, table=table), headers=AUTH
        )
        assert r.status_code == status, (table, str(key)[:20], r.text)
        assert "retry-after" not in r.headers
        if status == 422:
            assert error_of(r)["param"] == "record.id"
    assert sorted(j[0] for j in await jobs(db)) == sorted(["32767", "k" * 1024, "abcd"])


async def test_webhook_only_an_outage_is_503(db_url: str, minilm: Embedder) -> None:
    # nothing listens there: connection refused, then the pool's timeout
    dead = make_conninfo(db_url, port=free_port(), connect_timeout=2)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(dead, min_size=1, open=False, timeout=1)
    await pool.open(wait=False)
    try:
        async with running(create_app(make_settings(), minilm, pool=pool)) as api:
            r = await api.client.post("/webhook", json=hook("INSERT", {"id": 1}), headers=AUTH)
    finally:
        await pool.close()
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert error_of(r)["code"] == "database_unavailable"


async def test_webhook_refused_statement_is_not_an_outage(
    db: Any, db_url: str, minilm: Embedder
) -> None:
    await http_only_table(db)
    role = f"nobody_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        make_conninfo(db_url, user=role, password="pw"), min_size=1, open=False
    )
    try:
        await pool.open(wait=True)
        async with running(create_app(make_settings(), minilm, pool=pool)) as api:
            r = await api.client.post(
                "/webhook", json=hook("INSERT", {"id": 1, "content": "x"}), headers=AUTH
            )
        assert r.status_code == 500, r.text  # permission denied: not "try again in 1 s"
        assert error_of(r)["code"] == "database_error" and "retry-after" not in r.headers
    finally:
        await pool.close()
        await db.execute(f"DROP ROLE {role}")


def test_outage_classification() -> None:
    outages: list[BaseException] = [
        psycopg.errors.AdminShutdown(),
        psycopg.errors.CrashShutdown(),
        psycopg.errors.CannotConnectNow(),
        psycopg.errors.ConnectionFailure(),
        psycopg.OperationalError("server closed the connection unexpectedly"),
        psycopg.InterfaceError("the connection is closed"),
        PoolTimeout("couldn't get a connection after 1.00 sec"),
        ConnectionRefusedError(),
    ]
    refusals: list[BaseException] = [
        psycopg.errors.ProgramLimitExceeded(),
        psycopg.errors.QueryCanceled(),
        psycopg.errors.NumericValueOutOfRange(),
        psycopg.errors.InsufficientPrivilege(),
        psycopg.errors.UniqueViolation(),
        ValueError(),
    ]
    assert all(_is_outage(e) for e in outages)
    assert not any(_is_outage(e) for e in refusals)
