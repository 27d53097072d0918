"""Connection limits of the HTTP server: header and body deadlines, a cap on open
connections, and accept errors logged without flooding the log.

uvicorn (0.54, h11) enforces none of these itself: its keep-alive timeout runs only between
requests and any byte cancels it, so a client that sends a request a byte at a time (or
nothing at all) keeps its connection for ever; ``limit_concurrency`` answers 503 to requests
whose headers are complete but closes no connection, so slow clients that fill the server
lock everybody else out. And when the process runs out of file descriptors, asyncio's
accept loop logs one error per accept attempt, thousands a second.

So the server speaks uvicorn's own h11 protocol (:class:`GuardedProtocol`) with:

- a header deadline: from the moment a connection opens (or its previous answer ends) to
  the end of the request's headers, ``header_timeout`` seconds, however the bytes trickle;
- a body deadline: from the end of the headers to the end of the body, ``body_timeout``;
- when one passes: a JSON 408 if the client had begun a request and no answer has started,
  then the connection is closed;
- a cap: a connection that takes the count past ``max_connections`` closes the oldest one
  that has not finished sending its request (one waiting for its headers first: idle
  keep-alive or slow); with none such, the new one is answered 503 and closed. Slow clients
  cannot lock out new ones, and the file descriptors they hold stay bounded;
- the cap and the listen backlog are fitted to the process's open-file limit (raised to its
  hard limit where that is needed and allowed), so accepting never runs out of descriptors;
  if it does all the same (other code holds them), the error is logged once per 10 seconds
  with a count, not once per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

RESERVE_FDS = 64  # descriptors kept for everything but HTTP connections (pool, model, logs)
MAX_BACKLOG = 2048  # uvicorn's default: the listen queue and the accepts per loop iteration
ACCEPT_ERROR = "socket.accept() out of system resource"  # asyncio's message (selector loop)


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1000


class Throttle:
    """Logs a recurring event at most once per ``interval`` seconds per key, saying how many
    were left out since."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger, self.interval, self.clock = logger, interval, clock
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = self.clock()
        last, skipped = self._last.get(key, (None, 0))
        if last is not None and now - last < self.interval:
            self._last[key] = (last, skipped + 1)
            return
        if skipped:
            message += " (%d more like it in the last %.0f s)"
            args = (*args, skipped, now - (last or now))
        self._last[key] = (now, 0)
        self.logger.warning(message, *args)


def _error_response(status: int, reason: str, code: str, message: str, **headers: str) -> bytes:
    """A complete HTTP/1.1 answer in the API's JSON error shape, written past h11 (the
    connection closes right after it)."""
    error = {"message": message, "type": "invalid_request_error", "code": code, "param": None}
    body = json.dumps({"error": error}).encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


