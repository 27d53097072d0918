"""A worker under a backlog, on an embedded PostgreSQL (or $DATABASE_URL's server).

    python benchmarks/bench_backlog.py [--backlog 3000] [--backfill 100000]
                                       [--scale 100000] [--scale-index 20000]
                                       [--workers 1,2,4,8] [--skip backlog,index,scale]
                                       [--fence-check 50000] [--trace-fresh 1500]
                                       [--wait-fence]

1. backlog (all-minilm-l6-v2, a real ``autoembed run`` process): 3,000 passages are queued,
   then the worker starts. Measured: worker start -> first vector committed, and the time the
   backlog took. While it drains, single rows are inserted one at a time at random
   intervals of 1-2 s, alternately into another watched table and into the backlog's own
   table, and each row's INSERT -> vector-committed latency is measured (a NOTIFY from a
   trigger on the vector column, sent in the writing transaction). After the backlog, the
   same probes on the idle worker. Two kinds of backlog: ``backfill`` (rows that were in
   the table when it was watched: queued as backfill) and ``fresh`` (one bulk INSERT
   into a watched table: queued as fresh work, like any write of the application).
2. index first vs index after: a backfill of 100,000 short rows with a no-op embedder,
   watched with index => 'now' (HNSW index built at once, every write inserts into it)
   and index => 'deferred' (vectors first, then CREATE INDEX CONCURRENTLY by the worker):
   rows/s, and the time until the HNSW index is ready.
3. scaling: 1, 2, 4, 8 worker processes (benchmarks/noop_worker.py, no-op embedder)
   draining one backfill on one PostgreSQL, without the HNSW index and with it: rows/s,
   lock waits sampled from pg_stat_activity / pg_locks every 50 ms, CPU seconds of the
   PostgreSQL processes (the postmaster and its children, before/after) and of the workers.
   From those and the GPU rate in README (4,244 passages/s on one H200), how many GPU
   workers one PostgreSQL can feed.
4. --fence-check N (a diagnostic, off by default): a deferred backfill of N rows drained
   with the worker's write fence as shipped and with one that waits for row locks
   instead of skipping them (patched in this process only), twice each.
5. --trace-fresh N (a diagnostic, off by default): where single rows' time goes during a
   backfill of N passages (the worker in this process, its queue and lanes wrapped to
   record when each row is claimed, reaches the engine, is embedded and is written).
6. --wait-fence (a diagnostic): everything above with the write fence patched to wait
   (bench_worker.use_waiting_fence), in this process and in the no-op worker processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoembed.db import connect
from autoembed.engine import Embedder
from autoembed.runner import Worker
from autoembed.watches import watch

from benchmarks.bench_worker import NoOp, fresh_db, settings, use_waiting_fence
from benchmarks.common import ROOT, cores, passages, with_server

MODEL = "all-minilm-l6-v2"
WAIT_FENCE = False  # --wait-fence: every worker here runs with use_waiting_fence()
GPU_RATE = 4244.0  # passages/s, gte-small shape fp16 batch 256, one H200 (README, Performance)


def pct(values: list[float], p: int) -> float:
    """The p-th percentile (p in 5..95, steps of 5) of at least two values; else the max."""
    if len(values) < 2:
        return max(values) if values else float("nan")
    return statistics.quantiles(values, n=20, method="inclusive")[p // 5 - 1]


def load_text() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (5 min {five:.2f})"


# what the worker logs when a claim's jobs outlive their leases, and when an index fails
TROUBLE = {
    "reaped": re.compile(r"(\d+) job\(s\) outlived their lease"),
    "lease lost": re.compile(r"(\d+) \w+ job\(s\) lost their lease"),
    "not written": re.compile(r"(\d+) job\(s\) were taken over by another worker"),
    "index errors": re.compile(r"cannot build the HNSW index()"),
}


def tally(text: str, into: Counter[str] | None = None) -> Counter[str]:
    """Jobs per kind of lease trouble (and index errors) in worker log text."""
    out: Counter[str] = Counter() if into is None else into
    for kind, pattern in TROUBLE.items():
        for m in pattern.finditer(text):
            out[kind] += int(m.group(1)) if m.group(1) else 1
    return out


def tally_text(c: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items() if v) or "none"


class Tally(logging.Handler):
    """Counts the worker's lease and index trouble as it logs it (this process)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        tally(msg, self.counts)
        if "index" in msg and record.levelno >= logging.ERROR:
            self.messages.append(msg.split(":", 1)[-1].split("): search")[0].strip())


