"""The data path of one claim: read -> embed (or summarise) -> write, job by job.

Every job of a claim ends in exactly one way, once: written (or cleared, or its row gone),
released (stale, busy, a shutdown, a changed watch, an outage), failed (charged an attempt
with its error, or failed for good when retrying cannot help), or lost (its lease was taken
over: someone else has it). ``Batch`` keeps the account, so a failure halfway through a
claim charges only the jobs it interrupted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .chunking import Chunker, ChunkOptions, text_hash
from .config import Settings
from .engine import Embedder
from .errors import AutoembedError, ConfigError, LLMModelMissing, PromptError
from .gate import Gate
from .metrics import Metrics
from .outcomes import Outcome, classify
from .queue import Claims, Finished, Job, Passage, Queue, Row, Watch, hidden_message
from .templates import fields as template_fields
from .templates import render

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 32  # prefix read per token the model takes (a token is ~4 chars of prose)
EMBED_CHUNK = 64  # texts per inference call: the unit of progress, priority and shutdown
SUMMARY_MAX_CHARS = 200_000  # what a prompt may hold of a row's text
CHUNKED_ROWS = 8  # rows of a chunked watch read (whole) and cut at a time
# texts per turn at the engine on a CPU: a chunk of 64 runs as several such turns, so a
# fresh row waits for at most one of them (the engine batches about this many texts of
# 128+ tokens anyway: no throughput is lost). A GPU takes a whole chunk in one turn.
CPU_TURN = 16


def turn_size(emb: Any) -> int:
    return EMBED_CHUNK if getattr(emb, "device", "cpu") == "cuda" else CPU_TURN


def backoff(settings: Settings, attempts: int) -> float:
    base = min(settings.backoff_max_seconds, settings.backoff_seconds * 2.0 ** max(attempts, 0))
    return base * random.uniform(0.5, 1.5)


@dataclass
class Batch:
    """The jobs of one claim that have not ended yet (also held in the worker's registry
    of claims, which the heartbeat renews and a shutdown releases)."""

    lane: str
    open: dict[int, Job] = field(default_factory=dict)
    registry: Claims | None = None
    done: int = 0
    failed_for_good: int = 0

    @classmethod
    def of(cls, lane: str, jobs: Sequence[Job], registry: Claims | None = None) -> Batch:
        return cls(lane, {j.id: j for j in jobs}, registry)

    def take(self, jobs: Sequence[Job]) -> list[Job]:
        """Mark jobs as ended (by the caller); returns those that were still open."""
        taken = [self.open.pop(j.id) for j in jobs if j.id in self.open]
        if self.registry is not None:
            self.registry.remove(taken)
        return taken

    def jobs(self) -> list[Job]:
        return list(self.open.values())


class Lanes:
    """What the slots share; the lane methods below do the work of one claim."""

    def __init__(  # noqa: PLR0917 - the collaborators, named at the one call site
        self,
        settings: Settings,
        queue: Queue,
        gate: Gate,
        metrics: Metrics,
        stop: asyncio.Event,
        lost: set[int],
        finished: Callable[[str, Watch, int, int], None],
    ) -> None:
        self.settings, self.queue, self.gate, self.metrics = settings, queue, gate, metrics
        self.stop = stop
        self.lost = lost  # job ids whose lease the heartbeat found gone
        self.finished = finished
        self.llm: Any = None  # LLMClient, created on first use
        self._chunkers: dict[tuple[str, str], Chunker] = {}

    # ------------------------------------------------------------------ ending jobs

    async def fail(self, batch: Batch, jobs: Sequence[Job], error: str, final: bool) -> None:
        jobs = batch.take(jobs)
        if not jobs:
            return
        s = self.settings
        max_attempts = 0 if final else s.max_attempts  # 0: fails for good at once
        by_attempts: dict[int, list[Job]] = {}
        for job in jobs:
            by_attempts.setdefault(job.attempts, []).append(job)
        for attempts, group in by_attempts.items():
            status = await self.queue.fail(group, error, backoff(s, attempts), max_attempts)
            for job in group:
                state = status.get(job.id)
                extra = {"job": job.id, "watch": job.watch_id, "lane": batch.lane, "pk": job.pk}
                self.metrics.failed.labels(batch.lane).inc()
                if state == "failed":
                    batch.failed_for_good += 1
                    log.error(
                        "job %d (row %s) failed for good: %s",
                        job.id,
                        job.pk,
                        error,
                        extra={**extra, "action": "failed"},
                    )
                elif state is not None:
                    log.warning(
                        "job %d (row %s) failed, will retry: %s",
                        job.id,
                        job.pk,
                        error,
                        extra={**extra, "action": "retry"},
                    )

    async def release(self, batch: Batch, jobs: Sequence[Job], delay: float = 0.0) -> None:
        jobs = batch.take(jobs)
        if jobs:
            await self.queue.release(jobs, delay)

    async def settle(self, batch: Batch, watch: Watch, jobs: Sequence[Job], out: Finished) -> None:
        """Account for what ``Queue.finish`` did with ``jobs``."""
        by_pk = {j.pk: j for j in jobs}
        handled = out.written + out.missing + out.stale + out.busy + out.lost
        batch.take([by_pk[p] for p in handled if p in by_pk])
        batch.done += out.done
        for pk, error in out.failed.items():
            hidden = "row-level security hides" in error
            await self.fail(batch, [by_pk[pk]], error, final=hidden)
        self.finished(batch.lane, watch, out.done, len(out.stale))
        if out.lost:
            log.warning(
                "%s: %d job(s) were taken over by another worker (lease lost); not written",
                watch.label,
                len(out.lost),
                extra={"watch": watch.id, "lane": batch.lane, "action": "lease_lost"},
            )

    async def end_rows(
        self, batch: Batch, watch: Watch, jobs: Sequence[Job], rows: dict[str, Row]
    ) -> list[Job]:
        """Jobs whose row cannot be worked on fail now (hidden, or a key that does not
        parse); returns the others."""
        keep: list[Job] = []
        for job in jobs:
            row = rows.get(job.pk)
            if row is not None and row.state == "hidden":
                await self.fail(batch, [job], hidden_message(watch), final=True)
            elif row is not None and row.state.startswith("invalid"):
                await self.fail(
                    batch,
                    [job],
                    f"the queued key {job.pk!r} does not parse: {row.state}",
                    final=True,
                )
            else:
                keep.append(job)
        return keep

    # ------------------------------------------------------------------ embeddings

    async def embed_claim(
        self, batch: Batch, watches: dict[int, Watch], models: Callable[[str], Embedder | None]
    ) -> None:
        groups: dict[int, list[Job]] = {}
        for job in batch.jobs():
            groups.setdefault(job.watch_id, []).append(job)
        for wid, jobs in groups.items():
            watch = watches.get(wid)
            model = watch.model_of(batch.lane) if watch else None
            emb = models(model) if model else None
            if watch is None or emb is None or self.stop.is_set():
                await self.release(batch, jobs)
                continue
            if watch.chunking is not None:
                await self._chunk_watch(batch, watch, emb, jobs)
            else:
                await self._embed_watch(batch, watch, emb, jobs)

    async def _embed_watch(
        self, batch: Batch, watch: Watch, emb: Embedder, jobs: list[Job]
    ) -> None:
        lane = batch.lane
        rows = await self._read(watch, lane, emb, [j.pk for j in jobs])
        jobs = await self.end_rows(batch, watch, jobs, rows)
        texts: dict[str, str] = {}
        clear: list[Job] = []
        for job in jobs:
            row = rows.get(job.pk)
            text = self._input(watch, row)
            if text is None:
                clear.append(job)  # row gone, or nothing to embed: cleared / dropped
            else:
                texts[job.pk] = text
        if clear:
            results: dict[str, np.ndarray | str | None] = {j.pk: None for j in clear}
            out = await self.queue.finish(watch, lane, clear, rows, results)
            await self.settle(batch, watch, clear, out)
        todo = sorted(
            (j for j in jobs if j.pk in texts), key=lambda j: len(texts[j.pk]), reverse=True
        )
        fresh_first = sorted(todo, key=lambda j: j.kind != "fresh")  # stable: longest first within
        for start in range(0, len(fresh_first), EMBED_CHUNK):
            chunk = fresh_first[start : start + EMBED_CHUNK]
            gone = [j for j in chunk if j.id in self.lost]
            if gone:  # the heartbeat found these leases taken over: not ours to write
                batch.take(gone)
                chunk = [j for j in chunk if j.id not in self.lost]
            if self.stop.is_set():
                await self.release(batch, batch.jobs())  # the rest waits for another worker
                return
            if not chunk:
                continue
            vectors, errors = await self._infer(emb, chunk, texts, fresh=chunk[0].kind == "fresh")
            for job in chunk:
                if job.pk in errors:
                    await self.fail(batch, [job], errors[job.pk], final=False)
            ok = [j for j in chunk if j.pk in vectors]
            out = await self.queue.finish(watch, lane, ok, rows, dict(vectors))
            await self.settle(batch, watch, ok, out)

    def _input(self, watch: Watch, row: Row | None) -> str | None:
        """The text to embed (None: nothing to embed, clear)."""
        if row is None or row.vals is None:
            return None
        if watch.template:
            if all(v is None or not v.strip() for v in row.vals):
                return None
            text = render(watch.template, row.vals)
        else:
            text = row.vals[0] or ""
        return text if text.strip() else None

    async def _read(self, watch: Watch, lane: str, emb: Embedder, pks: list[str]) -> dict[str, Row]:
        """The rows' inputs, as much as the model can read: a generous prefix, and the whole
        text in the rare case that the prefix holds fewer tokens than the model takes (long
        runs of whitespace or markup)."""
        rows = await self.queue.read(watch, lane, pks, emb.max_tokens * CHARS_PER_TOKEN)
        cut = sorted(p for p, r in rows.items() if r.cut and r.vals is not None)
        if cut:
            prefixes = [self._input(watch, rows[p]) or "" for p in cut]
            lengths = (await asyncio.to_thread(emb.encode, prefixes)).lengths
            short = [p for p, n in zip(cut, lengths, strict=True) if n < emb.max_tokens]
            if short:
                rows.update(await self.queue.read(watch, lane, short))
        return rows

    async def _infer(
        self, emb: Embedder, chunk: list[Job], texts: dict[str, str], fresh: bool
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Vectors for a chunk, and errors for texts that could not be embedded (the
        chunk is retried text by text when it fails as a whole)."""
        good: dict[str, np.ndarray] = {}
        bad: dict[str, str] = {}
        try:
            vectors = await self.embed_turns(emb, [texts[j.pk] for j in chunk], fresh)
            good.update(zip((j.pk for j in chunk), vectors, strict=True))
            return good, bad
        except Exception as exc:
            log.warning(
                "a chunk of %d failed (%s); embedding its texts one by one",
                len(chunk),
                exc,
                extra={"lane": "embed", "action": "chunk_failed"},
            )
        for job in chunk:
            try:
                async with self.gate.turn(fresh):
                    good[job.pk] = (await asyncio.to_thread(emb.embed, [texts[job.pk]]))[0]
            except Exception as exc:
                bad[job.pk] = f"{type(exc).__name__}: {exc}"
        return good, bad

    async def embed_turns(self, emb: Embedder, texts: list[str], fresh: bool) -> np.ndarray:
        """The vectors of ``texts``, embedded in turns at the gate (see ``turn_size``)."""
        size = turn_size(emb)
        # longest first, so that each turn pads its texts to similar lengths (a chunked
        # row's passages come in document order: full ones, then a short last one)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        parts: list[np.ndarray] = []
        for start in range(0, len(order), size):
            turn = [texts[i] for i in order[start : start + size]]
            async with self.gate.turn(fresh):
                parts.append(await asyncio.to_thread(emb.embed, turn))
        if not parts:
            return np.zeros((0, emb.dim), np.float32)
        out = np.empty((len(texts), parts[0].shape[1]), dtype=parts[0].dtype)
        out[order] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out

    # ------------------------------------------------------------------ passages

    def chunker(self, watch: Watch, emb: Embedder) -> Chunker:
        key = (emb.name, json.dumps(dict(watch.chunking or {}), sort_keys=True))
        made = self._chunkers.get(key)
        if made is None:
            options = ChunkOptions.from_mapping(dict(watch.chunking or {}))
            made = self._chunkers[key] = Chunker.for_model(emb.files, options)
        return made

    def _passages(
        self, watch: Watch, chunker: Chunker, row: Row | None
    ) -> tuple[list[Passage], list[str], int]:
        """A row's passages (without vectors yet), the texts to embed for them (the
        template rendered around each), and how many passages past the cap were dropped."""
        if row is None or row.vals is None or not (row.vals[0] or "").strip():
            return [], [], 0
        text = row.vals[0] or ""
        fields: dict[str, str] = {}
        reserved = 0
        if watch.template:
            names = [f for f in template_fields(watch.template) if f != "chunk"]
            fields = {
                n: ("" if v is None else v) for n, v in zip(names, row.vals[1:], strict=False)
            }
            reserved = chunker.template_overhead(watch.template, **fields)
        cut = chunker.chunk(text, reserved)
        passages: list[Passage] = []
        inputs: list[str] = []
        seen: dict[int, int] = {}
        for c in cut.chunks:
            rendered = watch.template.format(chunk=c.text, **fields) if watch.template else c.text
            digest = text_hash(rendered)
            seq = seen.get(digest, 0)
            seen[digest] = seq + 1
            passages.append(Passage(digest, seq, c.index, c.start, c.end, c.tokens, c.text, None))
            inputs.append(rendered)
        return passages, inputs, cut.dropped

    async def _chunk_watch(
        self, batch: Batch, watch: Watch, emb: Embedder, jobs: list[Job]
    ) -> None:
        """Rows of a chunked watch, a few at a time: each is read whole (a document may be
        megabytes), so memory stays bounded whatever the claim."""
        for start in range(0, len(jobs), CHUNKED_ROWS):
            if self.stop.is_set():
                await self.release(batch, batch.jobs())
                return
            await self._chunk_rows(batch, watch, emb, jobs[start : start + CHUNKED_ROWS])

    async def _chunk_rows(self, batch: Batch, watch: Watch, emb: Embedder, jobs: list[Job]) -> None:
        """Cut each row into passages, embed the passages that are new (a passage already
        stored, found by its hash, keeps its vector), and store each row's passages as a
        whole, row by row as their vectors are done."""
        lane = batch.lane
        chunker = self.chunker(watch, emb)
        rows = await self.queue.read(watch, lane, [j.pk for j in jobs], None)
        jobs = await self.end_rows(batch, watch, jobs, rows)
        have = await self.queue.chunk_hashes(watch, lane, [j.pk for j in jobs])
        plans: dict[str, tuple[list[Passage], list[str]]] = {}
        for job in list(jobs):
            try:
                passages, inputs, dropped = await asyncio.to_thread(
                    self._passages, watch, chunker, rows.get(job.pk)
                )
            except ConfigError as exc:  # this row's template leaves no room for a passage
                await self.fail(batch, [job], str(exc), final=True)
                jobs.remove(job)
                continue
            if dropped:
                self.metrics.chunks_dropped.labels(watch.label).inc(dropped)
                log.warning(
                    "%s: row %s has %d passages past the cap of %d; they are not embedded",
                    watch.label,
                    job.pk,
                    dropped,
                    chunker.max_chunks,
                    extra={"watch": watch.id, "pk": job.pk, "action": "chunks_dropped"},
                )
            plans[job.pk] = (passages, inputs)
        # the passages to embed, rows in order, and which row each belongs to
        queue: list[tuple[Job, int]] = []
        for job in jobs:
            passages, _ = plans[job.pk]
            for i, p in enumerate(passages):
                if (job.pk, p.hash, p.seq) not in have:
                    queue.append((job, i))
        left = {j.pk: sum(1 for jj, _ in queue if jj.pk == j.pk) for j in jobs}
        ready = [j for j in jobs if left[j.pk] == 0]  # nothing new: positions, deletions
        if ready:
            await self._store_passages(batch, watch, ready, rows, plans)
        failed: set[str] = set()
        for start in range(0, len(queue), EMBED_CHUNK):
            if self.stop.is_set():
                await self.release(batch, batch.jobs())
                return
            part = [(j, i) for j, i in queue[start : start + EMBED_CHUNK] if j.pk not in failed]
            if not part:
                continue
            texts = [plans[j.pk][1][i] for j, i in part]
            try:
                vectors = await self.embed_turns(emb, texts, part[0][0].kind == "fresh")
            except Exception as exc:
                for job in {j.pk: j for j, _ in part}.values():
                    failed.add(job.pk)
                    await self.fail(batch, [job], f"{type(exc).__name__}: {exc}", final=False)
                continue
            done: list[Job] = []
            for (job, i), vector in zip(part, vectors, strict=True):
                plans[job.pk][0][i].vector = vector
                left[job.pk] -= 1
                if left[job.pk] == 0:
                    done.append(job)
            done = [j for j in done if j.pk not in failed and j.id not in self.lost]
            if done:  # progressive: rows whose passages are all embedded are stored now
                await self._store_passages(batch, watch, done, rows, plans)

    async def _store_passages(
        self,
        batch: Batch,
        watch: Watch,
        jobs: list[Job],
        rows: dict[str, Row],
        plans: dict[str, tuple[list[Passage], list[str]]],
    ) -> None:
        out = await self.queue.finish_chunks(
            watch, batch.lane, jobs, rows, {j.pk: plans[j.pk][0] for j in jobs}
        )
        new = sum(1 for j in jobs for p in plans[j.pk][0] if p.vector is not None)
        self.metrics.chunks_written.labels(watch.label).inc(new)
        await self.settle(batch, watch, jobs, out)

    # ------------------------------------------------------------------ summaries

    async def summary_claim(self, batch: Batch, watches: dict[int, Watch]) -> None:
        from .llm import DEFAULT_SUMMARY_PROMPT, GenerateOptions

        for job in batch.jobs():
            watch = watches.get(job.watch_id)
            if watch is None or not watch.llm_model or self.stop.is_set():
                await self.release(batch, [job])
                continue
            rows = await self.queue.read(watch, "summary", [job.pk], SUMMARY_MAX_CHARS)
            if not await self.end_rows(batch, watch, [job], rows):
                continue
            row = rows.get(job.pk)
            results: dict[str, np.ndarray | str | None] = {job.pk: None}
            if row is not None and row.vals is not None and any(v and v.strip() for v in row.vals):
                try:
                    prompt = render(watch.llm_prompt or DEFAULT_SUMMARY_PROMPT, row.vals)
                    options = GenerateOptions.from_mapping(watch.llm_options or {})
                    text = await self.llm.generate(watch.llm_model, prompt, options)
                except (PromptError, LLMModelMissing) as exc:
                    await self.fail(batch, [job], str(exc), final=True)
                    continue
                except AutoembedError as exc:
                    if classify(exc) is Outcome.OUTAGE:
                        raise  # the LLM server is down: the lane pauses, the job is released
                    await self.fail(batch, [job], str(exc), final=classify(exc) is Outcome.FAIL)
                    continue
                results[job.pk] = text.strip()
            out = await self.queue.finish(watch, "summary", [job], rows, results)
            await self.settle(batch, watch, [job], out)
