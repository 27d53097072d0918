"""The embedding engine, on a real model: vectors against sentence-transformers' own."""

from __future__ import annotations

import itertools
import json
import subprocess
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from autoembed.engine import Embedder
from autoembed.engine.bert_onnx import BertConfig, build_bert, load_safetensors, random_weights
from autoembed.engine.embedder import PAD_AHEAD, TOKENIZE_AHEAD
from autoembed.engine.resolve import inspect, resolve
from autoembed.engine.session import file_sha256
from autoembed.engine.tokenize import pad
from autoembed.errors import EmbeddingError, ModelError
from safetensors.numpy import save_file

from .conftest import AUTOEMBED, DATA, ROOT

REFERENCE = [
    json.loads(line) for line in (DATA / "all-minilm-l6-v2.jsonl").read_text().splitlines()
]
GTE = DATA / "gte-small"


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_minilm_matches_sentence_transformers(minilm: Embedder) -> None:
    texts = [r["text"] for r in REFERENCE]
    expected = np.array([r["embedding"] for r in REFERENCE], dtype=np.float32)
    got = minilm.embed(texts)
    assert got.shape == (64, 384) and got.dtype == np.float32
    cos = cosine(got, expected)
    worst = int(cos.argmin())
    assert cos.min() >= 0.9999, f"text {worst} ({texts[worst][:60]!r}) has cosine {cos[worst]}"
    # the texts past the model's 256 word pieces are among them, and were truncated
    long_ones = [i for i, t in enumerate(texts) if len(minilm.encode([t]).ids[0]) >= 256]
    assert len(long_ones) >= 2
    assert cos[long_ones].min() >= 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_order_batching_and_truncation_count(minilm: Embedder) -> None:
    texts = [r["text"] for r in REFERENCE]
    rng = np.random.default_rng(3)
    order = rng.permutation(len(texts))
    together = minilm.embed([texts[i] for i in order])
    alone = np.stack([minilm.embed([texts[i]])[0] for i in order[:8]])
    assert np.allclose(together[:8], alone, atol=1e-5)
    assert np.allclose(together, minilm.embed(texts)[order], atol=1e-5)
    detailed = minilm.embed_detailed(texts)
    over = sum(1 for t in texts if len(minilm.tokenizer._tok.encode(t).overflowing) > 0)
    assert detailed.truncated == over > 0
    assert detailed.tokens == int(minilm.encode(texts).lengths.sum())


def test_empty_inputs_and_options(minilm: Embedder) -> None:
    assert minilm.embed([]).shape == (0, 384)
    empty = minilm.embed([""])[0]  # [CLS] [SEP]: a valid, content-free unit vector
    assert np.isfinite(empty).all() and abs(np.linalg.norm(empty) - 1) < 1e-5
    raw = minilm.embed(["hello world"], normalize=False)[0]
    assert abs(np.linalg.norm(raw) - 1) > 1e-3
    assert np.allclose(raw / np.linalg.norm(raw), minilm.embed(["hello world"])[0], atol=1e-6)
    cls = minilm.embed(["hello world"], mean_pool=False)[0]
    assert cosine(cls, minilm.embed(["hello world"])[0]) < 0.999
    with pytest.raises(EmbeddingError, match="text 1 is int"):
        minilm.embed(["ok", 3])  # type: ignore[list-item]


def test_fused_graph_equals_plain_graph(minilm: Embedder) -> None:
    """The fused kernels (Attention, SkipLayerNorm, BiasGelu) change nothing measurable."""
    files = minilm.files
    assert files.safetensors is not None and files.config is not None
    cfg = BertConfig.from_file(files.config)
    plain = build_bert(cfg, load_safetensors(files.safetensors), fused=False)
    sess = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"])
    enc = minilm.encode([r["text"] for r in REFERENCE[:16]])
    from autoembed.engine.pooling import normalize
    from autoembed.engine.tokenize import pad

    def pool(hidden: np.ndarray, mask: np.ndarray, _how: str) -> np.ndarray:
        m = mask.astype(np.float32)[:, :, None]  # mean over the mask, as sentence-transformers
        return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)

    ids, mask = pad(enc.ids, np.arange(16), enc.lengths)
    expected = normalize(
        pool(sess.run(None, {"input_ids": ids, "attention_mask": mask})[0], mask, "mean")
    )
    assert cosine(minilm.embed_encoded(enc), expected).min() > 0.99999


