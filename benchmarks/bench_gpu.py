"""The GPU pipeline, measured piece by piece in one run (gte-small shape, as
``bench_engine.py --device cuda``):

    python benchmarks/bench_gpu.py --texts 2000 [--skip-breakdown] --json gpu.json

For each precision and batch size: ``embed(texts)`` steady state (median of 3 passes after a
first pass over the same texts), its first pass, ``embed_many`` over 256-text chunks of the
texts sorted by characters, and the cosine to CPU fp32 on every 8th text. Then, at the
last precision, as the worker feeds the engine (a claim sorted by characters, 64-text
chunks, the engine's default batch limits): ``embed_many`` with batch widths rounded to 16
tokens (the CUDA default) and unrounded, and the previous loop on the previous graph, each
on the benchmark texts, on texts it has never seen (new batch shapes) and on those again.
Unless skipped, where the time goes for the largest batch: tokenizing alone, padding alone,
the device alone (pre-padded batches through ``session.run``, and through IO binding with
inputs and outputs left on the device), and the previous sequential loop (tokenize all,
then pad and run batch by batch) on this graph. ``--device cpu`` runs the same on CPU (a
dry run of the script, not a GPU figure).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoembed.engine import Embedder
from autoembed.engine.pooling import normalize as l2_normalize
from autoembed.engine.resolve import resolve
from autoembed.engine.session import POOLED
from autoembed.engine.tokenize import Encoded, pad, token_budget_batches

from benchmarks.common import gte_shaped_dir, passages

REPEATS = 3


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def timed(fn: Callable[[], Any], repeats: int = REPEATS) -> tuple[float, float, Any]:
    """(first pass seconds, median of the next ``repeats`` passes, last result)."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - start)
    return first, statistics.median(runs), out