# ---------------------------------------------------------------------- CPU of PostgreSQL


def postmaster(url: str) -> psutil.Process | None:
    """The server's postmaster, when it runs on this machine (a backend's parent)."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        try:  # while this backend is alive
            proc = psutil.Process(int(row[0])) if row else None
            parent = proc.parent() if proc else None
        except psutil.Error:
            return None
    return parent if parent is not None and "postgres" in parent.name() else None


def db_cpu(pm: psutil.Process | None) -> float:
    """CPU seconds of the postmaster, its reaped children (backends that ended) and its live
    children (backends, background workers)."""
    if pm is None:
        return float("nan")
    t = pm.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in pm.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            c = child.cpu_times()
            total += c.user + c.system
    return float(total)


# ---------------------------------------------------------------------- 1. backlog

NOTIFY_SQL = (
    "CREATE FUNCTION written() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "PERFORM pg_notify('bench_written', TG_TABLE_NAME || ':' || NEW.id); RETURN NULL; END $$"
)


@dataclass
class Probe:
    table: str
    id: int
    inserted: float
    during: bool
    done: float | None = None

    @property
    def ms(self) -> float:
        assert self.done is not None
        return (self.done - self.inserted) * 1000


@dataclass
class Notes:
    """Vector-committed notifications as they arrive: (table, id) -> perf_counter."""

    seen: dict[tuple[str, int], float] = field(default_factory=dict)
    backlog_times: list[float] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async for note in conn.notifies():
            now = time.perf_counter()
            table, _, key = note.payload.partition(":")
            self.seen.setdefault((table, int(key)), now)
            if table == "backlog":
                self.backlog_times.append(now)
            self.arrived.set()

    async def wait_for(self, key: tuple[str, int], within: float) -> float | None:
        deadline = time.perf_counter() + within
        while key not in self.seen:
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), min(left, 1.0))
        return self.seen[key]


async def backlog_and_live(conn: Any) -> None:
    """The tables ``backlog`` (not watched yet) and ``live`` (watched)."""
    for table in ("backlog", "live"):
        await conn.execute(
            f"CREATE TABLE {table} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
            "content text)"
        )
    await watch(conn, "live", "content", model=MODEL)


async def bench_backlog(admin: str, n: int, kind: str, idle_probes: int, seed: int = 1) -> None:
    texts = passages(n + 400)
    backlog, spare = texts[:n], texts[n:]
    url = await fresh_db(admin, "bench_backlog")
    async with await connect(url) as conn:
        await backlog_and_live(conn)
        if kind == "fresh":
            await watch(conn, "backlog", "content", model=MODEL)  # then a bulk INSERT: fresh
        async with conn.cursor() as cur, cur.copy("COPY backlog (content) FROM STDIN") as copy:
            for t in backlog:
                await copy.write_row((t,))
        if kind == "backfill":
            await watch(conn, "backlog", "content", model=MODEL)  # queues the rows: backfill
        await conn.execute(NOTIFY_SQL)  # on the vector columns the watches added
        for table in ("backlog", "live"):
            await conn.execute(
                f"CREATE TRIGGER written AFTER UPDATE OF embedding ON {table} FOR EACH ROW "
                "EXECUTE FUNCTION written()"
            )
        cur = await conn.execute(
            "SELECT kind, count(*) FROM autoembed.jobs GROUP BY kind ORDER BY kind"
        )
        queued = ", ".join(f"{k} {c}" for k, c in await cur.fetchall())
    notes = Notes()
    rng = random.Random(seed)
    probes: list[Probe] = []
    log_path = ROOT / ".bench" / f"backlog-worker-{kind}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    async with await connect(url) as listen, await connect(url) as conn:
        await listen.execute("LISTEN bench_written")
        listener = asyncio.create_task(notes.listen(listen))
        env = dict(os.environ, DATABASE_URL=url)
        with log_path.open("w") as log_file:
            start = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "autoembed.cli", "run", "--no-progress"],
                *["--log-level", "info"],
                env=env,
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            try:
                next_table = "live"
                while len(notes.backlog_times) < n and proc.returncode is None:
                    await asyncio.sleep(rng.uniform(1.0, 2.0))
                    if len(notes.backlog_times) >= n:
                        break
                    sent = time.perf_counter()  # autocommit: committed when execute returns
                    cur = await conn.execute(
                        f"INSERT INTO {next_table} (content) VALUES (%s) RETURNING id",
                        (spare.pop(),),
                    )
                    row = await cur.fetchone()
                    assert row is not None
                    probes.append(Probe(next_table, int(row[0]), sent, True))
                    next_table = "backlog" if next_table == "live" else "live"
                done_at = notes.backlog_times[n - 1] if len(notes.backlog_times) >= n else None
                for p in probes:  # the last ones may still be in flight
                    p.done = await notes.wait_for((p.table, p.id), 600)
                for i in range(idle_probes):  # the same on an idle worker
                    table = "live" if i % 2 == 0 else "backlog"
                    await asyncio.sleep(0.3)
                    sent = time.perf_counter()
                    cur = await conn.execute(
                        f"INSERT INTO {table} (content) VALUES (%s) RETURNING id", (spare.pop(),)
                    )
                    row = await cur.fetchone()
                    assert row is not None
                    p = Probe(table, int(row[0]), sent, False)
                    p.done = await notes.wait_for((table, p.id), 60)
                    probes.append(p)
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(proc.wait(), 60)
                except TimeoutError:
                    proc.kill()
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
    first = notes.backlog_times[0] - start if notes.backlog_times else float("nan")
    print(
        f"\nbacklog of {n} passages queued as {kind} ({queued}); worker started as a process "
        f"(`autoembed run`, model load included); {load_text()}"
    )
    print(f"  worker start -> first vector committed: {first:.2f} s")
    if done_at is not None:
        print(
            f"  backlog finished {done_at - start:.1f} s after the start "
            f"({n / (done_at - notes.backlog_times[0]):.1f} rows/s after the first vector)"
        )
    else:
        print(f"  backlog NOT finished: {len(notes.backlog_times)} of {n} vectors")
    print(
        f"  {'single-row INSERT -> vector':<40} {'n':>3} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}"
    )
    for during in (True, False):
        for table in ("live", "backlog"):
            got = [p for p in probes if p.during == during and p.table == table]
            ms = [p.ms for p in got if p.done is not None]
            lost = len(got) - len(ms)
            where = "another table" if table == "live" else "the backlog's table"
            label = f"{'during the backlog' if during else 'idle worker'}, {where}"
            if not ms:
                print(f"  {label:<40} {len(got):>3}   (no vector{'s' if lost != 1 else ''})")
                continue
            print(
                f"  {label:<40} {len(ms):>3} {statistics.median(ms):>9.0f} {pct(ms, 95):>9.0f} "
                f"{max(ms):>9.0f}" + (f"   {lost} never got a vector" if lost else "")
            )
    print(
        f"  worker trouble (jobs): {tally_text(tally(log_path.read_text()))} "
        f"(worker log: {log_path.relative_to(ROOT)})"
    )


# ---------------------------------------------------------------------- 2. index first/after


def short_rows(n: int) -> list[str]:
    base = passages(2000)
    return [f"row {i}: " + " ".join(base[i % len(base)].split()[:10]) for i in range(n)]


@dataclass
class Timeline:
    vectors_done: float | None = None
    index_ready: float | None = None
    samples: int = 0


async def watch_progress(url: str, start: float, stop: asyncio.Event, out: Timeline) -> None:
    async with await connect(url) as conn:
        while not stop.is_set():
            cur = await conn.execute(
                "SELECT NOT EXISTS (SELECT FROM autoembed.jobs), "
                "(SELECT index_state = 'ready' FROM autoembed.watches LIMIT 1) AND EXISTS ("
                " SELECT FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                " JOIN pg_am am ON am.oid = c.relam WHERE i.indrelid = 'items'::regclass "
                " AND am.amname = 'hnsw' AND i.indisvalid)"
            )
            row = await cur.fetchone()
            now = time.perf_counter() - start
            out.samples += 1
            if row and row[0] and out.vectors_done is None:
                out.vectors_done = now
            if row and row[1] and out.index_ready is None:
                out.index_ready = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)


async def load_items(url: str, texts: list[str], index: str) -> float:
    """Rows first, then the watch (so they are queued as backfill); returns watch()'s time."""
    async with await connect(url) as conn:
        await conn.execute(
            "CREATE TABLE items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, content text)"
        )
        async with conn.cursor() as cur, cur.copy("COPY items (content) FROM STDIN") as copy:
            for t in texts:
                await copy.write_row((t,))
        t0 = time.perf_counter()
        await watch(conn, "items", "content", model=MODEL, index=index)
        return time.perf_counter() - t0