def make_gte_dir(root: Path, fused: bool = False) -> Path:
    """gte-small's real tokenizer and config, in Supabase's ONNX layout, with weights made by
    the graph builder (any weights cost what the real ones cost)."""
    cfg = BertConfig.from_file(GTE / "config.json")
    (root / "onnx").mkdir(parents=True)
    for name in (
        "tokenizer.json",
        "config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        (root / name).write_bytes((GTE / name).read_bytes())
    onnx.save(
        build_bert(cfg, random_weights(cfg, seed=1), fused=fused), str(root / "onnx" / "model.onnx")
    )
    return root


def test_gte_small_layout(tmp_path: Path, cache_dir: Path) -> None:
    model_dir = make_gte_dir(tmp_path / "gte-small")
    files = inspect(model_dir, spec=None)
    assert files.onnx == model_dir / "onnx" / "model.onnx" and files.safetensors is None
    emb = Embedder(files, device="cpu")
    assert emb.dim == 384 and emb.pooling == "mean" and emb.max_tokens == 512
    texts = ["Luke, I am your father", "word " * 700]  # the second is cut at 512 tokens
    detailed = emb.embed_detailed(texts)
    assert detailed.vectors.shape == (2, 384) and detailed.truncated == 1
    # mean pooling over the mask, then L2 normalisation, checked against the raw graph
    sess = ort.InferenceSession(str(files.onnx), providers=["CPUExecutionProvider"])
    enc = emb.encode(texts[:1])
    ids = np.array(enc.ids, dtype=np.int64)
    hidden = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    mean = hidden[0].mean(axis=0)
    assert cosine(detailed.vectors[0], mean) > 0.99999
    assert abs(np.linalg.norm(detailed.vectors[0]) - 1) < 1e-5


def test_graph_rebuilt_when_weights_change(tmp_path: Path, minilm: Embedder) -> None:
    src = minilm.files.root
    model_dir = tmp_path / "mini"
    model_dir.mkdir()
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        (model_dir / name).write_bytes((src / name).read_bytes())
    first = Embedder.load(str(model_dir), device="cpu").embed(["a changed model"])[0]
    assert cosine(first, minilm.embed(["a changed model"])[0]) > 0.99999
    cfg = BertConfig.from_file(model_dir / "config.json")
    save_file(random_weights(cfg, seed=5), str(model_dir / "model.safetensors"))
    second = Embedder.load(str(model_dir), device="cpu").embed(["a changed model"])[0]
    assert cosine(first, second) < 0.99


def test_int8_per_channel_quality(minilm: Embedder, cache_dir: Path) -> None:
    int8 = Embedder(minilm.files, device="cpu", precision="int8")
    texts = [r["text"] for r in REFERENCE]
    cos = cosine(int8.embed(texts), minilm.embed(texts))
    # measured here: min 0.987, mean 0.995 (README); per-tensor int8 falls to 0.73
    assert cos.min() > 0.97 and cos.mean() > 0.99


def test_bad_models_are_refused_clearly(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(ModelError, match="unknown model 'no-such-model'.*gte-small"):
        resolve("no-such-model")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelError, match=r"lacks onnx/model.onnx or model.safetensors"):
        resolve(str(tmp_path / "half"))
    with pytest.raises(ModelError, match="fp16 needs --device cuda"):
        Embedder.load("all-minilm-l6-v2", device="cpu", precision="fp16")


# ---------------------------------------------------------------------------- CLI


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AUTOEMBED, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def vectors_of(stdout: str) -> list[list[float]]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_cli_embed(minilm: Embedder) -> None:
    common = ("--model", "all-minilm-l6-v2", "--device", "cpu")
    done = run_cli("embed", "Luke, I am your father", "second text", *common)
    assert done.returncode == 0, done.stderr
    got = vectors_of(done.stdout)
    assert len(got) == 2 and len(got[0]) == 384
    assert np.allclose(got, minilm.embed(["Luke, I am your father", "second text"]), atol=1e-6)

    piped = run_cli("embed", *common, stdin="Luke, I am your father\nsecond text\n")
    assert vectors_of(piped.stdout) == got
    jsonl = run_cli("embed", "--jsonl", *common, stdin=json.dumps("two\nlines") + "\n")
    assert np.allclose(vectors_of(jsonl.stdout), minilm.embed(["two\nlines"]), atol=1e-6)

    bad = run_cli("embed", "--jsonl", *common, stdin='"fine"\n{"not": "a string"}\n')
    assert bad.returncode == 2 and "line 2: expected a JSON string" in bad.stderr


def test_cli_models_and_help(cache_dir: Path) -> None:
    done = run_cli("models")
    assert done.returncode == 0
    assert "gte-small (default)" in done.stdout and "bge-small-en-v1.5" in done.stdout
    assert "all-minilm-l6-v2" in done.stdout
    helped = run_cli("--help")
    assert "autoembed watch documents --column content" in helped.stdout
    unknown = run_cli("embed", "x", "--model", "nope", "--device", "cpu")
    assert unknown.returncode == 3 and "unknown model 'nope'" in unknown.stderr


def test_pipeline_flops_estimate() -> None:
    cfg = BertConfig.from_file(GTE / "config.json")
    # 12 layers x (4h^2 + 2hi) multiply-adds: 42.5 MFLOP a token before attention
    assert abs(cfg.flops_per_token(0) - 42.47e6) < 0.01e6


# ---------------------------------------------------------------------------- builder refusals


def tiny_model_dir(
    root: Path, config: dict[str, object], prefix: str = "bert.", seed: int = 2
) -> Path:
    """A model directory with a small synthetic config and safetensors weights of its shape
    (gte-small's tokenizer, whose vocabulary sets the embedding rows)."""
    cfg = {
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "vocab_size": 30522,
        "max_position_embeddings": 64,
        **config,
    }
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(cfg))
    (root / "tokenizer.json").write_bytes((GTE / "tokenizer.json").read_bytes())
    weights = random_weights(BertConfig.from_dict(cfg), seed=seed)
    save_file({prefix + k: v for k, v in weights.items()}, str(root / "model.safetensors"))
    return root


