"""What a failure means for the work it interrupted: one classifier for the daemon, the
webhook and the command line.

- ``OUTAGE``: the database (or the LLM server, for its lane) cannot be reached. Not the
  rows' fault: nothing is charged; the work is released once the server answers again.
- ``BUSY``: the work could not take a lock in time (a schema change holds the table, a
  model change holds the watch). Released with a short delay, no attempt charged.
- ``RETRY``: the work failed; it costs the job an attempt and a backoff.
- ``FAIL``: retrying cannot help (a configuration error, a model the server does not have,
  a row hidden by row-level security): the job fails now, with the reason.

Database errors are classified by SQLSTATE, never by exception class alone: psycopg raises
statement timeouts, deadlocks, lock timeouts, disk full and "value too long" as subclasses
of ``OperationalError`` too, and those are not outages.
"""

from __future__ import annotations

import enum

import psycopg
from psycopg_pool import PoolTimeout

from .errors import ConfigError, LLMModelMissing, LLMUnavailable


class Outcome(enum.Enum):
    OUTAGE = "outage"
    BUSY = "busy"
    RETRY = "retry"
    FAIL = "fail"


# connection exceptions, and the server going away (admin shutdown, crash, starting up)
_OUTAGE_STATES = frozenset({"57P01", "57P02", "57P03"})
# lock_not_available: our own lock_timeout gave way to DDL or to a model change
_BUSY_STATES = frozenset({"55P03"})


def sqlstate(exc: BaseException) -> str | None:
    if isinstance(exc, psycopg.Error):
        return exc.sqlstate
    return None


def is_db_outage(exc: BaseException) -> bool:
    """The database cannot be reached (as opposed to: it refused the statement)."""
    if isinstance(exc, PoolTimeout | psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state is None:
            # no SQLSTATE: raised by libpq or the driver itself (connection refused or lost)
            return isinstance(exc, psycopg.OperationalError)
        return state.startswith("08") or state in _OUTAGE_STATES
    return isinstance(exc, ConnectionError)


def is_outage(exc: BaseException) -> bool:
    """An outage of the database or of the LLM server: costs the work nothing."""
    return is_db_outage(exc) or isinstance(exc, LLMUnavailable)


def classify(exc: BaseException) -> Outcome:
    if is_outage(exc):
        return Outcome.OUTAGE
    if sqlstate(exc) in _BUSY_STATES:
        return Outcome.BUSY
    if isinstance(exc, ConfigError | LLMModelMissing):
        return Outcome.FAIL
    return Outcome.RETRY


def is_client_error(exc: BaseException) -> bool:
    """A database refusal caused by the input (bad value, too long, out of range): for the
    HTTP API, a 4xx rather than a 503."""
    state = sqlstate(exc)
    return state is not None and state[:2] in {"22", "23", "54", "42"}
