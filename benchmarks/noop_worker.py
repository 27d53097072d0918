"""One worker process with the no-op embedder, for benchmarks/bench_backlog.py's scaling
table (``autoembed run`` always loads a real model).

    python benchmarks/noop_worker.py URL [--batch-size 512] [--concurrency 2] [--gate]
                                         [--distinct] [--wait-fence]

Runs ``Worker(..., drain=True, embedder_factory=NoOp)`` until the queue is empty and prints
one JSON line: rows done, seconds, CPU seconds of this process. With ``--gate`` it imports
and connects first, prints ``ready``, and starts when a line arrives on standard input, so
that several processes can start together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoembed.runner import Worker

from benchmarks.bench_worker import NoOp, settings, use_waiting_fence


async def main_async(args: argparse.Namespace) -> dict[str, float | int]:
    if args.wait_fence:
        use_waiting_fence()
    emb = NoOp(distinct=args.distinct)
    worker = Worker(
        settings(args.url, batch_size=args.batch_size, concurrency=args.concurrency),
        drain=True,
        progress=False,
        embedder_factory=lambda _n: emb,
    )
    if args.gate:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
    start = time.perf_counter()
    code = await worker.run()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "rows": worker.done_rows,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "exit": code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--distinct", action="store_true", help="no two rows share a vector")
    parser.add_argument("--gate", action="store_true", help="wait for a line on stdin to start")
    parser.add_argument(
        "--wait-fence", action="store_true", help="diagnostic: bench_worker.use_waiting_fence"
    )
    parser.add_argument("--log-level", default="WARNING", help="diagnostic: e.g. INFO, DEBUG")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    print(json.dumps(asyncio.run(main_async(args))), flush=True)


if __name__ == "__main__":
    main()