def test_tiny_bert_builds_and_embeds(tmp_path: Path, cache_dir: Path) -> None:
    """The control for the refusals below: the same tiny fixture as BERT loads and embeds."""
    model = tiny_model_dir(tmp_path / "tiny-bert", {"model_type": "bert"})
    emb = Embedder.load(str(model), device="cpu")
    vectors = emb.embed(["a tiny model", "of sixteen dimensions"])
    assert vectors.shape == (2, 16) and np.isfinite(vectors).all()


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"model_type": "roberta", "pad_token_id": 1}, r"model_type 'roberta'.*padding_idx \+ 1"),
        ({"model_type": "xlm-roberta", "pad_token_id": 1}, r"'xlm-roberta'.*padding_idx \+ 1"),
        # an old config without model_type: its architectures name it
        ({"architectures": ["XLMRobertaModel"]}, r"'xlm-roberta'.*padding_idx \+ 1"),
        ({"model_type": "mpnet"}, r"model_type 'mpnet'.*relative position"),
        ({"model_type": "t5"}, r"model_type 't5' is not a BERT encoder"),
        ({"model_type": "bert", "position_embedding_type": "relative_key"}, r"relative_key"),
        ({"model_type": "bert", "hidden_act": "silu"}, r"hidden_act 'silu'"),
    ],
)
def test_builder_refuses_what_it_cannot_build_exactly(
    tmp_path: Path, cache_dir: Path, config: dict[str, object], match: str
) -> None:
    """RoBERTa-family models share BERT's weight names but count positions from
    padding_idx + 1: built as BERT they embed wrongly, so they are refused, with what the
    builder supports and what to do instead; so is every other non-BERT config."""
    prefix = "roberta." if "roberta" in json.dumps(config).lower() else "bert."
    seed = zlib.crc32(json.dumps(config).encode())  # weights of its own: a cache of its own
    model = tiny_model_dir(tmp_path / "model", config, prefix, seed)
    with pytest.raises(ModelError, match=match) as refused:
        Embedder.load(str(model), device="cpu")
    message = str(refused.value)
    assert str(model / "config.json") in message
    assert "onnx/model.onnx" in message or "export the model to ONNX" in message
    if "model_type" in message:
        assert "builds bert only" in message
    # refused before anything was built or cached
    assert not list(
        (cache_dir / "graphs").glob(f"{file_sha256(model / 'model.safetensors')[:24]}*")
    )
    with pytest.raises(ModelError, match=match):
        build_bert(
            BertConfig.from_file(model / "config.json"),
            load_safetensors(model / "model.safetensors"),
        )


