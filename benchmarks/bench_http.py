"""Load benchmark of ``autoembed serve``: concurrent clients on ``POST /embed`` over loopback,
then the engine alone on the same texts in the same run, and the ratio of the two rates.

    python benchmarks/bench_http.py                       # 200 clients for 30 s
    python benchmarks/bench_http.py --clients 50 --seconds 10 --model all-minilm-l6-v2

The server runs in a subprocess (``python -m autoembed.cli serve --listen 127.0.0.1:PORT``);
the clients are coroutines of this process, each sending one text per request (PostgreSQL
documentation passages from ``worker/data/pgdocs.jsonl.gz``) and the next as soon as the
answer comes. They share httpx.AsyncClients of ``--connections-per-client`` connections
(default 10) rather than one client with a pool of 200: httpcore's pool bookkeeping scans
every connection for each idle one on every request event (O(connections^2)), so one
200-connection client burns CPU that the server's engine needs on a small machine. The
benchmark prints the client's CPU time per request; ``--connections-per-client 200`` gives
the single-client set-up for comparison. No new request starts after ``--seconds``; those
in flight are waited for, and the rate is texts answered over the time until the last
answer. The engine alone then embeds exactly the texts that were sent, in one
``Embedder.embed`` call (the engine cuts its own batches), with the server stopped so
both phases have the cores to themselves. Target: HTTP texts/s >= 0.9 x the engine's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autoembed.engine import Embedder  # noqa: E402

CORPUS = ROOT / "worker" / "data" / "pgdocs.jsonl.gz"


def load_texts() -> list[str]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line)["content"] for line in f if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_healthy(client: httpx.AsyncClient, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            if (await client.get("/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the server did not become healthy within 180 s")


JSON_HEADERS = {"content-type": "application/json"}


async def load(
    pools: list[httpx.AsyncClient],
    texts: list[str],
    clients: int,
    seconds: float,
    max_requests: int,
) -> tuple[list[float], list[str], int, float]:
    """Latencies of the answered requests, their texts, errors, and the elapsed time."""
    latencies: list[float] = []
    sent: list[str] = []
    answered: list[str] = []
    errors = 0
    started = time.perf_counter()
    deadline = started + seconds
    last = started

    async def one_client(client: httpx.AsyncClient) -> None:
        nonlocal errors, last
        while time.perf_counter() < deadline and len(sent) < max_requests:
            text = texts[len(sent) % len(texts)]
            sent.append(text)
            t0 = time.perf_counter()
            try:
                r = await client.post(
                    "/embed", content=json.dumps({"input": text}), headers=JSON_HEADERS
                )
                # a cheap check: parsing 384 floats per answer would cost the load
                # generator more CPU than the server spends on the request
                ok = r.status_code == 200 and r.content.startswith(b'{"embedding":[')
            except httpx.HTTPError:
                ok = False
            t1 = time.perf_counter()
            if ok:
                latencies.append(t1 - t0)
                answered.append(text)
                last = max(last, t1)
            else:
                errors += 1

    await asyncio.gather(*(one_client(pools[i % len(pools)]) for i in range(clients)))
    return latencies, answered, errors, last - started


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else float("nan")


async def drive(
    args: argparse.Namespace, port: int, texts: list[str], server: subprocess.Popen[bytes]
) -> tuple[list[float], list[str], int, float, float, str]:
    per = min(args.connections_per_client, args.clients)
    limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
    timeout = httpx.Timeout(args.seconds + 300, connect=60)
    async with contextlib.AsyncExitStack() as stack:
        pools = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}",
                    limits=limits,
                    timeout=timeout,
                    verify=False,  # plain HTTP on loopback; skips loading a CA bundle per client
                )
            )
            for _ in range(-(-args.clients // per))
        ]
        await wait_healthy(pools[0], server)
        for text in texts[-8:]:  # warm-up (not counted)
            (await pools[0].post("/embed", json={"input": text})).raise_for_status()
        cpu = time.process_time()
        latencies, done, errors, elapsed = await load(
            pools, texts, args.clients, args.seconds, args.max_requests
        )
        cpu = time.process_time() - cpu
        scraped = (await pools[0].get("/metrics")).text
    return latencies, done, errors, elapsed, cpu, scraped


def run(args: argparse.Namespace) -> None:
    texts = load_texts()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"machine: {cores} usable core(s) (os.cpu_count() = {os.cpu_count()}); load average "
        f"{os.getloadavg()[0]:.2f} before (other work on the machine skews both phases)"
    )
    print(
        f"model {args.model} on cpu; {args.clients} clients for {args.seconds:g} s on "
        f"POST /embed, one text per request ({len(texts)} pgdocs passages, "
        f"mean {np.mean([len(t.split()) for t in texts]):.0f} words)"
    )

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "AUTOEMBED_API_KEY")}
    with tempfile.NamedTemporaryFile(
        prefix="bench_http-server-", suffix=".log", delete=False
    ) as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "autoembed.cli",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--model",
                args.model,
                "--device",
                "cpu",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        # the load generator yields the cores to the server (it only has to keep requests
        # outstanding); alone on the machine afterwards, the engine phase is unaffected
        os.nice(10)
        try:
            latencies, done, errors, elapsed, client_cpu, scraped = asyncio.run(
                drive(args, port, texts, server)
            )
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                code = server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                code = server.wait()
    if code != 0:
        print(f"warning: the server exited with code {code} (log: {log.name})")
    else:
        os.unlink(log.name)

    answered = len(done)
    http_rate = answered / elapsed
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if latencies else (np.nan,) * 3
    requests = metric(scraped, "autoembed_http_embed_requests_total")
    calls = metric(scraped, "autoembed_http_engine_calls_total")
    print(
        f"http:   {answered} requests answered ({errors} errors) in {elapsed:.1f} s: "
        f"{http_rate:.1f} requests/s, {http_rate:.1f} texts/s"
    )
    print(
        f"        latency p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms; {requests / calls:.1f} requests per engine call "
        f"({requests:.0f} requests, {calls:.0f} engine calls, warm-up included)"
    )
    per = min(args.clients, args.connections_per_client)
    print(
        f"        load generator: {client_cpu / max(answered + errors, 1) * 1000:.1f} ms CPU "
        f"per request ({client_cpu:.1f} s in all; {-(-args.clients // per)} httpx "
        f"client(s) of {per} connections)"
    )

    # the engine alone on the texts that were answered, in one call
    emb = Embedder.load(args.model, device="cpu")
    emb.embed(texts[-8:])  # warm-up, as the server had
    started = time.perf_counter()
    emb.embed(done)
    engine_seconds = time.perf_counter() - started
    engine_rate = answered / engine_seconds
    print(
        f"engine: {answered} texts in {engine_seconds:.1f} s: {engine_rate:.1f} texts/s "
        f"(Embedder.embed, batched by the engine itself)"
    )
    ratio = http_rate / engine_rate
    verdict = "meets" if ratio >= 0.9 else "misses"
    print(
        f"ratio:  http texts/s / engine texts/s = {ratio:.2f} ({verdict} the 0.9 target); "
        f"load average {os.getloadavg()[0]:.2f} after"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=200, help="concurrent clients (default 200)")
    p.add_argument("--seconds", type=float, default=30.0, help="load duration (default 30)")
    p.add_argument("--model", default="all-minilm-l6-v2")
    p.add_argument(
        "--connections-per-client",
        type=int,
        default=10,
        metavar="N",
        help="connections per httpx.AsyncClient (default 10; 200: one client)",
    )
    p.add_argument(
        "--max-requests",
        type=int,
        default=100_000,
        help="stop after this many requests, whatever the time (default 100000)",
    )
    args = p.parse_args()
    if min(args.clients, args.seconds, args.max_requests, args.connections_per_client) <= 0:
        p.error(
            "--clients, --seconds, --max-requests and --connections-per-client must be positive"
        )
    run(args)


if __name__ == "__main__":
    main()