async def bench_index(admin: str, n: int) -> None:
    texts = short_rows(n)
    print(
        f"\nbackfill of {n:,} short rows (~{statistics.mean(map(len, texts)):.0f} chars), "
        f"no-op embedder (distinct unit vectors), one worker in this process "
        f"(batch 512, concurrency 2); {load_text()}"
    )
    print(
        f"  {'index':<10} {'watch() s':>9} {'vectors s':>9} {'rows/s':>8} "
        f"{'index ready s':>13} {'worker exit s':>13}  note"
    )
    for index in ("now", "deferred"):
        url = await fresh_db(admin, "bench_index")
        watch_s = await load_items(url, texts, index)
        emb = NoOp(distinct=True)
        worker = Worker(
            settings(url), drain=True, progress=False, embedder_factory=lambda _n, e=emb: e
        )
        line = Timeline()
        stop = asyncio.Event()
        trouble = Tally()
        logging.getLogger("autoembed").addHandler(trouble)
        start = time.perf_counter()
        poller = asyncio.create_task(watch_progress(url, start, stop, line))
        try:
            code = await worker.run()
        finally:
            logging.getLogger("autoembed").removeHandler(trouble)
        exit_s = time.perf_counter() - start
        await asyncio.sleep(0.3)
        stop.set()
        await poller
        async with await connect(url) as conn:
            cur = await conn.execute(
                "SELECT count(*) FILTER (WHERE embedding IS NOT NULL), count(*) FROM items"
            )
            with_vec = await cur.fetchone()
            cur = await conn.execute(
                "SELECT index_state FROM autoembed.watches WHERE source = 'items'::regclass"
            )
            state = await cur.fetchone()
            cur = await conn.execute(
                "SELECT c.relname || ' (' || am.amname || CASE WHEN i.indisvalid THEN '' "
                "ELSE ', INVALID' END || ')' FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam "
                "WHERE i.indrelid = 'items'::regclass AND am.amname <> 'btree' ORDER BY 1"
            )
            idx = [r[0] for r in await cur.fetchall()]
        vec_s = line.vectors_done
        ready = 0.0 if index == "now" else line.index_ready
        note = (
            f"{with_vec[0] if with_vec else '?'} of {with_vec[1] if with_vec else '?'} rows "
            f"with a vector; index_state {state[0] if state else '?'}; exit code {code}"
        )
        if index == "now":
            note += "; index built by watch() before the worker started"
        note += f"; indexes after: {', '.join(idx) or 'none'}; worker trouble: "
        note += tally_text(trouble.counts)
        for m in dict.fromkeys(trouble.messages):
            note += f"\n{'':<70}logged: {m}"
        print(
            f"  {index:<10} {watch_s:>9.1f} {vec_s or float('nan'):>9.1f} "
            f"{n / vec_s if vec_s else float('nan'):>8.0f} "
            f"{ready if ready is not None else float('nan'):>13.1f} {exit_s:>13.1f}  {note}"
        )


