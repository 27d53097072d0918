"""The embedded server: a password on TCP, a private socket, and no permission changed
outside the directories it creates."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from autoembed.errors import DatabaseError
from autoembed.pgserver import SYSTEM_USER, EmbeddedPostgres, _pginstall
from psycopg.conninfo import conninfo_to_dict

from .conftest import Server, url_of, worker_env

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="the server's user differs only as root")


@pytest.fixture(autouse=True)
def no_ambient_password(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only what a test passes may authenticate: no PGPASSWORD, no ~/.pgpass."""
    for key in ("PGPASSWORD", "PGPASSFILE", "PGHOST", "PGUSER", "PGSERVICE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))


@pytest.fixture
def embedded(server: Server) -> EmbeddedPostgres:
    if server.embedded is None:
        pytest.skip("the tests run against a server of their own (TEST_DATABASE_URL)")
    pg: EmbeddedPostgres = server.embedded
    return pg


def modes(*roots: Path, parents_of: tuple[Path, ...] = ()) -> dict[str, tuple[int, int, int]]:
    """(mode, uid, gid) of every path under ``roots`` and of every parent of ``parents_of``."""
    seen: dict[str, tuple[int, int, int]] = {}

    def note(p: Path) -> None:
        st = p.lstat()
        seen[str(p)] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)

    for path in parents_of:
        for p in [path, *path.parents]:
            note(p)
    for root in roots:
        note(root)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                note(Path(dirpath) / name)
    return seen


def clone_install(target: Path) -> Path:
    """The wheel's pginstall (and its bundled libraries) laid out under ``target`` as in
    site-packages, hard-linked where possible."""
    real = _pginstall()
    package = real.parent
    site = target / "site-packages"

    def link(src: str, dst: str) -> object:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        return dst

    shutil.copytree(real, site / package.name / real.name, copy_function=link, symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name, copy_function=link, symlinks=True)
    return site / package.name / real.name


def test_a_connection_without_the_password_is_refused(embedded: EmbeddedPostgres) -> None:
    assert embedded.password and len(embedded.password) >= 32
    base = f"postgresql://postgres@127.0.0.1:{embedded.port}/postgres"
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(base, connect_timeout=10)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(base, password="postgres", connect_timeout=10)
    with psycopg.connect(embedded.url) as conn:
        row = conn.execute(
            "SELECT rolpassword LIKE 'SCRAM-SHA-256$%%', current_setting('listen_addresses') "
            "FROM pg_authid WHERE rolname = 'postgres'"
        ).fetchone()
    assert row == (True, "127.0.0.1")
    assert conninfo_to_dict(embedded.url)["password"] == embedded.password


def test_the_socket_directory_is_private(embedded: EmbeddedPostgres) -> None:
    assert embedded.runtime is not None
    st = embedded.runtime.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700
    with psycopg.connect(embedded.socket_dsn("postgres")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    if os.geteuid() == 0:
        assert st.st_uid == pwd.getpwnam(SYSTEM_USER).pw_uid
        # any other user is kept out by the kernel, before PostgreSQL is asked
        nobody = pwd.getpwnam("nobody")
        denied = subprocess.run(
            ["/bin/sh", "-c", 'test -x "$1"', "sh", str(embedded.runtime)],
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            check=False,
        )
        assert denied.returncode != 0
    else:
        assert st.st_uid == os.geteuid()


def test_subprocesses_get_the_password_and_roles_use_the_socket(
    server: Server, embedded: EmbeddedPostgres
) -> None:
    env = worker_env(server.dsn("postgres"))
    assert embedded.password is not None
    assert f":{embedded.password}@127.0.0.1:" in env["DATABASE_URL"]
    probe = "import os, psycopg; psycopg.connect(os.environ['DATABASE_URL']).close()"
    subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=60)
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS pgserver_plain")
        conn.execute("CREATE ROLE pgserver_plain LOGIN")  # no password
    try:
        dsn = server.dsn("postgres", user="pgserver_plain")
        url = url_of(dsn)
        assert url.startswith("postgresql://pgserver_plain@%2F")
        for target in (dsn, url):
            with psycopg.connect(target) as conn:
                assert conn.execute("SELECT current_user").fetchone() == ("pgserver_plain",)
        # the same role over TCP has no password to give
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(
                f"postgresql://pgserver_plain@127.0.0.1:{embedded.port}/postgres",
                connect_timeout=10,
            )
    finally:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("DROP ROLE pgserver_plain")


