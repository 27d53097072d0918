"""Keep database passwords out of logs and messages.

libpq and psycopg quote parts of a malformed connection string in their errors: with an
unencoded ``%`` or ``@`` in a URL's password they echo the text after the bad character
(``invalid percent-encoded token: "p%zz"``, ``failed to resolve host 'cret@127.0.0.1'``),
and a worker that retries logs that message again and again. A well-formed one they never
quote. So, for every secret known to the process (the password of each configured URL or
conninfo, ``PGPASSWORD``):

- the ``user:password@`` part of any URL in a text becomes ``***@``;
- ``password=...`` (conninfo or URL query) becomes ``password=***``;
- the password itself becomes ``***`` wherever it stands as a word of its own (not inside a
  longer word: ``secret`` goes, ``secretary`` stays), if it has 3 characters or more and
  is not also the user name (a password equal to the user name hides nothing, and masking
  it would hide which user a message is about);
- for the password of a *malformed* URL or conninfo (libpq cannot parse it, or reads
  another password than its author meant), also every run of characters covered by a
  substring of it of length >= 3 (>= 5 for a password of more than 12 characters): libpq
  may echo any piece of it. Pieces are masked only then: masking every three-letter piece
  of a password garbles ordinary words that share one (``secret`` made "created" read
  "***ated"), and a long random password has one of its 40 pieces in about one message of
  500 characters in twelve.

:func:`redact` applies this to one text for given connection strings; :func:`register` makes
a connection string's password known to the process, :func:`scrub` applies everything known,
and :class:`RedactFilter` (installed by :func:`autoembed.logs.setup_logging`) scrubs every log
record: message, arguments, exception and stack text, and extra fields.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import unquote

MASK = "***"
MIN_FRAGMENT = 3
LONG_SECRET = 12  # a secret longer than this is masked by pieces of LONG_FRAGMENT or more
LONG_FRAGMENT = 5


def fragment_length(secret: str) -> int:
    return LONG_FRAGMENT if len(secret) > LONG_SECRET else MIN_FRAGMENT


# environment variables that may hold a connection string or a password
URL_VARIABLES = ("DATABASE_URL", "TEST_DATABASE_URL")
PASSWORD_VARIABLES = ("PGPASSWORD",)

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# scheme://user:anything@ — greedy, so a password holding "@" is covered up to the last "@"
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^\s'\"/@:]*:[^\s'\"]*@")
_PASSWORD_KV = re.compile(
    r"(?P<key>\bpassword\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'?|[^\s&'\"]+)", re.IGNORECASE
)


def _libpq_reading(text: str) -> dict[str, Any] | None:
    """What libpq makes of a connection string (None: it cannot parse it)."""
    from psycopg import Error as DriverError
    from psycopg.conninfo import conninfo_to_dict

    try:
        return conninfo_to_dict(text)
    except DriverError:
        return None


def passwords_in(conninfo: str) -> set[str]:
    """The password(s) a URL or ``key=value`` conninfo holds, well-formed or not: what libpq
    parses, and what a reader would take for the password (up to the URL's last ``@``),
    each as written and percent-decoded."""
    text = conninfo.strip()
    found: set[str] = set()
    if not text:
        return found
    parsed = (_libpq_reading(text) or {}).get("password")
    if parsed:
        found.add(str(parsed))
    scheme = _SCHEME.match(text)
    if scheme:
        rest = text[scheme.end() :]
        userinfo = rest[: rest.rfind("@")] if "@" in rest else ""
        _user, sep, password = userinfo.partition(":")
        if sep and password:
            found.add(password)
    for m in _PASSWORD_KV.finditer(text):
        value = m.group("value")
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:].removesuffix("'"))
        if value:
            found.add(value)
    found |= {unquote(p) for p in found}
    return {p for p in found if p}


def secrets_in(conninfo: str) -> tuple[set[str], set[str]]:
    """``(whole, pieces)``: the passwords of ``conninfo`` to mask where they stand whole, and
    those whose pieces libpq may echo (all of them, when libpq cannot parse ``conninfo`` or
    reads another password than a reader would; else none). A well-formed password equal to
    the user name is in neither."""
    found = passwords_in(conninfo)
    if not found:
        return set(), set()
    reading = _libpq_reading(conninfo.strip()) or {}
    parsed = reading.get("password")
    if parsed is None or any(p != parsed and unquote(p) != parsed for p in found):
        return found, found
    return {p for p in found if p != reading.get("user")}, set()


class Redactor:
    """Removes a fixed set of secrets from texts: ``whole`` where one stands as a word of its
    own, ``pieces`` wherever a piece of one occurs (see the module's text)."""

    def __init__(self, whole: Iterable[str] = (), pieces: Iterable[str] = ()) -> None:
        self.pieces = frozenset(s for s in pieces if s)
        self.whole = frozenset(s for s in {*whole, *self.pieces} if len(s) >= MIN_FRAGMENT)
        longest_first = sorted(self.whole, key=lambda s: (-len(s), s))
        self._words = re.compile("|".join(map(_as_word, longest_first))) if self.whole else None
        grams = {
            s[i : i + fragment_length(s)]
            for s in self.pieces
            for i in range(len(s) - fragment_length(s) + 1)
        }
        # a zero-width look-ahead finds every position, overlapping ones included; the
        # longest pieces first, so that each match covers as much as it can
        self._grams = (
            re.compile(
                "(?=("
                + "|".join(re.escape(g) for g in sorted(grams, key=lambda g: (-len(g), g)))
                + "))"
            )
            if grams
            else None
        )

    def __call__(self, text: str) -> str:
        text = _USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", text)
        text = _PASSWORD_KV.sub(lambda m: m.group("key") + MASK, text)
        if self._words is not None:
            text = self._words.sub(MASK, text)
        if self._grams is None:
            return text
        covered = bytearray(len(text) + 1)
        for m in self._grams.finditer(text):
            size = len(m.group(1))
            covered[m.start() : m.start() + size] = b"\1" * size
        if not any(covered):
            return text
        out: list[str] = []
        i = 0
        while i < len(text):
            if covered[i]:
                out.append(MASK)
                while covered[i]:
                    i += 1
            else:
                out.append(text[i])
                i += 1
        return "".join(out)


def _as_word(secret: str) -> str:
    """A pattern for ``secret`` not inside a longer word: no word character next to an end
    of it that is a word character itself."""
    before = r"(?<!\w)" if re.match(r"\w", secret[0]) else ""
    after = r"(?!\w)" if re.match(r"\w", secret[-1]) else ""
    return before + re.escape(secret) + after


def redact(message: str, *conninfos: str) -> str:
    """``message`` without the passwords of ``conninfos`` or any echoed piece of them."""
    whole: set[str] = set()
    pieces: set[str] = set()
    for conninfo in conninfos:
        w, p = secrets_in(conninfo)
        whole |= w
        pieces |= p
    return Redactor(whole, pieces)(message)


# ---------------------------------------------------------------- the process's secrets

_lock = threading.Lock()
_known: set[tuple[str, bool]] = set()  # (password, whether its pieces are masked too)
_current = Redactor()


def register(*conninfos: str | None) -> None:
    """Make the passwords of these URLs/conninfos known to :func:`scrub` and the log filter."""
    found: set[tuple[str, bool]] = set()
    for conninfo in conninfos:
        if conninfo:
            whole, pieces = secrets_in(conninfo)
            found |= {(p, False) for p in whole} | {(p, True) for p in pieces}
    _add(found)


def register_password(*passwords: str | None) -> None:
    """Passwords given as such (``PGPASSWORD``): libpq never parses them, so only whole."""
    _add({(p, False) for p in passwords if p})


def register_environment(env: Mapping[str, str] | None = None) -> None:
    """The connection strings and passwords the environment holds."""
    env = os.environ if env is None else env
    register(*(env.get(k) for k in URL_VARIABLES))
    register_password(*(env.get(k) for k in PASSWORD_VARIABLES))


def _add(secrets: set[tuple[str, bool]]) -> None:
    global _current
    with _lock:
        if secrets <= _known:
            return
        _known.update(secrets)
        _current = Redactor(
            whole={s for s, _ in _known}, pieces={s for s, pieces in _known if pieces}
        )


def scrub(text: str) -> str:
    """``text`` without any secret known to the process (see :func:`register`)."""
    return _current(text)


_STD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}


class RedactFilter(logging.Filter):
    """Scrubs every record that passes: message with its arguments merged in, exception and
    stack text, and string extra fields. Attach it to a handler (a handler's filters see the
    records of every logger that propagates to it)."""

    def __init__(self, redactor: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self._redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        clean = self._redactor or scrub
        record.msg = clean(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = clean(record.exc_text)
        if record.stack_info:
            record.stack_info = clean(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if key not in _STD_ATTRS and isinstance(value, str):
                setattr(record, key, clean(value))
        return True
