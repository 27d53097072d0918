"""Engine throughput: texts/s and tokens/s on PostgreSQL documentation passages.

    python benchmarks/bench_engine.py                # CPU: MiniLM, gte-small shape; fp32, int8
    python benchmarks/bench_engine.py --device cuda  # GPU: gte-small shape; fp32, fp16; b32, b256
    python benchmarks/bench_engine.py --ab           # CPU: previous graph and padding vs these

On CPU it also measures numpy's sgemm rate in the same run and prints the gte-small-shaped
model's FLOP rate against it; when sentence-transformers can be imported, it embeds the same
texts with it (same run, same threads) and prints the ratio and the cosine between the two.

``--ab`` is for CPU regressions on a busy machine: the engine's batches of the same texts
through the previous form of the graph (attention given a 2-D mask) with the previous
row-by-row padding, and through this engine's graph and padding, alternating A and B for
several rounds in one process, so that both meet the same load; it prints the medians.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoembed.engine import Embedder
from autoembed.engine.bert_onnx import BertConfig
from autoembed.engine.resolve import resolve

from benchmarks.common import cores, gte_shaped_dir, passages, sgemm_gflops


def timed(emb: Embedder, texts: list[str]) -> tuple[float, np.ndarray]:
    emb.embed(texts[:16])  # warm-up
    start = time.perf_counter()
    vectors = emb.embed(texts)
    return time.perf_counter() - start, vectors


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def report(label: str, n: int, tokens: int, seconds: float, extra: str = "") -> dict[str, Any]:
    row = {"model": label, "texts_per_s": n / seconds, "tokens_per_s": tokens / seconds}
    print(f"{label:<34} {n / seconds:8.1f} texts/s {tokens / seconds:9.0f} tokens/s  {extra}")
    return row


def cpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    texts = passages(args.texts)
    results = []
    ceiling = sgemm_gflops()
    print(f"{cores()} cores; numpy sgemm {ceiling:.0f} GFLOP/s; {len(texts)} passages")

    minilm_files = resolve("all-minilm-l6-v2")
    mini = Embedder(minilm_files, device="cpu")
    enc = mini.encode(texts)
    print(
        f"all-MiniLM-L6-v2: mean {enc.lengths.mean():.1f} tokens a text "
        f"({enc.truncated} cut at {mini.max_tokens})"
    )
    secs, mini_vecs = timed(mini, texts)
    results.append(report("all-minilm-l6-v2 fp32", len(texts), enc.total_tokens, secs))
    mini8 = Embedder(minilm_files, device="cpu", precision="int8")
    secs8, mini8_vecs = timed(mini8, texts)
    c = cosine_rows(mini8_vecs, mini_vecs)
    results.append(
        report(
            "all-minilm-l6-v2 int8",
            len(texts),
            enc.total_tokens,
            secs8,
            f"cosine to fp32: min {c.min():.4f} mean {c.mean():.4f}",
        )
    )

    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("sentence-transformers not importable: `make bench-deps` installs it for the ratio")
    else:
        st = SentenceTransformer(str(minilm_files.root), device="cpu")
        st.encode(texts[:16])
        start = time.perf_counter()
        st_vecs = st.encode(texts, batch_size=32, normalize_embeddings=True)
        st_secs = time.perf_counter() - start
        c = cosine_rows(mini_vecs, st_vecs)
        results.append(
            report(
                f"sentence-transformers (torch {torch.__version__})",
                len(texts),
                enc.total_tokens,
                st_secs,
            )
        )
        print(
            f"  autoembed fp32 / sentence-transformers: {st_secs / secs:.2f}x; "
            f"cosine min {c.min():.6f}"
        )
        results[-1]["ratio"] = st_secs / secs

    with tempfile.TemporaryDirectory() as tmp:
        gte_dir = gte_shaped_dir(Path(tmp))
        cfg = BertConfig.from_file(gte_dir / "config.json")
        gte = Embedder.load(str(gte_dir), device="cpu")
        genc = gte.encode(texts)
        secs, gte_vecs = timed(gte, texts)
        # FLOPs from the config at each text's own length (no padding counted)
        flops = sum(cfg.flops_per_token(float(n)) * float(n) for n in genc.lengths)
        rate = flops / secs / 1e9
        results.append(
            report(
                "gte-small shape fp32",
                len(texts),
                genc.total_tokens,
                secs,
                f"{rate:.0f} GFLOP/s = {100 * rate / ceiling:.0f}% of sgemm",
            )
        )
        print(
            f"  gte-small: mean {genc.lengths.mean():.1f} tokens; "
            f"{cfg.flops_per_token(float(genc.lengths.mean())) / 1e6:.1f} MFLOP a token"
        )
        gte8 = Embedder.load(str(gte_dir), device="cpu", precision="int8")
        secs8, gte8_vecs = timed(gte8, texts)
        c = cosine_rows(gte8_vecs, gte_vecs)
        results.append(
            report(
                "gte-small shape int8",
                len(texts),
                genc.total_tokens,
                secs8,
                f"cosine to fp32 (random weights): min {c.min():.4f}",
            )
        )
    return results


def cuda(args: argparse.Namespace) -> list[dict[str, Any]]:
    texts = passages(args.texts)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        gte_dir = gte_shaped_dir(Path(tmp))
        files = resolve(str(gte_dir))
        base = Embedder(files, device="cpu")
        reference = base.embed(texts[:256])
        for precision in ("fp32", "fp16"):
            for batch in (32, 256):
                emb = Embedder(
                    files,
                    device="cuda",
                    precision=precision,  # type: ignore[arg-type]
                    token_budget=batch * 512,
                    max_batch=batch,
                )
                enc = emb.encode(texts)
                start = time.perf_counter()
                emb.embed(texts)  # first pass: each new batch shape sets up its kernels
                first = time.perf_counter() - start
                start = time.perf_counter()
                vecs = emb.embed(texts)  # steady state, as in a long-running worker
                secs = time.perf_counter() - start
                c = cosine_rows(vecs[:256], reference)
                row = report(
                    f"gte-small shape {precision} b{batch}",
                    len(texts),
                    enc.total_tokens,
                    secs,
                    f"(first pass {len(texts) / first:.0f} texts/s); "
                    f"cosine to CPU fp32: min {c.min():.5f}",
                )
                row.update(
                    precision=precision,
                    batch=batch,
                    cos_min=float(c.min()),
                    first_pass_texts_per_s=len(texts) / first,
                )
                results.append(row)
    return results


def ab(args: argparse.Namespace) -> None:
    import statistics

    from autoembed.engine.bert_onnx import build_bert, load_safetensors, random_weights
    from autoembed.engine.session import POOLED, add_pooling, create_session
    from autoembed.engine.tokenize import pad, token_budget_batches

    def pad_loop(ids: list[list[int]], index: np.ndarray, lengths: np.ndarray) -> Any:
        width = int(lengths[index].max())
        input_ids = np.zeros((len(index), width), dtype=np.int64)
        mask = np.zeros((len(index), width), dtype=np.int64)
        for row, i in enumerate(index):
            input_ids[row, : len(ids[i])] = ids[i]
            mask[row, : len(ids[i])] = 1
        return input_ids, mask

    texts = passages(args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        minilm = resolve("all-minilm-l6-v2")
        assert minilm.safetensors is not None and minilm.config is not None
        gte = BertConfig.from_file(gte_shaped_dir(Path(tmp)) / "config.json")
        models = [
            ("all-minilm-l6-v2", minilm, BertConfig.from_file(minilm.config), None),
            ("gte-small shape", resolve(str(gte_shaped_dir(Path(tmp)))), gte, 0),
        ]
        for label, files, cfg, seed in models:
            weights = (
                load_safetensors(files.safetensors)  # type: ignore[arg-type]
                if seed is None
                else random_weights(cfg, seed=seed)
            )
            emb = Embedder(files, device="cpu")
            enc = emb.encode(texts)
            batches = token_budget_batches(enc.lengths, emb.token_budget, emb.max_batch)
            runs = {}
            for name, mask, padder in (("A previous", "raw", pad_loop), ("B now", "lengths", pad)):
                path = Path(tmp) / f"{label}-{mask}.onnx"
                onnx.save(add_pooling(build_bert(cfg, weights, mask=mask)), str(path))  # type: ignore[arg-type]
                runs[name] = (create_session(path, "cpu", None), padder)
            times: dict[str, list[float]] = {name: [] for name in runs}
            outs: dict[str, np.ndarray] = {}
            for r in range(args.rounds):
                for name in sorted(runs, reverse=r % 2 == 1):
                    session, padder = runs[name]
                    start = time.perf_counter()
                    vecs = []
                    for index in batches:
                        ids, mask = padder(enc.ids, index, enc.lengths)
                        feeds = {"input_ids": ids, "attention_mask": mask}
                        vecs.append(session.run([POOLED[emb.pooling]], feeds)[0])
                    times[name].append(time.perf_counter() - start)
                    outs[name] = np.concatenate(vecs)
            med = {name: statistics.median(t) for name, t in times.items()}
            c = cosine_rows(outs["A previous"], outs["B now"])
            for name, m in med.items():
                report(f"{label} fp32 {name}", len(texts), enc.total_tokens, m)
            print(
                f"  B/A {med['A previous'] / med['B now']:.3f} (median of {args.rounds} "
                f"alternating rounds; per round A {[round(t, 2) for t in times['A previous']]}, "
                f"B {[round(t, 2) for t in times['B now']]}); cosine A-B min {c.min():.6f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--texts", type=int, default=1000, help="passages (default 1000)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--ab", action="store_true", help="CPU: previous graph vs this one")
    parser.add_argument("--rounds", type=int, default=5, help="--ab rounds (default 5)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.ab:
        ab(args)
        return
    results = cpu(args) if args.device == "cpu" else cuda(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