async def trace_fresh(admin: str, n: int, probes: int = 24, seed: int = 2) -> None:
    """Diagnostic (--trace-fresh N): where a fresh row's time goes during a backfill of N
    passages. The worker runs in this process with its queue and lanes wrapped (this
    process only) to record, per probe row: INSERT -> claimed, claimed -> inference call,
    the inference call (the wait for the engine's gate, then the row's own inference),
    inference -> written."""
    from autoembed import lanes as lanes_module
    from autoembed import queue as queue_module

    t0 = time.perf_counter()
    marks: dict[tuple[int, str], dict[str, float]] = {}
    claim0, infer0, finish0 = (
        queue_module.Queue.claim,
        lanes_module.Lanes._infer,
        queue_module.Queue.finish,
    )

    async def claim(self: Any, lane: str, kind: str, *a: Any) -> Any:
        jobs = await claim0(self, lane, kind, *a)
        for j in jobs if kind == "fresh" else []:
            marks.setdefault((j.watch_id, j.pk), {})["claimed"] = time.perf_counter() - t0
        return jobs

    async def infer(self: Any, emb: Any, chunk: Any, texts: Any, fresh: bool) -> Any:
        start = time.perf_counter() - t0
        out = await infer0(self, emb, chunk, texts, fresh)
        for j in chunk if fresh else []:
            m = marks.setdefault((j.watch_id, j.pk), {})
            m["infer"], m["inferred"] = start, time.perf_counter() - t0
        return out

    async def finish(self: Any, watch_: Any, lane: str, jobs: Any, *a: Any) -> Any:
        out = await finish0(self, watch_, lane, jobs, *a)
        for j in jobs:
            if (j.watch_id, j.pk) in marks:
                marks[(j.watch_id, j.pk)]["written"] = time.perf_counter() - t0
        return out

    texts = passages(n + probes)
    url = await fresh_db(admin, "bench_trace")
    async with await connect(url) as conn:
        await backlog_and_live(conn)
        async with conn.cursor() as cur, cur.copy("COPY backlog (content) FROM STDIN") as copy:
            for t in texts[:n]:
                await copy.write_row((t,))
        await watch(conn, "backlog", "content", model=MODEL)
        cur = await conn.execute("SELECT source::text, id FROM autoembed.watches")
        wid = dict(await cur.fetchall())
    emb = Embedder.load(MODEL, device="cpu")
    queue_module.Queue.claim = claim  # type: ignore[method-assign]
    lanes_module.Lanes._infer = infer  # type: ignore[method-assign]
    queue_module.Queue.finish = finish  # type: ignore[method-assign]
    sent: dict[tuple[int, str], float] = {}
    try:
        worker = Worker(
            settings(url, poll_seconds=5.0), progress=False, embedder_factory=lambda _n: emb
        )
        task = asyncio.create_task(worker.run())
        rng = random.Random(seed)
        async with await connect(url) as conn:
            await asyncio.sleep(3)
            for i in range(probes):
                await asyncio.sleep(rng.uniform(1.0, 2.0))
                table = "live" if i % 2 == 0 else "backlog"
                at = time.perf_counter() - t0
                cur = await conn.execute(
                    f"INSERT INTO {table} (content) VALUES (%s) RETURNING id", (texts[n + i],)
                )
                row = await cur.fetchone()
                assert row is not None
                sent[(wid[table], str(row[0]))] = at
            for _ in range(600):
                if all("written" in marks.get(k, {}) for k in sent):
                    break
                await asyncio.sleep(0.1)
        worker.request_stop("trace done")
        await task
    finally:
        queue_module.Queue.claim = claim0  # type: ignore[method-assign]
        lanes_module.Lanes._infer = infer0  # type: ignore[method-assign]
        queue_module.Queue.finish = finish0  # type: ignore[method-assign]
    print(
        f"\ntrace: {probes} single rows during a backfill of {n} passages, worker in this "
        f"process (poll 5 s); seconds; {load_text()}"
    )
    print(
        f"  {'sent':>6} {'->claimed':>9} {'->infer':>8} {'infer':>6} {'->written':>9} "
        f"{'total':>6}  (infer = the gate wait and the row's own inference)"
    )
    for key, at in sent.items():
        m = marks.get(key, {})
        if not all(k in m for k in ("claimed", "infer", "inferred", "written")):
            print(f"  {at:>6.1f}  incomplete: {m}")
            continue
        print(
            f"  {at:>6.1f} {m['claimed'] - at:>9.2f} {m['infer'] - m['claimed']:>8.2f} "
            f"{m['inferred'] - m['infer']:>6.2f} {m['written'] - m['inferred']:>9.2f} "
            f"{m['written'] - at:>6.2f}"
        )


