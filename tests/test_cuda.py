"""The CUDA path of the engine. Runs where onnxruntime-gpu sees a CUDA device; skips
elsewhere with the reason. Uses a gte-small-shaped model (gte-small's tokenizer and config,
builder-made weights), so it needs no model download."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from autoembed.engine import Embedder
from autoembed.engine.resolve import resolve

from .test_engine import REFERENCE, cosine, make_gte_dir

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
