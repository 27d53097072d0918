"""Turns at the engine: one inference chunk at a time, fresh work first.

A row the application just wrote should not wait behind a backfill of a million rows: when
both are waiting, the next chunk to run is a fresh one. Backfill is never starved either:
after ``fairness`` fresh turns in a row while backfill waits, backfill gets one. Nothing to
configure: the priority comes from where the job came from (see autoembed.jobs.kind).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Gate:
    def __init__(self, fairness: int = 4) -> None:
        self.fairness = fairness
        self._busy = False
        self._waiting: dict[bool, collections.deque[asyncio.Future[None]]] = {
            True: collections.deque(),
            False: collections.deque(),
        }
        self._fresh_streak = 0
        self.turns = {"fresh": 0, "backfill": 0}

    def waiting(self, fresh: bool) -> int:
        return sum(not f.done() for f in self._waiting[fresh])

    def lock(self, fresh: bool = True) -> GateLock:
        """An ``asyncio.Lock``-like object (``async with``) taking turns at this gate."""
        return GateLock(self, fresh)

    @asynccontextmanager
    async def turn(self, fresh: bool) -> AsyncIterator[None]:
        await self._acquire(fresh)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, fresh: bool) -> None:
        if not self._busy and not self.waiting(True) and not self.waiting(False):
            self._grant(fresh)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[fresh].append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # granted just as we were cancelled: pass the turn on
            raise

    def _grant(self, fresh: bool) -> None:
        self._busy = True
        self.turns["fresh" if fresh else "backfill"] += 1
        self._fresh_streak = self._fresh_streak + 1 if fresh else 0

    def _next(self) -> asyncio.Future[None] | None:
        fresh, backfill = self._waiting[True], self._waiting[False]
        for queue in (fresh, backfill):
            while queue and queue[0].done():
                queue.popleft()  # cancelled waiters
        if fresh and not (backfill and self._fresh_streak >= self.fairness):
            self._grant(True)
            return fresh.popleft()
        if backfill:
            self._grant(False)
            return backfill.popleft()
        return None

    def _release(self) -> None:
        self._busy = False
        future = self._next()
        if future is not None:
            future.set_result(None)


class GateLock:
    def __init__(self, gate: Gate, fresh: bool) -> None:
        self.gate, self.fresh = gate, fresh

    async def __aenter__(self) -> None:
        await self.gate._acquire(self.fresh)

    async def __aexit__(self, *exc: object) -> None:
        self.gate._release()

    def locked(self) -> bool:
        return self.gate._busy
