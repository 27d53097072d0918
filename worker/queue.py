"""The durable queue in ``autoembed.jobs``: claim with a lease, finish, fail, release.

Static statements come from ``queries.sql``; statements that touch a watched table are
composed here with ``psycopg.sql`` so every identifier is quoted by the driver.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from .db import fetch_dicts, q

log = logging.getLogger(__name__)

LANES = ("embed", "summary")


@dataclass(frozen=True)
class Watch:
    id: int
    schema: str
    table_name: str
    pk_column: str
    pk_type: str
    content_column: str
    embedding_column: str
    model: str
    dim: int
    summary_column: str | None
    llm_model: str | None
    llm_prompt: str | None
    llm_options: Mapping[str, Any]
    vector_schema: str

    @property
    def table(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table_name)

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.table_name}.{self.embedding_column}"

    @property
    def pk_array(self) -> sql.Composable:
        # pk_type comes from format_type() in the catalog: a type name PostgreSQL quoted itself
        return sql.SQL("{}[]").format(sql.SQL(self.pk_type))


@dataclass(frozen=True)
class Job:
    id: int
    watch_id: int
    pk: str
    generation: int
    attempts: int
    token: str  # who holds the lease: this worker and this claim, nobody else


@dataclass
class Claims:
    """The leases a worker holds right now, by claim token."""

    held: dict[str, set[int]] = field(default_factory=dict)

    def add(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self.held.setdefault(job.token, set()).add(job.id)

    def remove(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            ids = self.held.get(job.token)
            if ids is not None:
                ids.discard(job.id)
                if not ids:
                    del self.held[job.token]

    def __bool__(self) -> bool:
        return bool(self.held)

    def __len__(self) -> int:
        return sum(len(ids) for ids in self.held.values())


@dataclass
class Outcome:
    """What finishing a batch did."""

    written: list[str] = field(default_factory=list)  # vectors (or summaries) stored
    cleared: list[str] = field(default_factory=list)  # NULL or empty text: vector cleared
    missing: list[str] = field(default_factory=list)  # row deleted meanwhile: job dropped
    stale: list[str] = field(default_factory=list)  # text changed since read: not written

    @property
    def done(self) -> int:
        return len(self.written) + len(self.cleared) + len(self.missing)


@dataclass
class Texts:
    """What a batch read: the text to work on per primary key (absent: the row is gone),
    and a hash of each row's whole text, which the write checks again (the stale guard)."""

    text: dict[str, str | None] = field(default_factory=dict)
    hash: dict[str, int | None] = field(default_factory=dict)
    cut: set[str] = field(default_factory=set)  # longer than what was read

    def update(self, other: Texts) -> None:
        self.text.update(other.text)
        self.hash.update(other.hash)
        self.cut -= set(other.text)


class ModelChanged(Exception):
    """The watch's model changed after the batch was claimed."""


