"""The daemon: slots that claim and work, and side tasks that keep them honest.

Slots (``concurrency`` embedding slots, one more that only takes fresh work, and
``summary_concurrency`` summary slots) each loop: claim -> ``lanes`` (read, work, write) ->
claim. Fresh work (rows the application just wrote) is claimed before backfill and gets
the engine first (``gate``), so a backlog never hides a new row for more than one
inference chunk.

Side tasks, supervised: the LISTEN connection (``listen``), the heartbeat (renews leases
every lease/3, and marks jobs whose lease is gone so their batch does not write them), and
housekeeping (reaping expired leases, releasing work an outage interrupted, watching for
watch changes and loading their models in the background, building deferred HNSW indexes,
finishing model changes, metrics). A side task that dies stops the worker with exit code 1
and the reason in the log: nothing runs on without its leases renewed.

SIGTERM/SIGINT: stop claiming, finish the inference chunk in flight within
``shutdown_seconds``, release everything else, exit 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from .config import Settings
from .db import describe, q, session_pool
from .engine import Embedder
from .errors import AutoembedError
from .gate import Gate
from .lanes import EMBED_CHUNK, Batch, Lanes
from .listen import Listener
from .metrics import Metrics
from .models import Models
from .outcomes import Outcome, classify, is_db_outage
from .queue import Claims, Job, Queue, Watch, WatchChanged

log = logging.getLogger(__name__)

EmbedderFactory = Callable[[str], Embedder]
EXIT_UNSERVED = 3  # --drain: some watches could not be served (their model, their table)
EXIT_CRASHED = 1


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
        self.models = Models(embedder_factory or self._load_embedder, self.metrics)
        self.watches: dict[int, Watch] = {}
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()
        self.gate = Gate()
        self.claims: dict[str, Claims] = {lane: Claims() for lane in ("embed", "next", "summary")}
        self.orphans = Claims()  # claims an outage interrupted: released when it is over
        self.lost: set[int] = set()  # jobs whose lease the heartbeat found gone
        self.db_ok = True
        self.llm_down_until = 0.0  # monotonic: the summary lane pauses while the LLM is out
        self.llm_pause = 0.0
        self.llm_problem: str | None = None
        # LLM model -> (why it cannot be used, or None; when that was found)
        self.llm_checked: dict[str, tuple[str | None, float]] = {}
        self.unserved: dict[int, str] = {}  # watch id -> why it is not served now
        self.index_problems: dict[int, str] = {}
        self.done_rows = 0
        self.failed_jobs = 0
        self.exit_code = 0
        self._refresh_needed = False
        self._next_due: float | None = None
        self._bar: Any = None
        self._side_jobs: set[asyncio.Task[Any]] = set()
        self._index_work: set[int] = set()  # watches whose index or model change is under way
        self.pool: AsyncConnectionPool[Any] = session_pool(
            self.url,
            max_size=settings.concurrency + settings.summary_concurrency + 5,
            name="autoembed",
        )
        self.queue = Queue(self.pool, settings.worker_name)
        self.listener = Listener(self.url, self._on_notify)
        self.lanes = Lanes(
            settings, self.queue, self.gate, self.metrics, self.stop, self.lost, self._finished
        )

    # ------------------------------------------------------------------ models

    def _load_embedder(self, model: str) -> Embedder:
        s = self.settings
        return Embedder.load(model, device=s.device, precision=s.precision, threads=s.threads)

    @property
    def embedders(self) -> dict[str, Embedder]:
        return self.models.loaded

    @property
    def model_errors(self) -> dict[str, str]:
        return {name: t.error for name, t in self.models.troubles.items()}

    @property
    def engine_lock(self) -> Any:
        """For the HTTP API in the same process: an embedding request takes a fresh turn."""
        return self.gate.lock(fresh=True)

    async def embedder(self, model: str) -> Embedder | None:
        """The loaded model of that name, loading it now (None if it cannot be loaded)."""
        return await self.models.wait(model)

    def llm(self) -> Any:
        if self.lanes.llm is None:
            from .llm import LLMClient

            self.lanes.llm = LLMClient(
                self.settings.llm_host, self.settings.llm_mode, retries=self.settings.llm_retries
            )
        return self.lanes.llm

    # ------------------------------------------------------------------ watches

    async def refresh_watches(self) -> None:
        watches = await self.queue.watches()
        for wid, w in watches.items():
            old = self.watches.get(wid)
            if old is None or old.version != w.version:
                lanes = ", ".join(w.lanes)
                log.info(
                    "serving %s (model %s; lanes: %s)%s",
                    w.label,
                    w.model,
                    lanes,
                    f"; changing to {w.next_model}" if w.next_model else "",
                    extra={"watch": wid, "action": "watch"},
                )
            if w.trouble and (old is None or old.trouble != w.trouble):
                log.error(
                    "not serving %s: %s",
                    w.label,
                    w.trouble,
                    extra={"watch": wid, "action": "unserved"},
                )
        self.watches = watches
        wanted = {
            m for w in watches.values() for m in (w.model, w.next_model) if m and not w.trouble
        }
        for name in wanted:
            self.models.want(name)
        self.models.forget(wanted)
        self._check_servable()

    def _check_servable(self) -> None:
        unserved: dict[int, str] = {}
        for w in self.watches.values():
            if w.trouble:
                unserved[w.id] = w.trouble
                continue
            for lane in ("embed", "next"):
                model = w.model_of(lane)
                if lane == "next" and not model:
                    continue
                assert model is not None
                emb = self.models.get(model)
                if emb is None and self.models.failed(model):
                    unserved[w.id] = f"model {model} cannot be loaded: {self.models.error(model)}"
                elif emb is not None and emb.dim != w.dim_of(lane):
                    unserved[w.id] = (
                        f"model {model} makes {emb.dim} dimensions but {w.label} holds "
                        f"vector({w.dim_of(lane)})"
                    )
            why = self.llm_checked.get(w.llm_model or "", (None, 0.0))[0]
            if w.summary_column and why:
                unserved.setdefault(w.id, why)
        for wid, why in unserved.items():
            if self.unserved.get(wid) != why:
                log.error(
                    "%s is not served: %s", self.watches[wid].label, why, extra={"watch": wid}
                )
        self.unserved = unserved

    def servable(self, lane: str) -> list[int]:
        out = []
        for w in self.watches.values():
            if w.trouble:
                continue
            if lane == "summary":
                checked = self.llm_checked.get(w.llm_model or "")
                if w.summary_column and checked is not None and checked[0] is None:
                    out.append(w.id)
                continue
            model = w.model_of(lane)
            emb = self.models.get(model) if model else None
            if emb is not None and emb.dim == w.dim_of(lane):
                out.append(w.id)
        return out

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
        side: list[asyncio.Task[Any]] = []
        slots: list[asyncio.Task[Any]] = []
        try:
            await self._wait_for_database()
            if self.stop.is_set():
                return self.exit_code
            await self.refresh_watches()
            if not self.watches:
                log.warning("no table is watched yet: `autoembed watch TABLE --column COL`")
            await self._start_progress()
            side = [
                asyncio.create_task(self.listener.run(self.stop), name="listener"),
                asyncio.create_task(self._heartbeat(), name="heartbeat"),
                asyncio.create_task(self._housekeeping(), name="housekeeping"),
            ]
            s = self.settings
            slots = [
                asyncio.create_task(self._slot(i, False), name=f"embed-{i}")
                for i in range(s.concurrency)
            ]
            slots.append(asyncio.create_task(self._slot(s.concurrency, True), name="embed-fresh"))
            slots += [
                asyncio.create_task(self._summary_slot(), name=f"summary-{i}")
                for i in range(s.summary_concurrency)
            ]
            log.info(
                "worker %s running: %d embedding slot(s) (+1 for fresh rows), %d summary slot(s)%s",
                s.worker_name,
                s.concurrency,
                s.summary_concurrency,
                ", draining" if self.drain else "",
            )
            await self._supervise(side, slots)
            await self._shut_down(slots)
        finally:
            for task in side + slots:
                task.cancel()
            await asyncio.gather(*side, *slots, return_exceptions=True)
            for task in list(self._side_jobs):
                task.cancel()
            await asyncio.gather(*self._side_jobs, return_exceptions=True)
            await self.models.aclose()
            if self._bar is not None:
                self._bar.close()
            with suppress(Exception):
                async with self.pool.connection(timeout=2.0) as conn:
                    await conn.execute(q("worker_gone"), {"name": self.settings.worker_name})
            if self.lanes.llm is not None:
                await self.lanes.llm.aclose()
            await self.pool.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        log.info(
            "worker stopped: %d row(s) done, %d job(s) failed for good",
            self.done_rows,
            self.failed_jobs,
        )
        return self.exit_code

    async def _supervise(
        self, side: list[asyncio.Task[Any]], slots: list[asyncio.Task[Any]]
    ) -> None:
        """Wait for a stop; a side task or slot that ends by itself stops the worker."""
        stopping = asyncio.create_task(self.stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait(
                [stopping, *side, *slots], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopping.cancel()
        for task in done:
            if task is stopping or task.cancelled():
                continue
            exc = task.exception()
            if exc is None and (task in slots or self.stop.is_set()):
                continue  # a drained slot, or a side task that saw the stop
            log.critical(
                "the %s task stopped%s; stopping the worker",
                task.get_name(),
                f": {type(exc).__name__}: {exc}" if exc else "",
                exc_info=exc,
                extra={"action": "crashed"},
            )
            self.exit_code = EXIT_CRASHED
            self.request_stop(f"{task.get_name()} failed")

    async def _shut_down(self, slots: list[asyncio.Task[Any]]) -> None:
        _, pending = await asyncio.wait(slots, timeout=self.settings.shutdown_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        leftover = Claims()
        for claims in (*self.claims.values(), self.orphans):
            for token, ids in claims.held.items():
                leftover.held.setdefault(token, set()).update(ids)
        if leftover:
            try:
                await self.queue.release_claims(leftover)
                log.info("released %d unfinished job(s) for other workers", len(leftover))
            except Exception as exc:
                log.warning(
                    "could not release %d job(s) (%s): they go back to the queue when their "
                    "lease runs out",
                    len(leftover),
                    describe(exc),
                )

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
            except Exception as exc:
                if not is_db_outage(exc):
                    raise
                log.warning("database not reachable yet (%s); retrying", describe(exc))
                with suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
                delay = min(delay * 2, 10.0)

    async def _start_progress(self) -> None:
        if not (self.drain and self.progress):
            return
        from tqdm import tqdm

        counts = await self.queue.outstanding(list(self.watches), ["embed", "summary", "next"])
        self._bar = tqdm(
            total=counts["pending"] + counts["running"],
            unit="row",
            desc="embedding",
            dynamic_ncols=True,
            smoothing=0.1,
        )

    # ------------------------------------------------------------------ slots

    async def _claim_embed(self, fresh_only: bool) -> tuple[str, list[Job]]:
        s = self.settings
        for kind in ("fresh",) if fresh_only else ("fresh", "backfill"):
            for lane in ("embed", "next"):
                ids = self.servable(lane)
                if not ids:
                    continue
                limit = EMBED_CHUNK if kind == "fresh" else s.batch_size
                jobs = await self.queue.claim(lane, kind, ids, limit, s.lease_seconds)
                if jobs:
                    return lane, jobs
        return "embed", []

    async def _slot(self, number: int, fresh_only: bool) -> None:
        while not self.stop.is_set():
            if self._refresh_needed:
                self._refresh_needed = False
                with suppress(Exception):
                    await self.refresh_watches()
            try:
                lane, jobs = await self._claim_embed(fresh_only)
                self._db_up()
            except Exception as exc:
                if not is_db_outage(exc):
                    raise
                await self._db_down(exc)
                continue
            if not jobs:
                if self.drain and not fresh_only and await self._drained():
                    self.request_stop("queue drained")
                    return
                await self._idle()
                continue
            await self._work(
                lane, jobs, lambda b: self.lanes.embed_claim(b, self.watches, self.models.get)
            )

    async def _summary_slot(self) -> None:
        s = self.settings
        while not self.stop.is_set():
            if time.monotonic() < self.llm_down_until:
                await self._idle(until=self.llm_down_until)
                continue
            await self._check_llm_models()
            try:
                ids = self.servable("summary")
                jobs = await self.queue.claim("summary", "fresh", ids, 1, s.summary_lease_seconds)
                if not jobs:
                    jobs = await self.queue.claim(
                        "summary", "backfill", ids, 1, s.summary_lease_seconds
                    )
                self._db_up()
            except Exception as exc:
                if not is_db_outage(exc):
                    raise
                await self._db_down(exc)
                continue
            if not jobs:
                await self._idle()
                continue
            self.llm()
            await self._work("summary", jobs, lambda b: self.lanes.summary_claim(b, self.watches))

    async def _work(self, lane: str, jobs: list[Job], run: Callable[[Batch], Any]) -> None:
        """One claim, accounted for: whatever happens, each of its jobs ends once."""
        self.metrics.claimed.labels(lane).inc(len(jobs))
        registry = self.claims[lane]
        registry.add(jobs)
        batch = Batch.of(lane, jobs, registry)
        started = time.perf_counter()
        try:
            await run(batch)
            self.metrics.batch_seconds.labels(lane).observe(time.perf_counter() - started)
        except asyncio.CancelledError:
            raise  # shutdown: run() releases what is still claimed
        except WatchChanged as exc:
            log.info("%s; reloading watches", exc, extra={"lane": lane, "action": "watch_changed"})
            await self._give_back(batch, lane)
            self._refresh_needed = True
        except Exception as exc:
            outcome = classify(exc)
            if outcome is Outcome.OUTAGE and lane == "summary" and not is_db_outage(exc):
                self._llm_down(exc)
                await self._give_back(batch, lane)
            elif outcome is Outcome.OUTAGE:
                self.orphans.add(batch.jobs())  # released once the database answers again
                batch.take(batch.jobs())
                await self._db_down(exc)
            elif outcome is Outcome.BUSY:
                log.info(
                    "%s batch gave way to a lock held by the application (%s); retrying later",
                    lane,
                    describe(exc),
                    extra={"lane": lane, "action": "busy"},
                )
                await self._give_back(batch, lane, delay=2.0)
            else:
                log.error(
                    "%s batch failed: %s", lane, describe(exc), exc_info=True, extra={"lane": lane}
                )
                try:  # charged once, to the jobs the failure interrupted
                    await self.lanes.fail(
                        batch,
                        batch.jobs(),
                        f"{type(exc).__name__}: {describe(exc)}",
                        final=outcome is Outcome.FAIL,
                    )
                except Exception as again:
                    if not is_db_outage(again):
                        raise
                    self.orphans.add(batch.jobs())
                    batch.take(batch.jobs())
        finally:
            self.failed_jobs += batch.failed_for_good
            batch.failed_for_good = 0
            self.wake.set()  # idle slots look again (a drain may be over)

    async def _give_back(self, batch: Batch, lane: str, delay: float = 0.0) -> None:
        try:
            await self.lanes.release(batch, batch.jobs(), delay)
        except Exception as exc:
            if not is_db_outage(exc):
                raise
            self.orphans.add(batch.jobs())
            batch.take(batch.jobs())

    async def _idle(self, until: float | None = None) -> None:
        timeout = self.settings.poll_seconds
        if self._next_due is not None:
            timeout = max(0.01, min(timeout, self._next_due - time.monotonic()))
        if until is not None:
            timeout = max(0.01, min(timeout, until - time.monotonic()))
        with suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout)
        self.wake.clear()

    async def _drained(self) -> bool:
        """--drain: nothing in flight, nothing left that this worker can serve. Watches it
        cannot serve end the drain with an error that names them (``exit_code``)."""
        if any(self.claims.values()) or self.orphans:
            return False
        loading = {
            w.id
            for w in self.watches.values()
            if not w.trouble and any(self.models.loading(m) for m in (w.model, w.next_model) if m)
        }
        if loading:
            return False
        self._check_servable()
        served = [w for w in self.watches if w not in self.unserved]
        lanes = ["embed", "next"] + (["summary"] if self.servable("summary") else [])
        try:
            counts = await self.queue.outstanding(served, lanes)
            everything = await self.queue.outstanding(
                list(self.watches), ["embed", "next", "summary"]
            )
        except Exception as exc:
            if not is_db_outage(exc):
                raise
            return False
        if self._bar is not None:
            self._bar.total = max(self._bar.total or 0, self._bar.n + counts["pending"])
            self._bar.refresh()
        due = counts["next_due_seconds"]
        self._next_due = None if due is None else time.monotonic() + max(due, 0.0)
        if counts["pending"] + counts["running"]:
            return False
        # a deferred index or a model change still to finish (housekeeping does it)
        unfinished = [
            w
            for w in self.watches.values()
            if w.id not in self.unserved
            and (w.next_model or w.index_state == "deferred")
            and w.id not in self.index_problems
        ]
        if unfinished:
            self._refresh_needed = True
            await self._indexes_and_migrations()
            return False
        waiting = {self.watches[wid].label: why for wid, why in self.unserved.items()}
        if everything["pending"] + everything["running"] and not waiting:
            waiting["summary lane"] = self.llm_problem or "no LLM server can be used"
        for wid, why in self.index_problems.items():
            if wid in self.watches and wid not in self.unserved:
                # its rows have their vectors, but search scans the table: a backfill script
                # must not take that for success
                waiting[f"the HNSW index of {self.watches[wid].label}"] = why
        for label, why in waiting.items():
            log.error("left unserved: %s: %s", label, why, extra={"action": "unserved"})
        if waiting:
            self.exit_code = EXIT_UNSERVED
        return True

    def _db_up(self) -> None:
        if not self.db_ok:
            log.info("database reachable again")
        self.db_ok = True

    async def _db_down(self, exc: BaseException) -> None:
        if self.db_ok:
            log.warning(
                "database unreachable (%s); retrying with backoff",
                describe(exc),
                extra={"action": "db_down"},
            )
        self.db_ok = False
        with suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), 0.5)

    def _llm_down(self, exc: BaseException) -> None:
        self.llm_pause = min(30.0, max(1.0, self.llm_pause * 2))
        self.llm_down_until = time.monotonic() + self.llm_pause
        if self.llm_problem is None:
            log.warning(
                "the LLM server is unreachable (%s); the summary lane pauses and probes it "
                "(no attempt is charged to the rows)",
                exc,
                extra={"lane": "summary", "action": "llm_down"},
            )
        self.llm_problem = f"LLM server unreachable: {exc}"

    async def _check_llm_models(self) -> None:
        """Before serving a summary watch: is its model on the server? (A server that
        answers with whatever it loaded would otherwise write another model's text.)"""
        from .errors import LLMModelMissing

        now = time.monotonic()
        wanted = {w.llm_model for w in self.watches.values() if w.summary_column and w.llm_model}
        for model in sorted(m for m in wanted if m is not None):
            checked = self.llm_checked.get(model)
            # checked once; a refusal again after a minute; after an outage, a probe
            if (
                checked is not None
                and not self.llm_problem
                and (checked[0] is None or now - checked[1] < 60)
            ):
                continue
            try:
                await self.llm().require_model(model)
            except LLMModelMissing as exc:
                if checked is None or checked[0] != str(exc):
                    log.error("%s", exc, extra={"lane": "summary", "action": "llm_model_missing"})
                self.llm_checked[model] = (str(exc), now)
            except Exception as exc:
                if classify(exc) is Outcome.OUTAGE:
                    self._llm_down(exc)
                    return
                self.llm_checked[model] = (str(exc), now)
                log.error("cannot use LLM model %s: %s", model, exc, extra={"lane": "summary"})
            else:
                self.llm_checked[model] = (None, now)
                if self.llm_problem is not None:
                    log.info("the LLM server answers again", extra={"lane": "summary"})
                self.llm_problem = None
                self.llm_pause = 0.0
                self.llm_down_until = 0.0

    def _finished(self, lane: str, watch: Watch, n: int, stale: int) -> None:
        self.done_rows += n
        self.metrics.completed.labels(lane).inc(n)
        if self._bar is not None:
            self._bar.update(n)
        if stale:
            log.info(
                "%s: %d row(s) changed while being processed; queued again",
                watch.label,
                stale,
                extra={"watch": watch.id, "lane": lane, "action": "stale"},
            )

    # ------------------------------------------------------------------ side tasks

    async def _heartbeat(self) -> None:
        """Renew the leases of the work in flight, every lease/3, and say this worker is
        alive. Jobs whose lease is gone are marked lost: their batch does not write them."""
        s = self.settings
        while not self.stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), s.lease_seconds / 3)
            try:
                for lane, claims in self.claims.items():
                    lease = s.summary_lease_seconds if lane == "summary" else s.lease_seconds
                    lost = await self.queue.heartbeat(claims, lease)
                    if lost:
                        self.lost.update(lost)
                        log.warning(
                            "%d %s job(s) lost their lease (taken over after expiry, or queued "
                            "again): they will not be written by this worker",
                            len(lost),
                            lane,
                            extra={"lane": lane, "action": "lease_lost"},
                        )
                async with self.pool.connection() as conn:
                    await conn.execute(
                        q("worker_seen"),
                        {"name": s.worker_name, "problems": json.dumps(self.problems())},
                    )
                self._db_up()
            except Exception as exc:
                if not is_db_outage(exc):
                    raise
                await self._db_down(exc)

    def problems(self) -> dict[str, str]:
        out = {f"watch {wid}": why for wid, why in self.unserved.items()}
        out.update({f"model {m}": e for m, e in self.model_errors.items()})
        if self.llm_problem:
            out["llm"] = self.llm_problem
        out.update({f"index of watch {wid}": why for wid, why in self.index_problems.items()})
        return out

    async def _housekeeping(self) -> None:
        s = self.settings
        last_prune = 0.0
        while not self.stop.is_set():
            try:
                if self.orphans:
                    await self.queue.release_claims(self.orphans)
                    log.info(
                        "released %d job(s) left unfinished by a lost connection", len(self.orphans)
                    )
                    self.orphans = Claims()
                reaped = await self.queue.reap(s.max_attempts)
                if reaped:
                    failed = sum(1 for _, status in reaped if status == "failed")
                    log.warning(
                        "%d job(s) outlived their lease (a worker died?): queued again with an "
                        "attempt charged%s",
                        len(reaped),
                        f"; {failed} failed for good" if failed else "",
                        extra={"action": "reaped"},
                    )
                now = time.monotonic()
                if now - last_prune > 60:
                    await self.queue.prune()
                    last_prune = now
                await self.refresh_watches()
                counts = await self.queue.outstanding(
                    list(self.watches), ["embed", "summary", "next"]
                )
                for status in ("pending", "running", "failed"):
                    self.metrics.queue_depth.labels(status).set(counts[status])
                await self._indexes_and_migrations()
                self._db_up()
            except Exception as exc:
                if not is_db_outage(exc):
                    raise
                await self._db_down(exc)
            self.wake.set()  # the poll fallback: look for work now and then
            with suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), min(s.poll_seconds, s.lease_seconds / 3))

    async def _indexes_and_migrations(self) -> None:
        """Deferred HNSW indexes are built once a watch's backfill is done (whatever fresh
        work arrives meanwhile); a model change is finished once its new vectors cover
        every row and their index is built. One at a time per watch, whoever asks."""
        for w in list(self.watches.values()):
            if w.trouble or w.id in self._index_work:
                continue
            self._index_work.add(w.id)  # before any await: callers run concurrently
            started = False
            try:
                if w.next_model and await self.queue.left(w.id, "next", backfill_only=False) == 0:
                    self._side(self._finish_migration(w), w.id)
                    started = True
                elif (
                    not w.next_model
                    and w.index_state == "deferred"
                    and await self.queue.left(w.id, "embed", backfill_only=True) == 0
                ):
                    self._side(self._build_index(w), w.id)
                    started = True
            finally:
                if not started:
                    self._index_work.discard(w.id)

    def _side(self, coro: Any, watch_id: int) -> None:
        task = asyncio.create_task(coro, name=f"index {watch_id}")
        self._side_jobs.add(task)
        task.add_done_callback(self._side_jobs.discard)
        task.add_done_callback(lambda _t: self._index_work.discard(watch_id))

    async def _build_index(self, w: Watch) -> bool:
        """CREATE INDEX CONCURRENTLY (outside any transaction, writes go on) of each index
        the watch lacks (vectors, text, metadata), with the maintenance memory and parallel
        workers the settings and the server allow."""
        s = self.settings
        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "SELECT pg_catalog.set_config('maintenance_work_mem', %s, false), "
                    "pg_catalog.set_config('max_parallel_maintenance_workers', "
                    "least(pg_catalog.current_setting('max_parallel_workers')::int, 8)::text, "
                    "false)",
                    (s.index_memory,),
                )
                # what a build cut short (a killed worker) left: an invalid index of our name
                cur = await conn.execute(q("invalid_indexes"), {"watch": w.id})
                for (name,) in await cur.fetchall():
                    log.info("dropping %s, left invalid by a build cut short", name)
                    await conn.execute(
                        sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.SQL(name))
                    )
                for _ in range(3):  # vectors, text, metadata
                    cur = await conn.execute("SELECT autoembed.index_sql(%s, true)", (w.id,))
                    row = await cur.fetchone()
                    statement = row[0] if row else None
                    if not statement:
                        break
                    log.info(
                        "building an index of %s: %s", w.label, statement, extra={"watch": w.id}
                    )
                    started = time.perf_counter()
                    await conn.execute(statement)
                    log.info(
                        "built it in %.1f s",
                        time.perf_counter() - started,
                        extra={"watch": w.id, "action": "index_built"},
                    )
                if not w.next_model:
                    await conn.execute(q("index_built"), {"watch": w.id})
            self.index_problems.pop(w.id, None)
            return True
        except Exception as exc:
            if is_db_outage(exc):
                return False
            why = describe(exc)
            if self.index_problems.get(w.id) != why:
                log.error(
                    "cannot build the HNSW index of %s (%s): search scans the table until it "
                    "exists; the table's owner can build it with the statement "
                    "`SELECT autoembed.index_sql(%d)` gives",
                    w.label,
                    why,
                    w.id,
                    extra={"watch": w.id, "action": "index_failed"},
                )
            self.index_problems[w.id] = why
            return False

    async def _finish_migration(self, w: Watch) -> None:
        if not await self._build_index(w) and w.id not in self.index_problems:
            return  # the database went away: next time
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT autoembed.finish_migration(%s)", (w.id,))
            row = await cur.fetchone()
        why = row[0] if row else None
        if why is None:
            log.info(
                "%s now uses %s: the new vectors were swapped in",
                w.label,
                w.next_model,
                extra={"watch": w.id, "action": "model_swapped"},
            )
            self._refresh_needed = True
            self.wake.set()
        else:
            log.info("model change of %s not finished: %s", w.label, why, extra={"watch": w.id})