async def fence_check(admin: str, n: int, trials: int = 2) -> None:
    """Diagnostic (--fence-check N): the same deferred backfill drained with the worker's
    write fence as shipped (FOR UPDATE SKIP LOCKED: a job row another transaction holds
    for a moment counts as taken over) and with a fence that waits for the lock instead
    (patched in this process only). A skipped job is left 'running' until its lease runs
    out (60 s), then re-queued with an attempt charged."""
    print(
        f"\nfence check: backfill of {n:,} short rows, index => 'deferred', no-op embedder, "
        f"one worker in this process; {load_text()}"
    )
    print(f"  {'fence':<26} {'drain s':>8}  worker trouble (jobs)")
    for trial in range(trials):
        for label, waits in (("FOR UPDATE SKIP LOCKED", False), ("FOR UPDATE (waits)", True)):
            undo = use_waiting_fence() if waits else (lambda: None)
            try:
                url = await fresh_db(admin, "bench_fence")
                await load_items(url, short_rows(n), "deferred")
                emb = NoOp(distinct=True)
                worker = Worker(
                    settings(url), drain=True, progress=False, embedder_factory=lambda _n, e=emb: e
                )
                trouble = Tally()
                logging.getLogger("autoembed").addHandler(trouble)
                start = time.perf_counter()
                try:
                    await worker.run()
                finally:
                    logging.getLogger("autoembed").removeHandler(trouble)
                secs = time.perf_counter() - start
            finally:
                undo()
            print(f"  {label:<26} {secs:>8.1f}  {tally_text(trouble.counts)} (trial {trial + 1})")