def test_onnx_layout_of_a_roberta_model_is_not_refused(tmp_path: Path, cache_dir: Path) -> None:
    """An exported graph computes its own positions: a RoBERTa config beside onnx/model.onnx
    is fine (the refusal is the builder's alone)."""
    model = tiny_model_dir(tmp_path / "exported", {"model_type": "bert"})
    cfg = BertConfig.from_file(model / "config.json")
    (model / "onnx").mkdir()
    weights = load_safetensors(model / "model.safetensors")
    onnx.save(build_bert(cfg, weights, fused=False), str(model / "onnx" / "model.onnx"))
    (model / "model.safetensors").unlink()
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    assert Embedder.load(str(model), device="cpu").embed(["still embeds"]).shape == (1, 16)


# ---------------------------------------------------------------------------- pipelining


def test_pad_right_pads_rows_as_the_graph_expects() -> None:
    ids = [[101, 5, 6, 102], [101, 102], [101, 7, 102]]
    lengths = np.array([4, 2, 3], dtype=np.int64)
    input_ids, mask = pad(ids, np.array([2, 0, 1]), lengths)
    assert input_ids.tolist() == [[101, 7, 102, 0], [101, 5, 6, 102], [101, 102, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert input_ids.dtype == mask.dtype == np.int64
    # widths rounded up to a multiple, never past the cap nor below the longest row
    rounded, rmask = pad(ids, np.array([1, 2]), lengths, multiple=8)
    assert rounded.tolist() == [[101, 102, 0, 0, 0, 0, 0, 0], [101, 7, 102, 0, 0, 0, 0, 0]]
    assert rmask.sum(1).tolist() == [2, 3]
    assert pad(ids, np.array([0]), lengths, multiple=8, cap=6)[0].shape == (1, 6)
    assert pad(ids, np.array([0]), lengths, multiple=8, cap=3)[0].shape == (1, 4)


def test_rounded_batch_widths_give_the_same_vectors(minilm: Embedder) -> None:
    texts = [r["text"] for r in REFERENCE[:24]]
    rounded = Embedder(minilm.files, device="cpu")
    rounded.pad_multiple = 64  # MiniLM stops at 256 tokens: some batches hit the cap
    assert np.allclose(rounded.embed(texts), minilm.embed(texts), atol=1e-5)
    # the CPU keeps ONNX Runtime's per-shape memory plans (CUDA drops them: test_cuda.py)
    assert minilm.session.get_session_options().enable_mem_pattern is True


def test_lengths_mask_graph_equals_raw_mask_graph(minilm: Embedder) -> None:
    """Attention reading the mask as lengths (what CUDA's fused kernels need) computes what
    the 2-D mask computes, on right-padded batches of very different lengths."""
    files = minilm.files
    assert files.safetensors is not None and files.config is not None
    cfg = BertConfig.from_file(files.config)
    weights = load_safetensors(files.safetensors)
    enc = minilm.encode([r["text"] for r in REFERENCE[:12]] + ["short", ""])
    ids, mask = pad(enc.ids, np.arange(14), enc.lengths)
    assert mask.sum(1).min() < mask.shape[1] / 4  # much padding in some rows
    outs = []
    for kind in ("lengths", "raw"):
        model = build_bert(cfg, weights, mask=kind)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {"input_ids": ids, "attention_mask": mask})[0][mask == 1])
    assert cosine(outs[0], outs[1]).min() > 0.99999


