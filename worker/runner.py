"""The daemon: claim batches, embed (or summarise) them, write the results back.

Per process: ``concurrency`` embedding slots and ``summary_concurrency`` summary slots, each
a loop of claim -> read -> work -> finish. Inference runs in a thread (ONNX Runtime releases
the GIL) behind a lock, so one slot's database round trips overlap another's inference. A
LISTEN connection wakes idle slots at once; a poll covers lost notifications and retries
whose time has come. Lost database connections are retried with backoff; the jobs of a batch
that could not be finished are released when the database is back (or retaken by any
worker once their lease runs out). SIGTERM/SIGINT: stop claiming, finish what is in flight
within ``shutdown_seconds``, release the rest, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

import numpy as np
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .config import Settings
from .db import configure, describe
from .engine import Embedder
from .errors import AutoembedError, LLMError, LLMModelMissing
from .listen import Listener
from .metrics import Metrics
from .queue import Claims, Job, ModelChanged, Queue, Texts, Watch

log = logging.getLogger(__name__)

EmbedderFactory = Callable[[str], Embedder]
CHARS_PER_TOKEN = 32  # prefix read per token the model takes (a token is ~4 chars of prose)
EMBED_CHUNK = 64  # texts per inference call: the unit a shutdown waits for
DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, OSError)


class Worker:
    def __init__(
        self,
        settings: Settings,
        *,
        embedder_factory: EmbedderFactory | None = None,
        drain: bool = False,
        progress: bool | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.url = settings.require_database()
        self.drain = drain
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.metrics = metrics or Metrics()
        self._factory = embedder_factory or self._load_embedder
        self.embedders: dict[str, Embedder] = {}
        self.model_errors: dict[str, str] = {}
        self._loading: dict[str, asyncio.Lock] = {}
        self.watches: dict[int, Watch] = {}
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()
        self.engine_lock = asyncio.Lock()
        self.in_flight: dict[str, Claims] = {"embed": Claims(), "summary": Claims()}
        self.orphans = Claims()
        self.db_ok = True
        self.done_rows = 0
        self.failed_jobs = 0
        self._llm: Any = None
        self._bar: Any = None
        self._next_due: float | None = None
        self._refresh_needed = False
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=settings.concurrency + settings.summary_concurrency + 3,
            kwargs={"autocommit": True},
            configure=configure,
            check=AsyncConnectionPool.check_connection,
            open=False,
            timeout=10.0,
            name="autoembed",
        )
        self.queue = Queue(self.pool, settings.worker_name)
        self.listener = Listener(self.url, self._on_notify)

    # ------------------------------------------------------------------ set-up

    def _load_embedder(self, model: str) -> Embedder:
        s = self.settings
        return Embedder.load(
            model,
            device=s.device,
            precision=s.precision,
            threads=s.threads,
        )

    async def embedder(self, model: str) -> Embedder | None:
        """The loaded model of that name, loading it once (None if it cannot be loaded)."""
        async with self._loading.setdefault(model, asyncio.Lock()):
            if model in self.embedders:
                return self.embedders[model]
            if model in self.model_errors:
                return None
            try:
                emb = await asyncio.to_thread(self._factory, model)
            except AutoembedError as exc:
                self.model_errors[model] = str(exc)
                log.error("cannot load model %s, its watches are not served: %s", model, exc)
                return None
            self.embedders[model] = emb
            self.metrics.track(model, emb.stats)
            return emb

    def llm(self) -> Any:
        if self._llm is None:
            from .llm import LLMClient

            mode = self.settings.llm_mode
            self._llm = LLMClient(
                self.settings.llm_host,
                mode,
                retries=self.settings.llm_retries,
            )
        return self._llm

    async def refresh_watches(self) -> None:
        watches = await self.queue.watches()
        added = set(watches) - set(self.watches)
        self.watches = watches
        for wid in sorted(added):
            w = watches[wid]
            emb = await self.embedder(w.model)
            if emb is not None and emb.dim != w.dim:
                self.model_errors[w.model] = (
                    f"model {w.model} makes {emb.dim} dimensions but {w.label} is vector({w.dim})"
                )
                log.error("refusing to serve %s: %s", w.label, self.model_errors[w.model])
            lanes = "embed" + (", summary" if w.summary_column else "")
            log.info("serving %s (model %s; lanes: %s)", w.label, w.model, lanes)

    def servable(self, lane: str) -> list[int]:
        if lane == "embed":
            return [
                w.id
                for w in self.watches.values()
                if w.model in self.embedders and w.model not in self.model_errors
            ]
        return [w.id for w in self.watches.values() if w.summary_column and w.llm_model]

    def _on_notify(self, payload: str) -> None:
        if payload.isdigit() and int(payload) not in self.watches:
            self._refresh_needed = True  # a watch this worker has not seen yet
        self.wake.set()

    # ------------------------------------------------------------------ main loop

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop, sig.name)
        await self.pool.open(wait=False)
        try:
            await self._wait_for_database()
            await self.refresh_watches()
            if not self.watches:
                log.warning("no table is watched yet: `autoembed watch TABLE --column COL`")
            await self._start_progress()
            tasks = [asyncio.create_task(self.listener.run(self.stop), name="listener")]
            tasks.append(asyncio.create_task(self._maintenance(), name="maintenance"))
            slots = [
                asyncio.create_task(self._slot("embed"), name=f"embed-{i}")
                for i in range(self.settings.concurrency)
            ]
            slots += [
                asyncio.create_task(self._slot("summary"), name=f"summary-{i}")
                for i in range(self.settings.summary_concurrency)
            ]
            log.info(
                "worker %s running: %d embedding slot(s), %d summary slot(s)%s",
                self.settings.worker_name,
                self.settings.concurrency,
                self.settings.summary_concurrency,
                ", draining" if self.drain else "",
            )
            await self.stop.wait()
            _, pending = await asyncio.wait(slots, timeout=self.settings.shutdown_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            leftover = Claims()
            for claims in (*self.in_flight.values(), self.orphans):
                for token, ids in claims.held.items():
                    leftover.held.setdefault(token, set()).update(ids)
            if leftover:
                with suppress(*DB_ERRORS):
                    await self.queue.release_claims(leftover)
                    log.info("released %d unfinished job(s) for other workers", len(leftover))
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            if self._bar is not None:
                self._bar.close()
            if self._llm is not None:
                await self._llm.aclose()
            await self.pool.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        log.info(
            "worker stopped: %d row(s) done, %d job(s) failed for good",
            self.done_rows,
            self.failed_jobs,
        )
        return 0

    def request_stop(self, why: str = "stop") -> None:
        if not self.stop.is_set():
            log.info("%s: finishing in-flight work, then exiting", why)
        self.stop.set()
        self.wake.set()

    async def _wait_for_database(self) -> None:
        delay = 0.5
        while not self.stop.is_set():
            try:
                async with self.pool.connection() as conn:
                    await conn.execute("SELECT 1 FROM autoembed.jobs LIMIT 1")
                return
            except psycopg.errors.UndefinedTable as exc:
                raise AutoembedError(
                    "the autoembed schema is missing: run `autoembed migrate` first"
                ) from exc
            except DB_ERRORS as exc:
                log.warning("database not reachable yet (%s); retrying", describe(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _start_progress(self) -> None:
        if not (self.drain and self.progress):
            return
        from tqdm import tqdm

        counts = await self.queue.outstanding(list(self.watches), ["embed", "summary"])
        self._bar = tqdm(
            total=counts["pending"] + counts["running"],
            unit="row",
            desc="embedding",
            dynamic_ncols=True,
            smoothing=0.1,
        )

    # ------------------------------------------------------------------ slots

    async def _slot(self, lane: str) -> None:
        s = self.settings
        lease = s.lease_seconds if lane == "embed" else s.summary_lease_seconds
        limit = s.batch_size if lane == "embed" else 1
        while not self.stop.is_set():
            try:
                if self._refresh_needed:
                    self._refresh_needed = False
                    await self.refresh_watches()
                watch_ids = self.servable(lane)
                jobs = []
                if watch_ids:
                    jobs = await self.queue.claim(lane, watch_ids, limit, lease)
                    self._db_up()
            except DB_ERRORS as exc:
                await self._db_down(exc)
                continue
            if not jobs:
                if self.drain and await self._drained():
                    self.request_stop("queue drained")
                    return
                await self._idle()
                continue
            self.metrics.claimed.labels(lane).inc(len(jobs))
            self.in_flight[lane].add(jobs)
            started = time.perf_counter()
            try:
                if lane == "embed":
                    await self._embed_jobs(jobs)
                else:
                    await self._summary_jobs(jobs)
                self.metrics.batch_seconds.labels(lane).observe(time.perf_counter() - started)
            except DB_ERRORS as exc:
                self.orphans.add(jobs)  # released once the database answers again
                await self._db_down(exc)
            except ModelChanged as exc:
                log.warning("%s; reloading watches", exc)
                self.orphans.add(jobs)
                with suppress(*DB_ERRORS):
                    await self.refresh_watches()
            except Exception as exc:  # a refusal (a missing grant, say) or a bug
                log.error("%s batch failed: %s", lane, describe(exc), exc_info=True)
                try:  # count it against the jobs: they end as failed, with the reason
                    for job in jobs:
                        await self._fail(job, lane, f"{type(exc).__name__}: {describe(exc)}")
                except Exception:
                    self.orphans.add(jobs)
                await asyncio.sleep(min(self.settings.poll_seconds, 5.0))
            finally:
                self.in_flight[lane].remove(jobs)

    async def _idle(self) -> None:
        timeout = self.settings.poll_seconds
        if self._next_due is not None:
            timeout = max(0.01, min(timeout, self._next_due - time.monotonic()))
        with suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout)
        self.wake.clear()

    async def _drained(self) -> bool:
        if any(self.in_flight.values()):
            return False
        lanes = ["embed"] + (["summary"] if self.servable("summary") else [])
        try:
            counts = await self.queue.outstanding(list(self.watches), lanes)
        except DB_ERRORS:
            return False
        if self._bar is not None:
            self._bar.total = max(self._bar.total or 0, self._bar.n + counts["pending"])
            self._bar.refresh()
        due = counts["next_due_seconds"]
        self._next_due = None if due is None else time.monotonic() + max(due, 0.0)
        return bool(counts["pending"] + counts["running"] == 0)

    def _db_up(self) -> None:
        if not self.db_ok:
            log.info("database reachable again")
        self.db_ok = True

    async def _db_down(self, exc: BaseException) -> None:
        if self.db_ok:
            log.warning("database unreachable (%s); retrying with backoff", describe(exc))
        self.db_ok = False
        await asyncio.sleep(random.uniform(0.3, 1.0))

    def _delay(self, attempts: int) -> float:
        s = self.settings
        base = min(s.backoff_max_seconds, s.backoff_seconds * 2.0 ** max(attempts, 0))
        return base * random.uniform(0.5, 1.5)

    async def _fail(self, job: Job, lane: str, error: str, final: bool = False) -> None:
        max_attempts = job.attempts + 1 if final else self.settings.max_attempts
        status = await self.queue.fail(job, error, self._delay(job.attempts), max_attempts)
        self.metrics.failed.labels(lane).inc()
        if status == "failed":
            self.failed_jobs += 1
            log.error("job %d (row %s) failed for good: %s", job.id, job.pk, error)
        else:
            log.warning("job %d (row %s) failed, will retry: %s", job.id, job.pk, error)

    def _finished(self, lane: str, watch: Watch, n: int, stale: int) -> None:
        self.done_rows += n
        self.metrics.completed.labels(lane).inc(n)
        if self._bar is not None:
            self._bar.update(n)
        if stale:
            log.info(
                "%s: %d row(s) changed while being processed; queued again", watch.label, stale
            )

    # ------------------------------------------------------------------ embedding

    async def _embed_jobs(self, jobs: Sequence[Job]) -> None:
        by_watch: dict[int, list[Job]] = defaultdict(list)
        for job in jobs:
            by_watch[job.watch_id].append(job)
        for wid, group in by_watch.items():
            watch = self.watches.get(wid)
            emb = await self.embedder(watch.model) if watch else None
            if watch is None or emb is None:
                await self.queue.release(group)
                continue
            read = await self._read(watch, emb, [j.pk for j in group])
            todo = {pk: t for pk, t in read.text.items() if t}
            vectors, errors = await self._embed(emb, todo)
            for job in group:
                if job.pk in errors:
                    await self._fail(job, "embed", errors[job.pk])
            ok = [j for j in group if j.pk not in errors]
            out = await self.queue.finish(watch, "embed", ok, read, vectors)
            self._finished("embed", watch, out.done, len(out.stale))

    async def _read(self, watch: Watch, emb: Embedder, pks: list[str]) -> Texts:
        """The rows' text, as much of it as the model can read: a generous prefix, and the
        whole text in the rare case that the prefix holds fewer tokens than the model takes
        (long runs of whitespace or markup)."""
        read = await self.queue.read_texts(watch, pks, emb.max_tokens * CHARS_PER_TOKEN)
        if read.cut:
            cut = sorted(read.cut)
            prefixes = [read.text[p] or "" for p in cut]
            lengths = (await asyncio.to_thread(emb.encode, prefixes)).lengths
            short = [p for p, n in zip(cut, lengths, strict=True) if n < emb.max_tokens]
            if short:
                read.update(await self.queue.read_texts(watch, short))
        return read

    async def _embed(
        self, emb: Embedder, todo: dict[str, str]
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Vectors for the texts, and errors for those that could not be embedded.

        The texts are taken longest first in chunks (little padding across the whole
        claim); between chunks a shutdown may stop the work, and the rest stays queued."""
        pks = sorted(todo, key=lambda p: len(todo[p]), reverse=True)
        good: dict[str, np.ndarray] = {}
        bad: dict[str, str] = {}
        for start in range(0, len(pks), EMBED_CHUNK):
            if self.stop.is_set():
                break
            chunk = pks[start : start + EMBED_CHUNK]
            async with self.engine_lock:
                try:
                    vectors = await asyncio.to_thread(emb.embed, [todo[p] for p in chunk])
                    good.update(zip(chunk, vectors, strict=True))
                    continue
                except Exception as exc:
                    log.warning(
                        "a batch of %d failed (%s); embedding its texts one by one", len(chunk), exc
                    )
                for p in chunk:
                    try:
                        good[p] = (await asyncio.to_thread(emb.embed, [todo[p]]))[0]
                    except Exception as exc:
                        bad[p] = f"{type(exc).__name__}: {exc}"
        return good, bad

    # ------------------------------------------------------------------ summaries

    async def _summary_jobs(self, jobs: Sequence[Job]) -> None:
        from .llm import DEFAULT_SUMMARY_PROMPT, GenerateOptions, render_prompt

        for job in jobs:
            watch = self.watches.get(job.watch_id)
            if watch is None or not watch.llm_model:
                await self.queue.release([job])
                continue
            rows, read = await self.queue.read_rows(watch, [job.pk])
            row = rows.get(job.pk)
            text = read.text.get(job.pk)
            results: dict[str, Any] = {}
            if row is not None and text:
                try:
                    prompt = render_prompt(watch.llm_prompt or DEFAULT_SUMMARY_PROMPT, row)
                    options = GenerateOptions.from_mapping(watch.llm_options or {})
                    results[job.pk] = (
                        await self.llm().generate(watch.llm_model, prompt, options)
                    ).strip()
                except LLMModelMissing as exc:
                    await self._fail(job, "summary", str(exc), final=True)
                    continue
                except LLMError as exc:
                    await self._fail(job, "summary", str(exc))
                    continue
            out = await self.queue.finish(watch, "summary", [job], read, results)
            self._finished("summary", watch, out.done, len(out.stale))

    # ------------------------------------------------------------------ housekeeping

    async def _maintenance(self) -> None:
        s = self.settings
        last_prune = 0.0
        last_beat = time.monotonic()
        while not self.stop.is_set():
            tick = min(s.poll_seconds, s.lease_seconds / 3)
            with suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), tick)
            if self.stop.is_set():
                return
            try:
                now = time.monotonic()
                if now - last_beat >= s.lease_seconds / 3:
                    await self.queue.heartbeat(self.in_flight["embed"], s.lease_seconds)
                    await self.queue.heartbeat(self.in_flight["summary"], s.summary_lease_seconds)
                    last_beat = now
                if self.orphans:
                    await self.queue.release_claims(self.orphans)
                    log.info(
                        "released %d job(s) left unfinished by a lost connection", len(self.orphans)
                    )
                    self.orphans = Claims()
                reaped = await self.queue.reap()
                if reaped:
                    log.warning(
                        "%d job(s) outlived their lease (a worker died?); queued again", reaped
                    )
                if now - last_prune > 60:
                    await self.queue.prune()
                    last_prune = now
                await self.refresh_watches()
                counts = await self.queue.outstanding(list(self.watches), ["embed", "summary"])
                for status in ("pending", "running", "failed"):
                    self.metrics.queue_depth.labels(status).set(counts[status])
                self._db_up()
            except DB_ERRORS as exc:
                await self._db_down(exc)
            self.wake.set()  # the poll fallback: look for work now and then
