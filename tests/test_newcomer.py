"""The newcomer's path (issue 14): a daemon that can serve none of its watches says so,
with the way out, in its log, in `autoembed status` and in /healthz."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import AUTOEMBED, ROOT, worker_env
from .helpers import fetch, make_documents, wait_for

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_daemon_without_its_model_says_so_and_how_to_fix_it(
    db: Any, db_url: str, tmp_path: Path
) -> None:
    await make_documents(db)
    await db.execute("SELECT autoembed.watch('documents', 'content', model => 'gte-small')")
    await db.execute("INSERT INTO documents (content) VALUES ('waits for its model')")
    port = free_port()
    env = worker_env(
        db_url,
        AUTOEMBED_OFFLINE="1",  # a machine without network, as in the issue
        AUTOEMBED_CACHE_DIR=str(tmp_path / "empty-cache"),
        AUTOEMBED_MODEL="all-minilm-l6-v2",  # what the HTTP API serves
        AUTOEMBED_LEASE_SECONDS="3",
    )
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*AUTOEMBED, "run", "--http", f"127.0.0.1:{port}"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:

        async def explained() -> bool:
            text = log.read_text()
            return "model gte-small could not be loaded" in text and "Put its files" in text

        await wait_for(explained, timeout=120)
        text = log.read_text()
        assert str(tmp_path / "empty-cache" / "gte-small") in text  # the directory to fill

        async def unhealthy() -> Any:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            except httpx.HTTPError:
                return None
            return r if r.status_code == 503 else None

        r = await wait_for(unhealthy, timeout=120)
        body = r.json()
        assert body["ok"] is False and "gte-small" in json.dumps(body["checks"]["model"])

        async def reported() -> bool:
            rows = await fetch(db, "SELECT problems FROM autoembed.workers")
            return bool(rows) and any("model gte-small" in k for k in rows[0][0])

        await wait_for(reported, timeout=120)
        status = await asyncio.to_thread(
            subprocess.run,
            [*AUTOEMBED, "status"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert "model gte-small" in status.stdout and "Put its files" in status.stdout
        # nothing was charged to the row meanwhile
        assert await fetch(db, "SELECT status, attempts FROM autoembed.jobs") == [("pending", 0)]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
