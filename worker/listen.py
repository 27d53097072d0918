"""LISTEN/NOTIFY wake-ups on a dedicated connection.

A notification is only a hint that work may be waiting: the worker also polls, so a lost
notification (or a listener that is reconnecting) delays work by at most one poll interval
and loses nothing. The connection is probed with a round trip every few seconds, so a
silently dead socket is noticed and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import psycopg

from .db import describe

log = logging.getLogger(__name__)

CHANNEL = "autoembed"


class Listener:
    def __init__(self, url: str, wake: Callable[[str], None], probe_seconds: float = 5.0) -> None:
        self.url = url
        self.wake = wake
        self.probe_seconds = probe_seconds
        self.alive = False
        self.ready = asyncio.Event()  # set once the first LISTEN is in place
        self.notifications = 0

    async def run(self, stop: asyncio.Event) -> None:
        delay = 0.2
        while not stop.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=5
                )
            except psycopg.Error as exc:
                self._down(exc)
                await _sleep(stop, delay)
                delay = min(delay * 2, 5.0)
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    if not self.alive:
                        log.info("listening for notifications on channel %r", CHANNEL)
                    self.alive = True
                    self.ready.set()
                    delay = 0.2
                    self.wake("listener connected")  # catch up on anything missed meanwhile
                    while not stop.is_set():
                        async for note in conn.notifies(timeout=self.probe_seconds):
                            self.notifications += 1
                            self.wake(note.payload)
                            if stop.is_set():
                                break
                        # a quiet interval: prove the connection still answers
                        await asyncio.wait_for(conn.execute("SELECT 1"), self.probe_seconds)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                self._down(exc)
                await _sleep(stop, delay)
                delay = min(delay * 2, 5.0)
        self.alive = False

    def _down(self, exc: BaseException) -> None:
        if self.alive:
            log.warning(
                "listener lost its connection (%s); polling until it is back", describe(exc)
            )
        self.alive = False


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
