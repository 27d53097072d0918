"""Engine throughput: texts/s and tokens/s on PostgreSQL documentation passages.

    python benchmarks/bench_engine.py                # CPU: MiniLM, gte-small shape; fp32, int8
    python benchmarks/bench_engine.py --device cuda  # GPU: gte-small shape; fp32, fp16; b32, b256

On CPU it also measures numpy's sgemm rate in the same run and prints the gte-small-shaped
model's FLOP rate against it; when sentence-transformers can be imported, it embeds the same
texts with it (same run, same threads) and prints the ratio and the cosine between the two.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--texts", type=int, default=1000, help="passages (default 1000)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = cpu(args) if args.device == "cpu" else cuda(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