def pad_loop(enc: Encoded, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The previous ``pad``: row by row."""
    width = int(enc.lengths[index].max())
    input_ids = np.zeros((len(index), width), dtype=np.int64)
    mask = np.zeros((len(index), width), dtype=np.int64)
    for row, i in enumerate(index):
        seq = enc.ids[i]
        input_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return input_ids, mask


def sequential(emb: Embedder, texts: list[str]) -> np.ndarray:
    """The previous ``embed``: tokenize everything, then pad, run and normalise batch after
    batch in one thread."""
    enc = emb.encode(texts)
    out: np.ndarray | None = None
    for index in token_budget_batches(enc.lengths, emb.token_budget, emb.max_batch):
        ids, mask = pad_loop(enc, index)
        vectors = l2_normalize(emb._run(ids, mask, "mean"))
        if out is None:
            out = np.empty((len(texts), vectors.shape[1]), np.float32)
        out[index] = vectors
    assert out is not None
    return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        everything = passages(args.texts + 3 * args.unseen)
        self.texts = everything[: args.texts]
        # texts no pass has seen yet (new batch shapes), args.unseen for each use
        self.unseen = [
            everything[args.texts + k * args.unseen : args.texts + (k + 1) * args.unseen]
            for k in range(3)
        ]
        self.rows: list[dict[str, Any]] = []
        self.tokens = 0

    def row(self, label: str, seconds: float, n: int = 0, tokens: int = 0, **extra: Any) -> None:
        n, tokens = n or len(self.texts), tokens or self.tokens
        extra = {k: float(v) if isinstance(v, np.floating) else v for k, v in extra.items()}
        note = " ".join(
            f"{k} {v:.5f}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items()
        )
        print(
            f"{label:<46} {n / seconds:9.1f} texts/s {tokens / seconds:10.0f} tokens/s  {note}",
            flush=True,
        )
        self.rows.append(
            {"what": label, "texts": n, "texts_per_s": n / seconds, "seconds": seconds, **extra}
        )

    def section(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # one broken section must not cost the others (device time)
            print(f"!! {name} failed:\n{traceback.format_exc()}", flush=True)
            self.rows.append({"what": name, "error": traceback.format_exc()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batches", default="32,256", help="batch sizes (default 32,256)")
    parser.add_argument("--unseen", type=int, default=900, help="texts per unseen set")
    parser.add_argument("--skip-breakdown", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    b = Bench(args)
    texts = b.texts
    device = args.device
    precisions = ["fp32", "fp16"] if device == "cuda" else ["fp32"]
    sizes = [int(x) for x in args.batches.split(",")]
    big = max(sizes)
    with tempfile.TemporaryDirectory() as tmp:
        files = resolve(str(gte_shaped_dir(Path(tmp))))
        raw_files = resolve(str(gte_shaped_dir(Path(tmp), mask="raw")))
        sample = texts[::8]
        start = time.perf_counter()
        cpu = Embedder(files, device="cpu")
        reference = cpu.embed(sample)
        print(f"CPU fp32 reference of {len(sample)} texts: {time.perf_counter() - start:.1f}s")
        b.tokens = cpu.encode(texts).total_tokens
        del cpu
        print(f"{len(texts)} passages, {b.tokens} tokens")

        def load(
            precision: str, batch: int, model: Any = files, threads: int | None = None
        ) -> Embedder:
            return Embedder(
                model,
                device=device,
                precision=precision,  # type: ignore[arg-type]
                threads=threads,
                token_budget=batch * 512,
                max_batch=batch,
            )

        # the worker sorts a claim by characters, longest first, and embeds it in chunks
        order = np.argsort(-np.array([len(t) for t in texts]), kind="stable")
        chunks = [[texts[i] for i in order[s : s + 256]] for s in range(0, len(texts), 256)]

        def many(emb: Embedder) -> np.ndarray:
            out = np.empty((len(texts), emb.dim), np.float32)
            out[order] = np.concatenate(list(emb.embed_many(chunks)))
            return out

        def config(precision: str, batch: int) -> None:
            emb = load(precision, batch)
            first, secs, vecs = timed(lambda: emb.embed(texts))
            c = cosine_rows(vecs[::8], reference)
            tag = f"{precision} b{batch}"
            b.row(f"embed {tag}", secs, first_pass=round(len(texts) / first), cos_min=c.min())
            _, secs, vecs = timed(lambda: many(emb))
            c = cosine_rows(vecs[::8], reference)
            b.row(f"embed_many(sorted 256-text chunks) {tag}", secs, cos_min=c.min())

        for precision in precisions:
            for batch in sizes:
                b.section(f"{precision} b{batch}", lambda p=precision, s=batch: config(p, s))

        precision = precisions[-1]
        tag = f"{precision} b{big}"

        def breakdown() -> None:
            emb = load(precision, big)
            _, secs, enc = timed(lambda: emb.encode(texts))
            b.row(f"  tokenize alone ({tag})", secs)
            batches = token_budget_batches(enc.lengths, emb.token_budget, emb.max_batch)
            _, secs, padded = timed(lambda: [pad(enc.ids, i, enc.lengths) for i in batches])
            b.row(f"  pad alone ({tag}, {len(batches)} batches)", secs)
            _, secs, _ = timed(lambda: [pad_loop(enc, i) for i in batches])
            b.row(f"  previous row-by-row pad alone ({tag})", secs)
            out = POOLED["mean"]

            def run_all() -> None:
                for ids, mask in padded:
                    emb.session.run([out], {"input_ids": ids, "attention_mask": mask})

            _, secs, _ = timed(run_all)
            b.row(f"  session.run alone, numpy in/out ({tag})", secs)
            if device == "cuda":
                import onnxruntime as ort

                bound = []
                for ids, mask in padded:
                    io = emb.session.io_binding()
                    for name, arr in (("input_ids", ids), ("attention_mask", mask)):
                        io.bind_ortvalue_input(
                            name, ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0)
                        )
                    io.bind_output(out, "cuda")
                    bound.append(io)

                def run_bound() -> None:
                    for io in bound:
                        emb.session.run_with_iobinding(io)

                _, secs, _ = timed(run_bound)
                b.row(f"  device alone, IO binding on the GPU ({tag})", secs)
            _, secs, vecs = timed(lambda: sequential(emb, texts))
            c = cosine_rows(vecs[::8], reference)
            b.row(f"  previous sequential loop, this graph ({tag})", secs, cos_min=c.min())

        def by64(what: list[str]) -> list[list[str]]:
            """The worker's feed: a claim sorted by characters, in 64-text chunks."""
            ranked = sorted(what, key=len, reverse=True)
            return [ranked[s : s + 64] for s in range(0, len(ranked), 64)]

        def worker_like(k: int, label: str, emb: Embedder, run: Any = None) -> None:
            """Warm on the benchmark texts, then the same on texts never embedded (new
            batch widths, as a worker meets them), then those again."""
            run = run or (lambda chunks: list(emb.embed_many(chunks)))
            for _ in range(2):
                run(by64(texts))
            _, secs, _ = timed(lambda: run(by64(texts)))
            b.row(f"  {label}: sorted 64-text chunks", secs)
            what = b.unseen[k]
            tokens = emb.encode(what).total_tokens
            start = time.perf_counter()
            run(by64(what))
            cold = time.perf_counter() - start
            start = time.perf_counter()
            run(by64(what))
            warm = time.perf_counter() - start
            b.row(f"  {label}: unseen texts", cold, n=len(what), tokens=tokens)
            b.row(f"  {label}: same texts again", warm, n=len(what), tokens=tokens)

        def variants() -> None:
            for k, multiple in enumerate((16, 1)):
                emb = Embedder(files, device=device, precision=precision)  # type: ignore[arg-type]
                emb.pad_multiple = multiple
                label = (
                    f"embed_many, engine defaults (b{emb.max_batch}, {emb.token_budget} "
                    f"tokens), widths to {multiple}, {precision}"
                )
                worker_like(k, label, emb)

        def previous() -> None:
            emb = load(precision, big, raw_files)
            _, secs, vecs = timed(lambda: sequential(emb, texts))
            c = cosine_rows(vecs[::8], reference)
            b.row(f"  previous loop, previous graph (2-D mask) ({tag})", secs, cos_min=c.min())
            emb = Embedder(raw_files, device=device, precision=precision)  # type: ignore[arg-type]
            label = f"previous loop per chunk, previous graph, defaults, {precision}"
            worker_like(2, label, emb, lambda chunks: [sequential(emb, c) for c in chunks])

        print("as the worker feeds it:")
        b.section("variants", variants)
        b.section("previous", previous)
        if not args.skip_breakdown:
            print(f"where the time goes, {tag}:")
            b.section("breakdown", breakdown)
    if args.json:
        args.json.write_text(json.dumps(b.rows, indent=2))


if __name__ == "__main__":
    main()