def test_embed_many_yields_each_chunk_as_embed_would(minilm: Embedder) -> None:
    texts = [r["text"] for r in REFERENCE]
    chunks = [texts[:5], [], texts[5:40], ["hello world"], texts[40:]]
    before = minilm.stats.texts
    got = list(minilm.embed_many(iter(chunks)))
    assert [len(g) for g in got] == [len(c) for c in chunks]
    assert got[1].shape == (0, 384)
    for part, chunk in zip(got, chunks, strict=True):
        if chunk:
            assert np.allclose(part, minilm.embed(chunk), atol=1e-5)
    assert minilm.stats.texts - before == len(texts) + 1 + sum(len(c) for c in chunks)
    cls = next(minilm.embed_many([["hello world"]], mean_pool=False, normalize=False))
    assert np.allclose(cls, minilm.embed(["hello world"], mean_pool=False, normalize=False))


def prepare_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "autoembed-prepare" and t.is_alive()]


def test_embed_many_raises_in_turn_and_stops_its_thread(minilm: Embedder) -> None:
    stream = minilm.embed_many([["first"], ["second", 3], ["never"]])  # type: ignore[list-item]
    assert next(stream).shape == (1, 384)  # the chunks before the bad one come out
    with pytest.raises(EmbeddingError, match="text 1 is int"):
        next(stream)
    assert not prepare_threads()


def test_embed_many_reads_its_input_lazily_and_stops_when_closed(minilm: Embedder) -> None:
    """The helper thread reads only a bounded number of chunks ahead (here from an endless
    stream), and closing the generator stops it."""
    pulled = 0

    def endless() -> Iterator[list[str]]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield [f"text number {i}"]

    stream = minilm.embed_many(endless())
    for _ in range(3):
        assert next(stream).shape == (1, 384)
    stream.close()
    assert not prepare_threads()
    # one chunk is one batch here: 3 taken, and the two helper threads' queues, and one
    # chunk in the hands of each
    assert 3 <= pulled <= 3 + PAD_AHEAD + TOKENIZE_AHEAD + 2


def test_inference_errors_reach_the_caller_of_each_path(minilm: Embedder) -> None:
    broken = Embedder(minilm.files, device="cpu")
    broken.session = None  # any call into it fails as a broken session would
    with pytest.raises(EmbeddingError, match="inference failed"):
        broken.embed(["x"])
    with pytest.raises(EmbeddingError, match="inference failed"):
        list(broken.embed_many([["x"], ["y"]]))
    assert not prepare_threads()


def test_cuda_host_pipeline_on_cpu_gives_the_same_vectors(minilm: Embedder) -> None:
    """The host side of the CUDA path (a long list tokenized in chunks while earlier chunks
    run, batches padded ahead in a helper thread), run here over the CPU session."""
    emb = Embedder(minilm.files, device="cpu", max_batch=4)
    emb.device = "cuda"  # only the pipeline's choices; the session stays on the CPU
    texts = [r["text"] for r in REFERENCE]
    assert len(texts) > 4 * emb.max_batch
    assert np.allclose(emb.embed(texts), minilm.embed(texts), atol=1e-5)
    enc = emb.encode(texts[:20])
    assert np.allclose(emb.embed_encoded(enc), minilm.embed(texts[:20]), atol=1e-5)
    assert not prepare_threads()