class Queue:
    def __init__(self, pool: AsyncConnectionPool[Any], worker: str) -> None:
        self.pool = pool
        self.worker = worker
        self._claims = 0

    async def watches(self) -> dict[int, Watch]:
        async with self.pool.connection() as conn:
            rows = await fetch_dicts(conn, q("watches"))
        return {r["id"]: Watch(**r) for r in rows}

    async def claim(
        self, lane: str, watch_ids: Sequence[int], limit: int, lease: float
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
                    "watches": list(watch_ids),
                    "limit": limit,
                    "lease": lease,
                    "worker": token,
                },
            )
            return [
                Job(id=r[0], watch_id=r[1], pk=r[2], generation=r[3], attempts=r[4], token=token)
                for r in await cur.fetchall()
            ]

    async def read_texts(
        self, watch: Watch, pks: Sequence[str], max_chars: int | None = None
    ) -> Texts:
        """The watched text of these rows, at most ``max_chars`` of each (a model reads a
        few hundred tokens: a 10 MB document need not cross the wire), and its hash."""
        query = sql.SQL(
            "SELECT {pk}::text, left({content}::text, %s), "
            "hashtextextended({content}::text, 0), length({content}::text) > %s "
            "FROM {table} WHERE {pk} = ANY(%s::{pks})"
        ).format(
            pk=sql.Identifier(watch.pk_column),
            content=sql.Identifier(watch.content_column),
            table=watch.table,
            pks=watch.pk_array,
        )
        limit = max_chars or 2**31 - 1
        out = Texts()
        async with self.pool.connection() as conn:
            cur = await conn.execute(query, (limit, limit, list(pks)))
            for pk, text, digest, cut in await cur.fetchall():
                out.text[pk] = text
                out.hash[pk] = digest
                if cut:
                    out.cut.add(pk)
        return out

    async def read_rows(
        self, watch: Watch, pks: Sequence[str]
    ) -> tuple[dict[str, dict[str, Any]], Texts]:
        """Whole rows as JSON objects (for prompt templates that use any column)."""
        query = sql.SQL(
            "SELECT t.{pk}::text, to_jsonb(t), t.{content}::text, "
            "hashtextextended(t.{content}::text, 0) "
            "FROM {table} AS t WHERE t.{pk} = ANY(%s::{pks})"
        ).format(
            pk=sql.Identifier(watch.pk_column),
            content=sql.Identifier(watch.content_column),
            table=watch.table,
            pks=watch.pk_array,
        )
        rows: dict[str, dict[str, Any]] = {}
        texts = Texts()
        async with self.pool.connection() as conn:
            cur = await conn.execute(query, (list(pks),))
            for pk, row, text, digest in await cur.fetchall():
                rows[pk] = row
                texts.text[pk] = text
                texts.hash[pk] = digest
        return rows, texts

    async def _check_model(self, conn: AsyncConnection[Any], watch: Watch, lane: str) -> None:
        cur = await conn.execute("SELECT autoembed.hold_watch(%s, %s)", (watch.id, lane))
        row = await cur.fetchone()
        current = row[0] if row else None
        expected = watch.model if lane == "embed" else watch.llm_model
        if current is None:
            raise ModelChanged(f"watch {watch.label} was removed or has no {lane} model now")
        if current != expected:
            raise ModelChanged(
                f"{watch.label} now uses {current!r}, not {expected!r}: "
                f"refusing to write {lane} output of another model"
            )

    async def finish(
        self,
        watch: Watch,
        lane: str,
        jobs: Sequence[Job],
        read: Texts,
        results: Mapping[str, np.ndarray | str],
    ) -> Outcome:
        """Store results and drop the finished jobs, in one short transaction.

        ``read`` is what was read (absent: the row is gone); ``results`` holds a vector
        (embed) or a summary (summary) per pk whose text was non-empty. A result is written
        only where the row's text still hashes as the text it was made from did; a job is
        deleted only if it was not queued again meanwhile (its generation is unchanged).
        Jobs of ``jobs`` with neither a result nor an empty text are released, unfinished.
        """
        texts = read.text
        out = Outcome()
        target = watch.embedding_column if lane == "embed" else watch.summary_column
        assert target is not None
        pk = sql.Identifier(watch.pk_column)
        content = sql.Identifier(watch.content_column)
        column = sql.Identifier(target)
        value_type = (
            sql.SQL("{}.vector").format(sql.Identifier(watch.vector_schema))
            if lane == "embed"
            else sql.SQL("text")
        )
        write_pks = [p for p in results]
        empty = [p for p, t in texts.items() if not t]
        out.missing = [j.pk for j in jobs if j.pk not in texts]
        async with self.pool.connection() as conn, conn.transaction():
            await self._check_model(conn, watch, lane)
            if write_pks:
                # vectors travel in pgvector's binary format (%b): text formatting of
                # floats would cost more than the whole rest of the queue's work
                values = "%b" if lane == "embed" else "%s"
                cur = await conn.execute(
                    sql.SQL(
                        "UPDATE {table} AS t SET {column} = v.value "
                        "FROM unnest(%s::{pks}, %s::bigint[], " + values + "::{vt}[]) "
                        "AS v(pk, hash, value) "
                        "WHERE t.{pk} = v.pk AND hashtextextended(t.{content}::text, 0) = v.hash "
                        "RETURNING t.{pk}::text"
                    ).format(
                        table=watch.table,
                        column=column,
                        pks=watch.pk_array,
                        vt=value_type,
                        pk=pk,
                        content=content,
                    ),
                    (write_pks, [read.hash[p] for p in write_pks], [results[p] for p in write_pks]),
                )
                out.written = [r[0] for r in await cur.fetchall()]
            if empty:
                cur = await conn.execute(
                    sql.SQL(
                        "UPDATE {table} AS t SET {column} = NULL "
                        "WHERE t.{pk} = ANY(%s::{pks}) "
                        "AND (t.{content} IS NULL OR t.{content}::text = '') "
                        "AND t.{column} IS NOT NULL"
                    ).format(
                        table=watch.table, column=column, pk=pk, pks=watch.pk_array, content=content
                    ),
                    (empty,),
                )
                # rows already without a vector need no write; all of them are done
                out.cleared = list(empty)
            done = set(out.written) | set(out.cleared) | set(out.missing)
            out.stale = [j.pk for j in jobs if j.pk not in done and j.pk in results]
            finished = [j for j in jobs if j.pk in done]
            if finished:
                await conn.execute(
                    q("complete"),
                    {
                        "ids": [j.id for j in finished],
                        "generations": [j.generation for j in finished],
                    },
                )
                await conn.execute(
                    q("record_throughput"),
                    {"watches": [watch.id], "lanes": [lane], "rows": [len(finished)]},
                )
            unfinished = [j for j in jobs if j.pk not in done]
            if unfinished:
                # stale (another change to the row is, or will be, queued), or not reached
                # before a shutdown: pending again, for any worker
                await self._release(conn, unfinished)
        return out

    @staticmethod
    async def _release(conn: AsyncConnection[Any], jobs: Sequence[Job]) -> None:
        by_token: dict[str, list[int]] = {}
        for job in jobs:
            by_token.setdefault(job.token, []).append(job.id)
        for token, ids in by_token.items():
            await conn.execute(q("release"), {"ids": ids, "worker": token})

    async def fail(self, job: Job, error: str, delay: float, max_attempts: int) -> str:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                q("fail"),
                {
                    "id": job.id,
                    "generation": job.generation,
                    "error": error[:2000],
                    "delay": delay,
                    "max_attempts": max_attempts,
                },
            )
            row = await cur.fetchone()
            return row[0] if row else "requeued"

    async def release(self, jobs: Sequence[Job]) -> None:
        """Give leases back: the jobs are pending again, for any worker."""
        if jobs:
            async with self.pool.connection() as conn:
                await self._release(conn, jobs)

    async def release_claims(self, claims: Claims) -> None:
        async with self.pool.connection() as conn:
            for token, ids in claims.held.items():
                await conn.execute(q("release"), {"ids": list(ids), "worker": token})

    async def heartbeat(self, claims: Claims, lease: float) -> None:
        """Extend the leases of the jobs still being worked on."""
        if claims:
            async with self.pool.connection() as conn:
                for token, ids in list(claims.held.items()):
                    await conn.execute(
                        q("heartbeat"), {"ids": list(ids), "worker": token, "lease": lease}
                    )

    async def reap(self) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute(q("reap"))
            return len(await cur.fetchall())

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