# ---------------------------------------------------------------------- 3. scaling


@dataclass
class Sampler:
    """pg_stat_activity and pg_locks every ``every`` seconds, on its own connection."""

    url: str
    every: float = 0.05
    samples: int = 0
    active: int = 0
    waits: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    ungranted: int = 0
    ungranted_max: int = 0
    empty_at: float | None = None
    start: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.is_set():
                rows = conn.execute(
                    "SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND backend_type = 'client backend'"
                ).fetchall()
                row = conn.execute(
                    "SELECT (SELECT count(*) FROM pg_locks WHERE NOT granted), "
                    "EXISTS (SELECT FROM autoembed.jobs)"
                ).fetchone()
                self.samples += 1
                for state, wtype, wevent in rows:
                    if state != "active":
                        continue
                    self.active += 1
                    if wtype is not None:
                        self.kinds[wtype] += 1
                        self.waits[f"{wtype}:{wevent}"] += 1
                if row is not None:
                    self.ungranted += int(row[0])
                    self.ungranted_max = max(self.ungranted_max, int(row[0]))
                    if not row[1] and self.empty_at is None:
                        self.empty_at = time.perf_counter()
                time.sleep(self.every)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()


@dataclass
class ScaleResult:
    workers: int
    rows: int
    seconds: float
    db_cpu: float
    worker_cpu: float
    sampler: Sampler
    trouble: Counter[str]

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def scale_run(url: str, workers: int, index: bool, rows: int) -> ScaleResult:
    texts = short_rows(rows)

    async def prepare() -> None:
        await load_items(url, texts, "now")
        if not index:
            async with await connect(url) as conn:
                cur = await conn.execute(
                    "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    "JOIN pg_am am ON am.oid = c.relam WHERE i.indrelid = 'items'::regclass "
                    "AND am.amname = 'hnsw'"
                )
                found = await cur.fetchone()
                assert found is not None
                await conn.execute(f'DROP INDEX "{found[0]}"')
            # index_state stays 'ready': nothing is built afterwards

    asyncio.run(prepare())
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE autoembed.jobs")
        conn.execute("VACUUM ANALYZE items")
    pm = postmaster(url)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "noop_worker.py"), url, "--gate"]
    if WAIT_FENCE:
        cmd.append("--wait-fence")
    logs = [ROOT / ".bench" / f"scale-worker-{i}.log" for i in range(workers)]
    procs = []
    for path in logs:
        with path.open("w") as err:  # the child keeps its own descriptor
            procs.append(
                subprocess.Popen(
                    cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
                )
            )
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        assert line == "ready", f"worker did not start: {line!r}"
    sampler = Sampler(url)
    cpu0 = db_cpu(pm)
    with sampler.running():
        start = sampler.start = time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        reports = []
        for p in procs:
            out, _ = p.communicate(timeout=900)
            reports.append(json.loads(out.strip().splitlines()[-1]))
        end = time.perf_counter()
    time.sleep(0.5)  # the backends of the workers end and are reaped by the postmaster
    cpu1 = db_cpu(pm)
    done = sum(int(r["rows"]) for r in reports)
    finish = sampler.empty_at if sampler.empty_at is not None else end
    trouble: Counter[str] = Counter()
    for path in logs:
        tally(path.read_text(), trouble)
    if done != rows:
        trouble["rows counted done"] = done  # more than the table holds: some done twice
    return ScaleResult(
        workers,
        rows,
        finish - start,
        cpu1 - cpu0,
        sum(float(r["cpu_seconds"]) for r in reports),
        sampler,
        trouble,
    )


