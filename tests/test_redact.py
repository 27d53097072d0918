"""Passwords never reach the logs: real libpq errors, the real logging set-up, real workers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from urllib.parse import unquote

import psycopg
import pytest
from autoembed.logs import setup_logging
from autoembed.redact import MASK, RedactFilter, Redactor, passwords_in, redact, secrets_in
from psycopg.conninfo import conninfo_to_dict

from .conftest import AUTOEMBED, Server

# (URL, the password its author meant) — malformed, so libpq echoes pieces of it
BAD_URLS = [
    ("postgresql://u:p%zz@127.0.0.1:1/db", "p%zz"),
    ("postgresql://u:se@cret@127.0.0.1:1/db", "se@cret"),
    ("postgresql://u:abc@def%ghi@127.0.0.1:1/db", "abc@def%ghi"),
]


def fragments(password: str) -> set[str]:
    """Every piece of length >= 3 of the password, as written and percent-decoded."""
    out = set()
    for p in {password, unquote(password)}:
        out |= {p[i:j] for i in range(len(p)) for j in range(i + 3, len(p) + 1)}
    return out


def leaked(text: str, password: str) -> set[str]:
    return {f for f in fragments(password) if f in text}


def libpq_error(url: str) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        psycopg.connect(url, connect_timeout=5)
    return info.value


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(("url", "password"), BAD_URLS)
def test_libpq_echoes_the_password_and_redact_removes_it(url: str, password: str) -> None:
    message = str(libpq_error(url))
    # the premise: without redaction the error carries a piece of the password
    assert leaked(message, password), message
    clean = redact(message, url)
    assert not leaked(clean, password), clean
    assert MASK in clean
    assert not leaked(redact(f"connecting to {url} failed", url), password)


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize(("url", "password"), BAD_URLS)
def test_the_log_never_holds_the_password(
    url: str,
    password: str,
    fmt: str,
    restore_logging: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    exc = libpq_error(url)
    setup_logging("info", fmt, secrets=[url])  # type: ignore[arg-type]
    log = logging.getLogger("autoembed.test_redact")
    log.warning("database not reachable yet (%s); retrying", exc)
    try:
        raise exc
    except psycopg.Error:
        log.exception("cannot connect to %s", url, extra={"detail": str(exc)})
    err = capsys.readouterr().err
    assert "database not reachable yet" in err and "Traceback" in err
    assert not leaked(err, password), err
    if fmt == "json":
        docs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert len(docs) == 2
        assert "exc" in docs[1] and MASK in docs[1]["detail"]


def test_the_environment_url_is_known_without_being_passed(
    restore_logging: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, password = "postgresql://u:env%secret@127.0.0.1:1/db", "env%secret"
    monkeypatch.setenv("DATABASE_URL", url)
    exc = libpq_error(url)
    assert leaked(str(exc), password)
    setup_logging("info", "json")
    logging.getLogger("autoembed.test_redact").warning("failed: %s", exc)
    err = capsys.readouterr().err
    assert "failed" in err and not leaked(err, password), err


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize(("url", "password"), BAD_URLS[:2])
def test_a_retrying_worker_logs_no_password(url: str, password: str, fmt: str) -> None:
    """``autoembed run`` against a malformed URL: the pool's retries log libpq's message,
    again and again. Wait for three of them, then stop the worker."""
    env = {k: v for k, v in os.environ.items() if k not in ("TEST_DATABASE_URL", "PGPASSWORD")}
    env.update(DATABASE_URL=url, AUTOEMBED_OFFLINE="1")
    proc = subprocess.Popen(
        [*AUTOEMBED, "run", "--log-format", fmt],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if sum("error connecting" in x for x in lines) >= 3:
                break
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            lines.append(proc.stdout.read())
            proc.stdout.close()
    out = "".join(lines)
    assert sum("error connecting" in x for x in lines) >= 3, out
    assert not leaked(out, password), out
    if fmt == "json":
        assert all(json.loads(x)["msg"] for x in lines if x.startswith("{"))


def test_pieces_and_forms() -> None:
    assert passwords_in("postgresql://u:pa%40ss@h/db") >= {"pa%40ss", "pa@ss"}
    assert passwords_in("host=h password='it\\'s' user=u") == {"it's"}
    assert passwords_in("host=h user=u password=hunter2") == {"hunter2"}
    assert passwords_in("postgresql://u@h/db") == set()
    r = Redactor(pieces={"hunter2"})
    # every run covered by a piece of length >= 3 goes; shorter coincidences stay
    assert r("user hunter2 typed hun and ter, then hu") == "user *** typed *** and ***, then hu"
    assert r("dsn: host=h password=xy user=u") == "dsn: host=h password=*** user=u"
    assert r("see postgresql://bob:x@y@host/db") == "see postgresql://***@host/db"
    assert r("postgresql://bob@host/db stays") == "postgresql://bob@host/db stays"


def test_the_filter_scrubs_arguments_extras_and_exceptions() -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "got %s", ("s3cret!",), None)
    record.detail = "also s3cret! here"
    try:
        raise ValueError("boom s3cret!")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    assert RedactFilter(Redactor({"s3cret!"})).filter(record)
    text = logging.Formatter("%(message)s %(detail)s").format(record)
    assert "s3cr" not in text and "cret" not in text
    assert text.startswith("got *** also *** here") and "ValueError: boom ***" in text


def test_a_long_password_does_not_garble_ordinary_messages() -> None:
    """A long random password shares three-letter pieces with ordinary words ("cre" of
    "created"); only pieces of five characters or more of it are masked."""
    password = "Xcre9_kQ2pLm7vBn4tWzR8yHd3sFgJ6aE1uCoNiVbMx"
    message = "function public.match_u exists and was not created by autoembed"
    r = Redactor(pieces=[password])
    assert r(message) == message
    assert (
        r("failed to resolve host 'kQ2pLm7v@127.0.0.1'") == "failed to resolve host '***@127.0.0.1'"
    )
    short = Redactor(pieces=["se@cret"])
    assert (
        short("failed to resolve host 'cret@127.0.0.1'") == "failed to resolve host '***@127.0.0.1'"
    )


def test_which_passwords_are_masked_by_pieces() -> None:
    # malformed: libpq cannot parse it, or reads another password than the author meant
    assert secrets_in("postgresql://u:p%zz@h/db") == ({"p%zz"}, {"p%zz"})
    assert secrets_in("postgresql://u:se@cret@h/db")[1] >= {"se@cret"}
    # well-formed, percent-encoded or not: whole only
    assert secrets_in("postgresql://u:pa%40ss@h/db") == ({"pa%40ss", "pa@ss"}, set())
    assert secrets_in("host=h user=u password=hunter2") == ({"hunter2"}, set())
    # a password equal to the user name hides nothing: the URL forms only
    assert secrets_in("postgresql://postgres:postgres@h/postgres") == (set(), set())
    r = Redactor(whole={"secret"})
    assert r("the secret is secret. secretary; x-secret-y") == "the *** is ***. secretary; x-***-y"
    # 1 or 2 characters: the URL and conninfo forms only
    assert Redactor(whole={"xy"})("xy, password=xy") == "xy, password=***"
    assert Redactor(pieces={"se%cret"})("created") == "***ated"  # the README's example


def test_a_well_formed_short_password_garbles_no_message(
    restore_logging: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The password `secret` of a well-formed URL is masked where it stands, and nowhere
    else: "created" no longer reads "***ated"."""
    url = "postgresql://app:secret@127.0.0.1:1/db"
    monkeypatch.setenv("DATABASE_URL", url)
    exc = libpq_error(url)
    assert "secret" not in str(exc)  # the premise: libpq quotes no well-formed password
    setup_logging("info", "text")
    log = logging.getLogger("autoembed.test_redact")
    ordinary = "created 3 jobs; progress: the results were secreted by a secretary"
    log.warning(ordinary)
    log.warning("database not reachable yet (%s); retrying", exc)
    log.warning("dsn %s, and the password is secret", url)
    err = capsys.readouterr().err
    assert ordinary in err and str(exc).split("\n")[0] in err, err
    assert "the password is ***" in err and "postgresql://***@127.0.0.1:1/db" in err
    assert "secret," not in err and "is secret" not in err


def test_a_password_equal_to_the_user_name_leaves_the_user_named(
    server: Server, restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """``postgres:postgres``, the usual local set-up: the server's refusal still says which
    user it refused (masking that password would mask the user name everywhere)."""
    real = conninfo_to_dict(server.url)
    if "host" not in real or str(real["host"]).startswith("/"):
        pytest.skip("needs a server reached over TCP")
    who = "autoembed_nobody"
    url = f"postgresql://{who}:{who}@{real['host']}:{real.get('port', 5432)}/postgres"
    exc = libpq_error(url)
    assert who in str(exc)  # "password authentication failed for user ..." or "role ..."
    setup_logging("info", "text", secrets=[url])
    logging.getLogger("autoembed.test_redact").warning("cannot connect: %s", exc)
    err = capsys.readouterr().err
    assert f'"{who}"' in err, err
