"""Shared pieces of the benchmarks: the corpus, a gte-small-shaped model, the sgemm rate,
the database server."""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "worker" / "data" / "pgdocs.jsonl.gz"
GTE_FILES = ROOT / "tests" / "data" / "gte-small"


def passages(n: int) -> list[str]:
    out: list[str] = []
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["content"])
            if len(out) == n:
                break
    return out


def gte_shaped_dir(cache: Path, mask: str = "lengths") -> Path:
    """gte-small's tokenizer and config with builder-made weights: it costs what gte-small
    costs (same shape), in Supabase's ONNX layout. ``mask="raw"`` builds the graph as the
    builder did before attention took lengths (a 2-D mask), for comparisons."""
    from autoembed.engine.bert_onnx import BertConfig, build_bert, random_weights

    target = cache / ("gte-small-shaped" if mask == "lengths" else f"gte-small-shaped-{mask}")
    model = target / "onnx" / "model.onnx"
    if not model.is_file():
        (target / "onnx").mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "config.json"):
            (target / name).write_bytes((GTE_FILES / name).read_bytes())
        cfg = BertConfig.from_file(GTE_FILES / "config.json")
        graph = build_bert(cfg, random_weights(cfg, seed=0), fused=True, mask=mask)  # type: ignore[arg-type]
        onnx.save(graph, str(model))
    return target


def sgemm_gflops(seconds: float = 2.0) -> float:
    """numpy float32 matrix products at a BERT-like shape: the machine's practical ceiling."""
    a = np.random.default_rng(0).random((2048, 384), dtype=np.float32)
    b = np.random.default_rng(1).random((384, 1536), dtype=np.float32)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return n * 2 * 2048 * 384 * 1536 / (time.perf_counter() - start) / 1e9


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def with_server(fn: Callable[[str], None]) -> None:
    """``fn(admin_url)`` against $DATABASE_URL's server, or an embedded one started for it."""
    admin = os.environ.get("DATABASE_URL")
    if admin:
        fn(admin)
        return
    from autoembed.pgserver import EmbeddedPostgres

    with EmbeddedPostgres() as pg:
        fn(pg.url)