def bench_scale(admin: str, counts: list[int], rows: int, index: bool) -> list[ScaleResult]:
    label = "with the HNSW index (written into it)" if index else "without the HNSW index"
    print(
        f"\nscaling: worker processes (benchmarks/noop_worker.py: no-op embedder, batch 512, "
        f"concurrency 2) draining a backfill of {rows:,} short rows {label}; one PostgreSQL "
        f"on the same {cores()} cores; {load_text()}"
    )
    print(
        f"  {'workers':>7} {'s':>6} {'rows/s':>8} {'DB CPU s':>8} {'DB ms/1k rows':>13} "
        f"{'worker CPU s':>12} {'active':>6} {'Lock':>5} {'LWLock':>6} {'ungranted':>9}  "
        "top waits (share of active backend samples)"
    )
    out = []
    for n in counts:
        url = asyncio.run(fresh_db(admin, "bench_scale"))
        r = scale_run(url, n, index, rows)
        s = r.sampler
        per = max(s.samples, 1)
        top = ", ".join(f"{w} {c / max(s.active, 1):.0%}" for w, c in s.waits.most_common(3))
        print(
            f"  {n:>7} {r.seconds:>6.1f} {r.rate:>8.0f} {r.db_cpu:>8.1f} "
            f"{r.db_cpu / r.rows * 1e6:>13.0f} {r.worker_cpu:>12.1f} "
            f"{s.active / per:>6.2f} {s.kinds['Lock'] / per:>5.2f} {s.kinds['LWLock'] / per:>6.2f} "
            f"{s.ungranted / per:>5.2f}/{s.ungranted_max:<3}  {top or '-'}"
        )
        if sum(r.trouble.values()):
            print(f"{'':>9}worker trouble (jobs): {tally_text(r.trouble)}")
        out.append(r)
    print(
        "  (active, Lock, LWLock: mean number of the workers' backends per sample that are "
        "active / waiting on a heavyweight lock / on a lightweight lock; ungranted: pg_locks "
        "rows not granted, mean/max; DB CPU: postmaster and children, includes the sampler's "
        f"own queries, {s.samples} samples in the last run)"
    )
    return out


