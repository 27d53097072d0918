"""The CUDA path of the engine. Runs where onnxruntime-gpu sees a CUDA device; skips
elsewhere with the reason. Uses gte-small-shaped models (gte-small's tokenizer and config,
builder-made weights), so it needs no model download: in the ONNX layout (an exported graph
fused by onnxruntime) and in the safetensors layout (the graph builder's, whose attention
takes the mask as lengths)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from autoembed.engine import Embedder
from autoembed.engine.bert_onnx import BertConfig, random_weights
from autoembed.engine.resolve import resolve
from safetensors.numpy import save_file

from .test_engine import GTE, REFERENCE, cosine, make_gte_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="needs onnxruntime-gpu and a CUDA device; this machine has "
        + ", ".join(ort.get_available_providers()),
    ),
]


@pytest.fixture(scope="module")
def gte_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gte_dir(tmp_path_factory.mktemp("gte") / "gte-small", fused=False)


def test_cuda_fp32_and_fp16_match_cpu(gte_dir: Path, cache_dir: Path) -> None:
    files = resolve(str(gte_dir))
    texts = [r["text"] for r in REFERENCE]
    cpu = Embedder(files, device="cpu").embed(texts)
    cuda = Embedder(files, device="cuda")
    assert cuda.device == "cuda"
    assert cuda.session.get_providers()[0] == "CUDAExecutionProvider"
    assert cosine(cuda.embed(texts), cpu).min() > 0.9999
    half = Embedder(files, device="cuda", precision="fp16")
    c16 = cosine(half.embed(texts), cpu)
    assert c16.min() > 0.999, f"fp16 cosine to fp32 fell to {c16.min()}"
    # auto picks CUDA when it is there
    assert Embedder(files, device="auto").device == "cuda"
    print(json.dumps({"fp16_cos_min": float(c16.min()), "fp16_cos_mean": float(np.mean(c16))}))


@pytest.fixture(scope="module")
def gte_safetensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gte-st") / "gte-small"
    root.mkdir()
    for name in ("tokenizer.json", "config.json"):
        (root / name).write_bytes((GTE / name).read_bytes())
    cfg = BertConfig.from_file(GTE / "config.json")
    save_file(random_weights(cfg, seed=3), str(root / "model.safetensors"))
    return root


def test_pipelined_cuda_paths_match_cpu(gte_safetensors: Path, cache_dir: Path) -> None:
    """The builder's graph on CUDA, fp32 and fp16, through every path: one call, a long list
    (tokenized in chunks while earlier chunks run), and embed_many."""
    files = resolve(str(gte_safetensors))
    texts = [r["text"] for r in REFERENCE] + ["", "short"]
    cpu = Embedder(files, device="cpu").embed(texts)
    for precision in ("fp32", "fp16"):
        small = Embedder(files, device="cuda", precision=precision, max_batch=4)
        assert len(texts) > 4 * small.max_batch  # embed() goes through chunks
        chunked = small.embed(texts)
        assert chunked.shape == cpu.shape
        assert cosine(chunked, cpu).min() >= 0.9999, precision
        emb = Embedder(files, device="cuda", precision=precision)
        # batch shapes change with every batch: no per-shape allocation plans on the device
        assert emb.session.get_session_options().enable_mem_pattern is False
        assert cosine(emb.embed(texts), cpu).min() >= 0.9999, precision
        parts = list(emb.embed_many([texts[:10], [], texts[10:]]))
        assert [len(p) for p in parts] == [10, 0, len(texts) - 10]
        assert cosine(np.concatenate(parts), cpu).min() >= 0.9999, precision
        print(precision, "cosine min", float(cosine(chunked, cpu).min()))