class ConnectionGuard:
    """The open connections of one server, their cap, and why connections were closed
    (``closed``: header_timeout, body_timeout, evicted, refused)."""

    def __init__(self, limits: Limits, cap: int | None = None) -> None:
        self.limits = limits
        self.cap = cap if cap is not None else limits.max_connections
        self.open: dict[GuardedProtocol, None] = {}  # insertion-ordered: oldest first
        self.closed: Counter[str] = Counter()
        self.throttle = Throttle(log)
        self.timed_out = {
            "head": _error_response(
                408,
                "Request Timeout",
                "request_timeout",
                f"the request headers did not arrive within {limits.header_timeout:g} s",
            ),
            "body": _error_response(
                408,
                "Request Timeout",
                "request_timeout",
                f"the request body did not arrive within {limits.body_timeout:g} s",
            ),
        }
        self.busy = _error_response(
            503,
            "Service Unavailable",
            "too_many_connections",
            f"{self.cap} connections are open and all are busy; try again",
            retry_after="1",
        )

    def protocol(self) -> type[GuardedProtocol]:
        """uvicorn's ``http`` protocol class, bound to this guard."""

        class Guarded(GuardedProtocol):
            pass

        Guarded.guard = self
        return Guarded

    def admit(self, conn: GuardedProtocol) -> bool:
        self.open[conn] = None
        if len(self.open) <= self.cap:
            return True
        victim = self._victim(conn)
        if victim is None:
            self.throttle.warning(
                "busy",
                "%d HTTP connections open (the limit), all with requests in progress: "
                "refusing new ones with 503 (AUTOEMBED_HTTP_MAX_CONNECTIONS)",
                self.cap,
            )
            conn.close_for("refused", self.busy)
            return False
        self.throttle.warning(
            "evict",
            "%d HTTP connections open (the limit): closing the oldest that has not sent a "
            "whole request (AUTOEMBED_HTTP_MAX_CONNECTIONS)",
            self.cap,
        )
        victim.close_for("evicted", None)
        return True

    def forget(self, conn: GuardedProtocol) -> None:
        self.open.pop(conn, None)

    def _victim(self, new: GuardedProtocol) -> GuardedProtocol | None:
        waiting = [c for c in self.open if c is not new and c.phase is not None]
        if not waiting:
            return None
        return min(waiting, key=lambda c: (c.phase != "head", c.since))

    def timed_out_log(self, phase: str) -> None:
        what = "headers" if phase == "head" else "body"
        limit = self.limits.header_timeout if phase == "head" else self.limits.body_timeout
        self.throttle.warning(
            phase,
            "closed an HTTP connection whose request %s did not arrive within %g s",
            what,
            limit,
        )


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with the header and body deadlines and the connection cap of
    :class:`ConnectionGuard` (bound per server: see ``ConnectionGuard.protocol``)."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase: str | None = None  # "head": waiting for headers; "body": for the body
        self.since = 0.0
        self._began = False  # bytes of the awaited request have arrived
        self._deadline: asyncio.TimerHandle | None = None

    # -------------------------------------------------------------- uvicorn's hooks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        super().connection_made(transport)
        if self.guard.admit(self):
            self._track()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track()
        if self.phase == "head" and data:
            self._began = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self.guard.forget(self)
        super().connection_lost(exc)

    # -------------------------------------------------------------- deadlines

    def _track(self) -> None:
        """Start the deadline of the phase the request is in, when it changes."""
        if self.transport is None or self.transport.is_closing():
            self._cancel()
            return
        state = self.conn.their_state
        phase = "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if phase == self.phase:
            return
        self._cancel()
        self.phase, self.since, self._began = phase, self.loop.time(), False
        if phase is not None:
            limits = self.guard.limits
            seconds = limits.header_timeout if phase == "head" else limits.body_timeout
            self._deadline = self.loop.call_later(seconds, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.phase is None:
            return
        cycle = self.cycle
        answer = False
        if self.phase == "head":
            answer = self._began
        elif cycle is not None and not cycle.response_complete:
            answer = not cycle.response_started
            cycle.disconnected = True  # the app's receive() sees a disconnect, its send() a no-op
            cycle.message_event.set()
        self.guard.timed_out_log(self.phase)
        self.close_for(
            "header_timeout" if self.phase == "head" else "body_timeout",
            self.guard.timed_out[self.phase] if answer else None,
        )

    def close_for(self, reason: str, answer: bytes | None) -> None:
        """Close now (writing ``answer`` first), counted under ``reason``."""
        self.guard.closed[reason] += 1
        self._cancel()
        self.guard.forget(self)
        self.phase = None
        if self.transport.is_closing():
            return
        if answer is not None:
            self.transport.write(answer)
        self.transport.close()

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


# ---------------------------------------------------------------------------- descriptors


def _open_fds() -> int:
    for path in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(path))
    return 0


def fd_budget(max_connections: int) -> tuple[int, int]:
    """The connection cap and listen backlog this process's open-file limit allows: at
    most ``max_connections``, and the cap plus one backlog of accepts (what one pass of
    asyncio's accept loop can take before a connection is closed) fit in the descriptors
    not in use, less a reserve. The soft limit is raised towards the hard one if that is
    needed."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return max_connections, MAX_BACKLOG
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = _open_fds()
    want = in_use + RESERVE_FDS + max_connections + min(MAX_BACKLOG, max_connections)
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError) as exc:  # pragma: no cover - platform refuses
                log.debug("could not raise the open-file limit: %s", exc)
    if soft == resource.RLIM_INFINITY:
        return max_connections, MAX_BACKLOG
    free = soft - in_use - RESERVE_FDS
    cap = min(max_connections, max(8, free // 2))
    backlog = max(8, min(MAX_BACKLOG, free - cap))
    if cap < max_connections:
        log.warning(
            "the open-file limit (%d, %d in use) allows %d HTTP connections, not %d "
            "(AUTOEMBED_HTTP_MAX_CONNECTIONS): raise it with `ulimit -n`",
            soft,
            in_use,
            cap,
            max_connections,
        )
    return cap, backlog


def throttle_accept_errors(
    loop: asyncio.AbstractEventLoop, throttle: Throttle
) -> Callable[[], None]:
    """Route asyncio's "out of system resource" accept errors through ``throttle``; other
    errors go where they went. Returns the function that undoes it."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith(ACCEPT_ERROR):
            throttle.warning(
                "accept",
                "cannot accept HTTP connections: %s (open-file limit reached; retrying)",
                context.get("exception"),
            )
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)

    def undo() -> None:
        if loop.get_exception_handler() is handler:
            loop.set_exception_handler(previous)

    return undo