def gpu_statement(no_index: list[ScaleResult], with_index: list[ScaleResult]) -> None:
    print("\nhow many GPU workers one PostgreSQL can feed (GPU: 4,244 passages/s, one H200):")
    for label, results in (("without the HNSW index", no_index), ("with it", with_index)):
        if not results:
            continue
        best = max(results, key=lambda r: r.rate)
        measured = [r.db_cpu / r.rows for r in results if r.db_cpu == r.db_cpu]  # not nan
        if not measured:
            print(f"  {label}: the database's CPU could not be read (not on this machine)")
            continue
        ms_per_row = min(measured) * 1000
        db_cores_per_gpu = GPU_RATE * ms_per_row / 1000
        print(
            f"  {label}: best measured {best.rate:,.0f} rows/s ({best.workers} workers) = "
            f"{best.rate / GPU_RATE:.2f} GPUs' worth on these 2 shared cores; the database spent "
            f"{ms_per_row:.3f} ms CPU per row at best, so one GPU's {GPU_RATE:,.0f} rows/s "
            f"need {GPU_RATE:,.0f} x {ms_per_row:.3f} ms = {db_cores_per_gpu:.2f} database "
            f"cores, and one database core feeds {1 / db_cores_per_gpu:.2f} GPU(s)"
        )


# ---------------------------------------------------------------------- main


async def main_async(args: argparse.Namespace, admin: str) -> None:
    if "backlog" not in args.skip:
        t0 = time.perf_counter()
        Embedder.load(MODEL, device="cpu")
        print(f"(loading {MODEL} in this process takes {time.perf_counter() - t0:.2f} s)")
        for kind in ("backfill", "fresh"):
            await bench_backlog(admin, args.backlog, kind, args.idle_probes)
    if "index" not in args.skip:
        await bench_index(admin, args.backfill)
    if args.fence_check:
        await fence_check(admin, args.fence_check)
    if args.trace_fresh:
        await trace_fresh(admin, args.trace_fresh)


def run_all(args: argparse.Namespace, admin: str) -> None:
    asyncio.run(main_async(args, admin))
    if "scale" not in args.skip:
        counts = [int(x) for x in args.workers.split(",")]
        plain = bench_scale(admin, counts, args.scale, index=False)
        indexed = bench_scale(admin, counts, args.scale_index, index=True)
        gpu_statement(plain, indexed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=3000)
    parser.add_argument("--idle-probes", type=int, default=20)
    parser.add_argument("--backfill", type=int, default=100_000)
    parser.add_argument("--scale", type=int, default=100_000, help="rows, without the index")
    parser.add_argument("--scale-index", type=int, default=20_000, help="rows, with the index")
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument(
        "--wait-fence",
        action="store_true",
        help="diagnostic: every worker's write fence waits instead of skipping (not as shipped)",
    )
    parser.add_argument(
        "--trace-fresh", type=int, default=0, metavar="N", help="diagnostic: see trace_fresh()"
    )
    parser.add_argument(
        "--fence-check", type=int, default=0, metavar="N", help="diagnostic: see fence_check()"
    )
    parser.add_argument("--skip", default="", help="comma-separated: backlog, index, scale")
    args = parser.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    if args.wait_fence:
        global WAIT_FENCE
        WAIT_FENCE = True
        use_waiting_fence()
    logging.basicConfig(level=logging.WARNING)
    print(
        f"{cores()} cores; {load_text()}"
        + ("; WRITE FENCE PATCHED TO WAIT (--wait-fence), not as shipped" if WAIT_FENCE else "")
    )
    with_server(lambda admin: run_all(args, admin))


if __name__ == "__main__":
    main()