def test_binaries_behind_a_closed_directory_change_no_permission(tmp_path: Path) -> None:
    """A venv under a 0700 directory (like /root): the server still starts, and no mode or
    owner changes anywhere, there or above the real venv and data."""
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    install = clone_install(closed)
    real = _pginstall()
    before = modes(tmp_path, real, parents_of=(Path(sys.prefix), real, Path(tempfile.gettempdir())))
    with EmbeddedPostgres(pginstall=install) as pg:
        assert pg.runtime is not None
        if os.geteuid() == 0:
            # the server's user cannot reach `closed`: it runs a private copy
            assert pg.bin.is_relative_to(pg.runtime)
        else:
            assert pg.bin == install.resolve() / "bin"
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION vector")  # lib/vector.so loads from where pg runs
            row = conn.execute("SELECT '[1,2]'::vector <-> '[1,3]'::vector").fetchone()
            assert row == (1.0,)
        pg.restart()
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        runtime = pg.runtime
    assert not runtime.exists()
    after = modes(tmp_path, real, parents_of=(Path(sys.prefix), real, Path(tempfile.gettempdir())))
    assert after == before


@ROOT_ONLY
def test_a_data_dir_the_server_cannot_reach_is_refused(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    before = modes(tmp_path, parents_of=(tmp_path,))
    pg = EmbeddedPostgres(closed / "a" / "data")
    with pytest.raises(DatabaseError, match="cannot reach"):
        pg.start()
    assert pg.runtime is None
    assert not (closed / "a").exists()  # what it made for the data, it removed
    assert modes(tmp_path, parents_of=(tmp_path,)) == before


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (tmp_path's parents are private to this user)."""
    path = Path(tempfile.mkdtemp(prefix="autoembed-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_kept_data_dir_keeps_its_password_across_restarts(open_dir: Path) -> None:
    data = open_dir / "data"
    with EmbeddedPostgres(data) as first:
        url, password = first.url, first.password
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
        first.restart()
        with psycopg.connect(url) as conn:  # the same URL works after a restart
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)
    assert (data / "PG_VERSION").exists()
    with EmbeddedPostgres(data) as second:
        assert second.password == password
        with psycopg.connect(second.url) as conn:
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)


def test_a_cluster_without_a_password_is_refused(open_dir: Path) -> None:
    data = open_dir / "data"
    with EmbeddedPostgres(data):
        pass
    (data / "autoembed-password").unlink()
    pg = EmbeddedPostgres(data)
    with pytest.raises(DatabaseError, match="not created with a password"):
        pg.start()
    assert pg.runtime is None  # a failed first start leaves nothing behind


def test_the_server_does_not_outlive_a_process_killed_with_9() -> None:
    """A test run killed by a timeout, a demo killed with -9: the watchdog stops the server
    and removes its private directory."""
    import signal
    import time

    program = (
        "import sys\n"
        "from autoembed.pgserver import EmbeddedPostgres\n"
        "pg = EmbeddedPostgres().start()\n"
        "pid = (pg.data_dir / 'postmaster.pid').read_text().split()[0]\n"
        "print(pid, pg.runtime, flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", program],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        pid_text, runtime = child.stdout.readline().split()
        postmaster = int(pid_text)
        os.kill(postmaster, 0)  # running
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 120  # an event (the server gone), with a generous cap
    while True:
        try:
            os.kill(postmaster, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the server outlived its process"
        time.sleep(0.05)
    while Path(runtime).exists():
        assert time.monotonic() < deadline, f"{runtime} was left behind"
        time.sleep(0.05)
