"""The durable queue in ``autoembed.jobs``: claim with a lease, read, finish, fail, release.

Static statements come from ``queries.sql``. A watched table is read and written only
through its watch's accessor functions (``autoembed.w<id>_read`` / ``_write``), which run
as the table's owner: the worker itself never evaluates the table's triggers, policies or
casts, and needs no privilege on the table.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from .db import fetch_dicts, q
from .errors import AutoembedError

log = logging.getLogger(__name__)

LANES = ("embed", "summary", "next")
KINDS = ("fresh", "backfill")
LOCK_TIMEOUT = "500ms"  # below deadlock_timeout: a worker gives way to the application's DDL


@dataclass(frozen=True)
class Watch:
    id: int
    schema: str
    table_name: str
    owner: str
    pk_column: str
    pk_type: str
    content_column: str
    embedding_column: str | None
    model: str
    dim: int
    summary_column: str | None
    llm_model: str | None
    llm_prompt: str | None
    llm_options: Mapping[str, Any]
    template: str | None
    version: int
    next_model: str | None
    next_dim: int | None
    next_column: str | None
    index_state: str
    vector_schema: str
    problem: str | None
    accessors_ok: bool
    embedding_attnum: int | None = None
    next_attnum: int | None = None
    summary_attnum: int | None = None
    chunking: Mapping[str, Any] | None = None
    chunk_table: str | None = None
    chunk_oid: int | None = None
    next_chunk_oid: int | None = None

    def chunks_of(self, lane: str) -> int | None:
        """The chunk table a lane of a chunked watch writes (its oid; the accessors check it)."""
        return self.next_chunk_oid if lane == "next" else self.chunk_oid

    @property
    def table(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table_name)

    @property
    def label(self) -> str:
        if self.chunking is not None:
            return f"{self.schema}.{self.table_name}.{self.content_column} -> {self.chunk_table}"
        return f"{self.schema}.{self.table_name}.{self.embedding_column or self.content_column}"

    @property
    def lanes(self) -> tuple[str, ...]:
        lanes = ["embed"]
        if self.summary_column:
            lanes.append("summary")
        if self.next_model:
            lanes.append("next")
        return tuple(lanes)

    def model_of(self, lane: str) -> str | None:
        return {"embed": self.model, "next": self.next_model, "summary": self.llm_model}[lane]

    def target_of(self, lane: str) -> int | None:
        """The column number a lane writes (the accessors check it)."""
        return {
            "embed": self.embedding_attnum,
            "next": self.next_attnum,
            "summary": self.summary_attnum,
        }[lane]

    def dim_of(self, lane: str) -> int | None:
        return self.next_dim if lane == "next" else self.dim

    @property
    def trouble(self) -> str | None:
        """Why this watch must not be served now (None: it may)."""
        if self.problem:
            return self.problem
        if not self.accessors_ok:
            return (
                "its accessor functions are missing or were altered (not SECURITY DEFINER "
                "functions of the table's owner): run `autoembed watch` for it again"
            )
        return None


@dataclass(frozen=True)
class Job:
    id: int
    watch_id: int
    pk: str
    generation: int
    attempts: int
    kind: str
    token: str  # who holds the lease: this worker and this claim, nobody else


@dataclass
class Claims:
    """The leases a worker holds right now, by claim token."""

    held: dict[str, set[int]] = field(default_factory=dict)

    def add(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            self.held.setdefault(job.token, set()).add(job.id)

    def remove(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            ids = self.held.get(job.token)
            if ids is not None:
                ids.discard(job.id)
                if not ids:
                    del self.held[job.token]

    def ids(self) -> set[int]:
        return {i for ids in self.held.values() for i in ids}

    def __bool__(self) -> bool:
        return bool(self.held)

    def __len__(self) -> int:
        return sum(len(ids) for ids in self.held.values())


@dataclass(frozen=True)
class Row:
    """What a read found for one key: the lane's input values (None: the row is not
    there), the hash the write checks again, and whether a value was cut short."""

    vals: list[str | None] | None
    hash: int | None
    cut: bool
    state: str  # ok | missing | hidden | invalid: <why>


@dataclass
class Passage:
    """One passage of a row to store: its place in the text, and its vector if it is new
    (None: it is kept as stored, found by its hash)."""

    hash: int
    seq: int
    index: int
    start: int
    end: int
    tokens: int
    text: str
    vector: np.ndarray | None


@dataclass
class Finished:
    """What finishing a chunk did, by key."""

    written: list[str] = field(default_factory=list)  # result (or clear) stored
    missing: list[str] = field(default_factory=list)  # row deleted meanwhile: job dropped
    stale: list[str] = field(default_factory=list)  # inputs changed since read: not written
    busy: list[str] = field(default_factory=list)  # row locked by the application: later
    failed: dict[str, str] = field(default_factory=dict)  # this row's write failed: why
    lost: list[str] = field(default_factory=list)  # lease gone (reaped, re-queued): not ours

    @property
    def done(self) -> int:
        return len(self.written) + len(self.missing)


class WatchChanged(AutoembedError):
    """The watch changed (model, template, columns) after the batch was claimed."""


def _accessor(watch_id: int, what: str) -> sql.Composable:
    return sql.Identifier("autoembed", f"w{watch_id}_{what}")


class Queue:
    def __init__(self, pool: AsyncConnectionPool[Any], worker: str) -> None:
        self.pool = pool
        self.worker = worker
        self._claims = 0
        # the heartbeat's renewal and a write's fence lock the same job rows for a moment;
        # were they to overlap, the fence would skip its own jobs as if taken over (and
        # they would wait out their lease). They take turns within this process; other
        # processes never lock this process's running jobs (the reaper only expired ones).
        self._job_rows = asyncio.Lock()

    async def watches(self) -> dict[int, Watch]:
        async with self.pool.connection() as conn:
            rows = await fetch_dicts(conn, q("watches"))
        return {r["id"]: Watch(**r) for r in rows}

    async def orphaned_watches(self) -> list[dict[str, Any]]:
        """Watches whose table was dropped (kept where no event trigger removed them)."""
        async with self.pool.connection() as conn:
            return await fetch_dicts(conn, q("unservable"))

    async def claim(
        self, lane: str, kind: str, watch_ids: Sequence[int], limit: int, lease: float
    ) -> list[Job]:
        if not watch_ids:
            return []
        self._claims += 1
        token = f"{self.worker}#{self._claims}"
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                q("claim"),
                {
                    "lane": lane,
                    "kind": kind,
                    "watches": list(watch_ids),
                    "limit": limit,
                    "lease": lease,
                    "worker": token,
                },
            )
            return [
                Job(
                    id=r[0],
                    watch_id=r[1],
                    pk=r[2],
                    generation=r[3],
                    attempts=r[4],
                    kind=r[5],
                    token=token,
                )
                for r in await cur.fetchall()
            ]

    async def read(
        self, watch: Watch, lane: str, pks: Sequence[str], max_chars: int | None = None
    ) -> dict[str, Row]:
        """The lane's input values of these rows, at most ``max_chars`` of each (a model
        reads a few hundred tokens: a 10 MB document need not cross the wire)."""
        query = sql.SQL("SELECT pk, vals, hash, cut, state FROM {}(%s, %s, %s)").format(
            _accessor(watch.id, "read")
        )
        out: dict[str, Row] = {}
        async with self.pool.connection() as conn:
            cur = await conn.execute(query, (lane, list(pks), max_chars))
            for pk, vals, digest, cut, state in await cur.fetchall():
                out[pk] = Row(vals=vals, hash=digest, cut=cut, state=state)
        return out

    async def finish(
        self,
        watch: Watch,
        lane: str,
        jobs: Sequence[Job],
        rows: Mapping[str, Row],
        results: Mapping[str, np.ndarray | str | None],
    ) -> Finished:
        """Store results and drop the finished jobs, in one short transaction.

        ``results`` holds, per key, a vector (embed, next), a text (summary), or None to
        clear the target (the inputs are empty). The watch must still be at the version
        the batch was made for, and each job still leased to this claim (a job whose lease
        was taken over is not written: ``lost``). A result is written only where the row's
        inputs still hash as what was read. Keys without a result stay claimed: the caller
        releases or fails them.
        """
        out = Finished()
        todo = [j for j in jobs if j.pk in results]
        if not todo:
            return out
        by_pk = {j.pk: j for j in todo}
        async with self.pool.connection() as conn, conn.transaction():
            mine = await self._begin_write(conn, watch, todo, out)
            if not mine:
                return out
            values = [results[p] for p in mine]
            vectors: list[Any] | None = None
            texts: list[Any] | None = None
            if lane == "summary":
                texts = values
            elif any(v is not None for v in values):
                vectors = values
            cur = await conn.execute(
                sql.SQL(
                    "SELECT pk, outcome, error FROM {}(%s, %s::smallint, %s, %s, %b::{}[], %s)"
                ).format(
                    _accessor(watch.id, "write"),
                    sql.Identifier(watch.vector_schema, "vector"),
                ),
                (lane, watch.target_of(lane), mine, [rows[p].hash for p in mine], vectors, texts),
            )
            await self._settle_outcomes(conn, watch, lane, by_pk, await cur.fetchall(), out)
        return out

    async def chunk_hashes(
        self, watch: Watch, lane: str, pks: Sequence[str]
    ) -> set[tuple[str, int, int]]:
        """The passages these rows have now: (key, hash, seq)."""
        query = sql.SQL("SELECT pk, chunk_hash, seq FROM {}(%s, %s)").format(
            _accessor(watch.id, "chunks")
        )
        async with self.pool.connection() as conn:
            cur = await conn.execute(query, (watch.chunks_of(lane), list(pks)))
            return {(r[0], r[1], r[2]) for r in await cur.fetchall()}

    async def finish_chunks(
        self,
        watch: Watch,
        lane: str,
        jobs: Sequence[Job],
        rows: Mapping[str, Row],
        passages: Mapping[str, Sequence[Passage]],
    ) -> Finished:
        """Store each row's passages as a whole (new ones with their vectors, kept ones by
        their hash), in one short transaction, with the same guards as ``finish``."""
        out = Finished()
        todo = [j for j in jobs if j.pk in passages]
        if not todo:
            return out
        by_pk = {j.pk: j for j in todo}
        async with self.pool.connection() as conn, conn.transaction():
            mine = await self._begin_write(conn, watch, todo, out)
            if not mine:
                return out
            cols: dict[str, list[Any]] = {
                k: [] for k in ("pk", "hash", "seq", "idx", "s", "e", "tok", "txt", "vec")
            }
            for pk in mine:
                for p in passages[pk]:
                    cols["pk"].append(pk)
                    cols["hash"].append(p.hash)
                    cols["seq"].append(p.seq)
                    cols["idx"].append(p.index)
                    cols["s"].append(p.start)
                    cols["e"].append(p.end)
                    cols["tok"].append(p.tokens)
                    cols["txt"].append(p.text)
                    cols["vec"].append(p.vector)
            vectors = cols["vec"] if any(v is not None for v in cols["vec"]) else None
            cur = await conn.execute(
                sql.SQL(
                    "SELECT pk, outcome, error FROM {}(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
                    "%s, %b::{}[])"
                ).format(_accessor(watch.id, "put"), sql.Identifier(watch.vector_schema, "vector")),
                (
                    watch.chunks_of(lane),
                    mine,
                    [rows[p].hash for p in mine],
                    cols["pk"],
                    cols["hash"],
                    cols["seq"],
                    cols["idx"],
                    cols["s"],
                    cols["e"],
                    cols["tok"],
                    cols["txt"],
                    vectors,
                ),
            )
            await self._settle_outcomes(conn, watch, lane, by_pk, await cur.fetchall(), out)
        return out

    async def _begin_write(
        self, conn: AsyncConnection[Any], watch: Watch, todo: Sequence[Job], out: Finished
    ) -> list[str]:
        """The start of a write: the lock timeout, the watch still at its version, the jobs
        still leased to their claims (the others are ``lost``); returns their keys."""
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        cur = await conn.execute("SELECT autoembed.hold_watch(%s)", (watch.id,))
        row = await cur.fetchone()
        if row is None or row[0] != watch.version:
            raise WatchChanged(
                f"{watch.label} changed (model, template or columns) after these rows "
                "were read: not writing them"
            )
        ours = await self._fence(conn, todo)
        out.lost = [j.pk for j in todo if j.id not in ours]
        return [j.pk for j in todo if j.id in ours]

    async def _settle_outcomes(  # noqa: PLR0917 - a private step of the two finishes
        self,
        conn: AsyncConnection[Any],
        watch: Watch,
        lane: str,
        by_pk: Mapping[str, Job],
        results: Sequence[tuple[Any, ...]],
        out: Finished,
    ) -> None:
        for pk, outcome, error in results:
            if outcome == "written":
                out.written.append(pk)
            elif outcome == "missing":
                out.missing.append(pk)
            elif outcome == "stale":
                out.stale.append(pk)
            elif outcome == "busy":
                out.busy.append(pk)
            elif outcome == "hidden":
                out.failed[pk] = hidden_message(watch)
            else:
                out.failed[pk] = error or outcome
        finished = [by_pk[p] for p in out.written + out.missing]
        if finished:
            await conn.execute(q("complete"), {"ids": [j.id for j in finished]})
            await conn.execute(
                q("record_throughput"),
                {"watches": [watch.id], "lanes": [lane], "rows": [len(finished)]},
            )
        # the row changed (and is, or will be, queued again) or is locked: pending again
        await self._release(conn, [by_pk[p] for p in out.stale], 0.0)
        await self._release(conn, [by_pk[p] for p in out.busy], 1.0)

    async def _fence(self, conn: AsyncConnection[Any], jobs: Sequence[Job]) -> set[int]:
        """Lock the jobs still leased to their claims and return their ids. Rows another
        transaction holds are skipped at first, then waited for (under the write's lock
        timeout): a skipped job is not a lost one. Another worker's claim statement holds
        rows it finds already running for a few milliseconds, and a job skipped for that
        would stay running, unwritten, until its lease ran out and it was charged an
        attempt."""
        ours: set[int] = set()
        async with self._job_rows:
            for token, ids in _by_token(jobs).items():
                cur = await conn.execute(q("fence"), {"ids": ids, "worker": token})
                got = {r[0] for r in await cur.fetchall()}
                skipped = [i for i in ids if i not in got]
                if skipped:
                    cur = await conn.execute(q("fence_wait"), {"ids": skipped, "worker": token})
                    got.update(r[0] for r in await cur.fetchall())
                ours |= got
        return ours

    @staticmethod
    async def _release(conn: AsyncConnection[Any], jobs: Sequence[Job], delay: float) -> None:
        for token, ids in _by_token(jobs).items():
            await conn.execute(q("release"), {"ids": ids, "worker": token, "delay": delay})

    async def fail(
        self, jobs: Sequence[Job], error: str, delay: float, max_attempts: int
    ) -> dict[int, str]:
        """Charge the jobs an attempt (or fail them for good at ``max_attempts``); returns
        the new status of each job still held by its claim."""
        out: dict[int, str] = {}
        if not jobs:
            return out
        async with self.pool.connection() as conn:
            for token, ids in _by_token(jobs).items():
                cur = await conn.execute(
                    q("fail"),
                    {
                        "ids": ids,
                        "worker": token,
                        "error": error[:2000],
                        "delay": delay,
                        "max_attempts": max_attempts,
                    },
                )
                out.update({r[0]: r[1] for r in await cur.fetchall()})
        return out

    async def release(self, jobs: Sequence[Job], delay: float = 0.0) -> None:
        """Give leases back: the jobs are pending again, for any worker."""
        if jobs:
            async with self.pool.connection() as conn:
                await self._release(conn, jobs, delay)

    async def release_claims(self, claims: Claims) -> None:
        async with self.pool.connection() as conn:
            for token, ids in claims.held.items():
                await conn.execute(q("release"), {"ids": list(ids), "worker": token, "delay": 0})

    async def heartbeat(self, claims: Claims, lease: float) -> set[int]:
        """Extend the leases of the jobs still being worked on; returns the ids whose lease
        is gone (taken over after expiry, or the job queued again). A job finished meanwhile
        is not lost, nor one a write of this worker holds right now."""
        lost: set[int] = set()
        if not claims:
            return lost
        async with self.pool.connection() as conn:
            for token, ids in list(claims.held.items()):
                async with self._job_rows:
                    cur = await conn.execute(
                        q("heartbeat"), {"ids": list(ids), "worker": token, "lease": lease}
                    )
                    kept = {r[0] for r in await cur.fetchall()}
                missing = list(set(ids) - kept)
                if missing:
                    cur = await conn.execute(q("not_ours"), {"ids": missing, "worker": token})
                    lost.update(r[0] for r in await cur.fetchall())
        return lost

    async def reap(self, max_attempts: int) -> list[tuple[int, str]]:
        """Jobs whose lease ran out go back to pending, charged an attempt (a text that
        kills the worker must not be retried forever)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(q("reap"), {"max_attempts": max_attempts})
            return [(r[0], r[1]) for r in await cur.fetchall()]

    async def prune(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(q("prune_throughput"))

    async def outstanding(self, watch_ids: Sequence[int], lanes: Sequence[str]) -> dict[str, Any]:
        """Counts of pending, running and failed jobs, and seconds until the next is due."""
        async with self.pool.connection() as conn:
            rows = await fetch_dicts(
                conn, q("outstanding"), {"watches": list(watch_ids), "lanes": list(lanes)}
            )
        return rows[0]

    async def left(self, watch_id: int, lane: str, backfill_only: bool) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                q("backfill_left" if backfill_only else "lane_left"),
                {"watch": watch_id, "lane": lane},
            )
            row = await cur.fetchone()
        return int(row[0]) if row else 0


def _by_token(jobs: Iterable[Job]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for job in jobs:
        out.setdefault(job.token, []).append(job.id)
    return out


def hidden_message(watch: Watch) -> str:
    return (
        f"row-level security hides this row of {watch.schema}.{watch.table_name} even from "
        f"its owner {watch.owner} (FORCE ROW LEVEL SECURITY): the worker reads and writes "
        f"as the owner, so give {watch.owner} a policy that lets it see and update every "
        f"row (or ALTER TABLE ... NO FORCE ROW LEVEL SECURITY), then `autoembed retry`"
    )
