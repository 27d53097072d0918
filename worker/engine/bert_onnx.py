"""Build an ONNX graph for a BERT-family encoder from its weights, with no torch.

The graph takes ``input_ids`` and ``attention_mask`` (int64, batch x sequence) and returns
``last_hidden_state`` (float32, batch x sequence x hidden). Pooling happens outside.

Two forms:

* ``fused=True`` (what the engine runs): ONNX Runtime's contrib kernels ``Attention``,
  ``SkipLayerNormalization`` and ``BiasGelu`` (domain ``com.microsoft``), one kernel per
  block instead of a dozen small ones. The arithmetic is the same as the plain form; the
  tests check the vectors against sentence-transformers' to a cosine of 0.9999. Attention
  gets the mask as one length per text (``mask="lengths"``, what ONNX Runtime's own BERT
  optimizer emits): on CUDA that selects the fused fp16 attention kernels, where a 2-D mask
  (``mask="raw"``) materialises every head's scores. Lengths need right-padded rows (ones,
  then zeros), which is what the engine's ``pad`` makes.
* ``fused=False``: standard ONNX operators only, the shape of a PyTorch export (what
  ``onnx/model.onnx`` of Supabase/gte-small looks like). Used to build test fixtures for the
  ONNX-directory path and as a cross-check of the fused form.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError

OPSET = 17
MS_DOMAIN = "com.microsoft"

#: what the builder builds: BERT, positions 0..n-1 (all-MiniLM, gte, bge, e5 are these)
BUILDABLE_TYPES = ("bert",)
#: encoders that share BERT's weight names but not its arithmetic, and why
REFUSED_TYPES = {
    "roberta": "RoBERTa counts position ids from padding_idx + 1, not 0",
    "xlm-roberta": "XLM-RoBERTa counts position ids from padding_idx + 1, not 0",
    "camembert": "CamemBERT (RoBERTa) counts position ids from padding_idx + 1, not 0",
    "distilbert": "DistilBERT has other weight names and no token types",
    "mpnet": "MPNet uses relative position buckets",
    "deberta": "DeBERTa uses disentangled relative attention",
    "deberta-v2": "DeBERTa uses disentangled relative attention",
    "electra": "ELECTRA may project its embeddings to another width",
    "nomic_bert": "nomic-bert uses rotary positions and SwiGLU",
}
ACTIVATIONS = {"gelu", "gelu_new", "gelu_pytorch_tanh", "relu"}


def _model_type(raw: Mapping[str, object]) -> str:
    """``model_type``, or for an old config without one, what ``architectures`` says."""
    if "model_type" in raw:
        return str(raw["model_type"]).lower()
    archs = raw.get("architectures")
    if isinstance(archs, list) and archs:
        name = str(archs[0]).lower()
        for t in sorted(REFUSED_TYPES, key=len, reverse=True):
            if name.startswith(t.replace("-", "")):
                return t
        if not name.startswith("bert"):
            return name
    return "bert"


@dataclass(frozen=True)
class BertConfig:
    """The part of a Hugging Face ``config.json`` that shapes a BERT encoder."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    model_type: str = "bert"
    position_embedding_type: str = "absolute"
    source: str = "config"

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read model config {path}: {exc}") from exc
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Mapping[str, object], source: str = "config") -> BertConfig:
        """The encoder's shape from a config. Whether the graph builder can build it is a
        separate question: see :meth:`check_buildable`."""
        try:
            return cls(
                hidden_size=int(raw["hidden_size"]),  # type: ignore[call-overload]
                num_hidden_layers=int(raw["num_hidden_layers"]),  # type: ignore[call-overload]
                num_attention_heads=int(raw["num_attention_heads"]),  # type: ignore[call-overload]
                intermediate_size=int(raw["intermediate_size"]),  # type: ignore[call-overload]
                vocab_size=int(raw["vocab_size"]),  # type: ignore[call-overload]
                max_position_embeddings=int(raw.get("max_position_embeddings", 512)),  # type: ignore[call-overload]
                type_vocab_size=int(raw.get("type_vocab_size", 2)),  # type: ignore[call-overload]
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),  # type: ignore[arg-type]
                hidden_act=str(raw.get("hidden_act", "gelu")),
                model_type=_model_type(raw),
                position_embedding_type=str(raw.get("position_embedding_type", "absolute")),
                source=source,
            )
        except KeyError as exc:
            raise ModelError(f"{source}: missing {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{source}: {exc}") from exc

    def check_buildable(self) -> None:
        """Raise :class:`ModelError` unless the graph builder computes exactly what this
        model computes: a BERT encoder (``model_type`` ``bert``) with absolute positions
        counted from 0 and a GELU or ReLU feed-forward.

        RoBERTa and XLM-RoBERTa look the same weight for weight but count positions from
        ``padding_idx + 1``, so the builder would embed them wrongly (issue 10.11
        reports cosines as low as 0.61 to the reference): they are refused, with what to
        do instead."""
        where = f"{self.source}: "
        if self.model_type in REFUSED_TYPES:
            raise ModelError(
                f"{where}model_type {self.model_type!r} is not supported by the safetensors "
                f"graph builder: {REFUSED_TYPES[self.model_type]}. It builds "
                f"{', '.join(BUILDABLE_TYPES)} only; for this model, export it to ONNX "
                "(onnx/model.onnx in the model directory, as optimum or torch.onnx write it)"
            )
        if self.model_type not in BUILDABLE_TYPES:
            raise ModelError(
                f"{where}model_type {self.model_type!r} is not a BERT encoder: the safetensors "
                f"graph builder builds {', '.join(BUILDABLE_TYPES)} only; export the model "
                "to ONNX (onnx/model.onnx in the model directory) instead"
            )
        if self.position_embedding_type != "absolute":
            raise ModelError(
                f"{where}position_embedding_type {self.position_embedding_type!r} is not "
                "supported by the graph builder (absolute only); export the model to ONNX"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ModelError(
                f"{where}hidden_act {self.hidden_act!r} is not supported by the graph builder "
                f"({', '.join(sorted(ACTIVATIONS))}); export the model to ONNX"
            )

    def flops_per_token(self, seq_len: float) -> float:
        """Multiply-adds x 2 of one token through the encoder at a given sequence length."""
        h, i = self.hidden_size, self.intermediate_size
        dense = 4 * h * h + 2 * h * i  # QKV + output projection + the two FFN matrices
        attention = 2 * seq_len * h  # QK^T and probs x V
        return 2.0 * self.num_hidden_layers * (dense + attention)


# --------------------------------------------------------------------------- weights


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read a BERT checkpoint, normalising key prefixes (``bert.``, ``model.``)."""
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(path))
    except Exception as exc:
        raise ModelError(f"cannot read weights {path}: {exc}") from exc
    weights: dict[str, np.ndarray] = {}
    for raw_key, value in raw.items():
        key = raw_key
        for prefix in ("bert.", "model.", "roberta."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        weights[key] = np.asarray(value, dtype=np.float32)
    return weights


def random_weights(cfg: BertConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights of the right shapes, drawn as BERT initialises them (N(0, 0.02)).

    A model built from these costs exactly what the real one costs: for benchmarks and for
    test fixtures where only shapes and plumbing matter.
    """
    rng = np.random.default_rng(seed)
    h, i = cfg.hidden_size, cfg.intermediate_size

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.02, size=shape).astype(np.float32)

    w = {
        "embeddings.word_embeddings.weight": normal(cfg.vocab_size, h),
        "embeddings.position_embeddings.weight": normal(cfg.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": normal(cfg.type_vocab_size, h),
        "embeddings.LayerNorm.weight": np.ones(h, np.float32),
        "embeddings.LayerNorm.bias": np.zeros(h, np.float32),
    }
    for n in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{n}."
        for name in ("query", "key", "value"):
            w[f"{p}attention.self.{name}.weight"] = normal(h, h)
            w[f"{p}attention.self.{name}.bias"] = normal(h)
        w[f"{p}attention.output.dense.weight"] = normal(h, h)
        w[f"{p}attention.output.dense.bias"] = normal(h)
        w[f"{p}intermediate.dense.weight"] = normal(i, h)
        w[f"{p}intermediate.dense.bias"] = normal(i)
        w[f"{p}output.dense.weight"] = normal(h, i)
        w[f"{p}output.dense.bias"] = normal(h)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[f"{p}{ln}.weight"] = np.ones(h, np.float32)
            w[f"{p}{ln}.bias"] = np.zeros(h, np.float32)
    return w


# --------------------------------------------------------------------------- graph


class _Graph:
    """A tiny helper that names nodes and initializers as it goes."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def w(self, key: str) -> np.ndarray:
        try:
            return self.weights[key]
        except KeyError:
            raise ModelError(f"the checkpoint has no tensor {key!r}") from None

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], domain: str = "", **attrs: Any) -> str:
        self._n += 1
        out = f"{op_type.lower()}_{self._n}"
        self.nodes.append(
            helper.make_node(
                op_type, inputs, [out], name=f"{op_type}_{self._n}", domain=domain, **attrs
            )
        )
        return out

    def linear(self, x: str, prefix: str, tag: str, fold_bias: bool = True) -> str:
        """x @ W^T (+ b): Hugging Face stores Linear weights as (out, in)."""
        w = self.const(f"{tag}.w", self.w(f"{prefix}.weight").T)
        y = self.op("MatMul", [x, w])
        if not fold_bias:
            return y
        b = self.const(f"{tag}.b", self.w(f"{prefix}.bias"))
        return self.op("Add", [y, b])


def _embeddings(g: _Graph, cfg: BertConfig) -> str:
    word = g.const("emb.word", g.w("embeddings.word_embeddings.weight"))
    # token_type_ids are always 0 for a single text: fold that row into the position table
    pos_table = (
        g.w("embeddings.position_embeddings.weight")
        + g.w("embeddings.token_type_embeddings.weight")[0]
    )
    pos = g.const("emb.pos_type", pos_table)
    words = g.op("Gather", [word, "input_ids"], axis=0)
    seq = g.op("Shape", ["input_ids"], start=1, end=2)
    zero = g.const("c.zero1", np.array([0], np.int64))
    positions = g.op("Slice", [pos, zero, seq])
    summed = g.op("Add", [words, positions])
    gamma = g.const("emb.ln.g", g.w("embeddings.LayerNorm.weight"))
    beta = g.const("emb.ln.b", g.w("embeddings.LayerNorm.bias"))
    return g.op("LayerNormalization", [summed, gamma, beta], axis=-1, epsilon=cfg.layer_norm_eps)


def _gelu(g: _Graph, x: str, act: str) -> str:
    if act == "relu":
        return g.op("Relu", [x])
    if act == "gelu":
        inv_sqrt2 = g.const(f"c.isq2_{g._n}", np.array(1 / math.sqrt(2), np.float32))
        e = g.op("Erf", [g.op("Mul", [x, inv_sqrt2])])
        one = g.const(f"c.one_{g._n}", np.array(1.0, np.float32))
        half = g.const(f"c.half_{g._n}", np.array(0.5, np.float32))
        return g.op("Mul", [g.op("Mul", [x, half]), g.op("Add", [e, one])])
    # tanh approximation (gelu_new)
    c = g.const(f"c.gc_{g._n}", np.array(math.sqrt(2 / math.pi), np.float32))
    k = g.const(f"c.gk_{g._n}", np.array(0.044715, np.float32))
    one = g.const(f"c.one_{g._n}", np.array(1.0, np.float32))
    half = g.const(f"c.half_{g._n}", np.array(0.5, np.float32))
    x3 = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [x3, k])]), c])
    return g.op("Mul", [g.op("Mul", [x, half]), g.op("Add", [g.op("Tanh", [inner]), one])])


def _plain_layer(g: _Graph, cfg: BertConfig, x: str, mask_add: str, n: int) -> str:
    p = f"encoder.layer.{n}."
    heads = cfg.num_attention_heads
    dh = cfg.hidden_size // heads
    split = g.const(f"l{n}.split", np.array([0, 0, heads, dh], np.int64))
    merge = g.const(f"l{n}.merge", np.array([0, 0, cfg.hidden_size], np.int64))

    def heads_of(name: str, perm: list[int]) -> str:
        y = g.linear(x, f"{p}attention.self.{name}", f"l{n}.{name}")
        return g.op("Transpose", [g.op("Reshape", [y, split])], perm=perm)

    q = heads_of("query", [0, 2, 1, 3])
    k = heads_of("key", [0, 2, 3, 1])
    v = heads_of("value", [0, 2, 1, 3])
    scale = g.const(f"l{n}.scale", np.array(1 / math.sqrt(dh), np.float32))
    scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), mask_add])
    probs = g.op("Softmax", [scores], axis=-1)
    ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", [ctx, merge])
    attn = g.linear(ctx, f"{p}attention.output.dense", f"l{n}.ao")
    x = g.op(
        "LayerNormalization",
        [
            g.op("Add", [attn, x]),
            g.const(f"l{n}.ln1.g", g.w(f"{p}attention.output.LayerNorm.weight")),
            g.const(f"l{n}.ln1.b", g.w(f"{p}attention.output.LayerNorm.bias")),
        ],
        axis=-1,
        epsilon=cfg.layer_norm_eps,
    )
    hidden = _gelu(g, g.linear(x, f"{p}intermediate.dense", f"l{n}.fi"), cfg.hidden_act)
    out = g.linear(hidden, f"{p}output.dense", f"l{n}.fo")
    return g.op(
        "LayerNormalization",
        [
            g.op("Add", [out, x]),
            g.const(f"l{n}.ln2.g", g.w(f"{p}output.LayerNorm.weight")),
            g.const(f"l{n}.ln2.b", g.w(f"{p}output.LayerNorm.bias")),
        ],
        axis=-1,
        epsilon=cfg.layer_norm_eps,
    )


def _fused_layer(g: _Graph, cfg: BertConfig, x: str, mask: str, n: int) -> str:
    p = f"encoder.layer.{n}."
    qkv_w = np.concatenate(
        [g.w(f"{p}attention.self.{k}.weight").T for k in ("query", "key", "value")], axis=1
    )
    qkv_b = np.concatenate([g.w(f"{p}attention.self.{k}.bias") for k in ("query", "key", "value")])
    attn = g.op(
        "Attention",
        [x, g.const(f"l{n}.qkv.w", qkv_w), g.const(f"l{n}.qkv.b", qkv_b), mask],
        domain=MS_DOMAIN,
        num_heads=cfg.num_attention_heads,
    )
    ao = g.linear(attn, f"{p}attention.output.dense", f"l{n}.ao", fold_bias=False)
    x = g.op(
        "SkipLayerNormalization",
        [
            ao,
            x,
            g.const(f"l{n}.ln1.g", g.w(f"{p}attention.output.LayerNorm.weight")),
            g.const(f"l{n}.ln1.b", g.w(f"{p}attention.output.LayerNorm.bias")),
            g.const(f"l{n}.ao.b", g.w(f"{p}attention.output.dense.bias")),
        ],
        domain=MS_DOMAIN,
        epsilon=cfg.layer_norm_eps,
    )
    fi = g.linear(x, f"{p}intermediate.dense", f"l{n}.fi", fold_bias=False)
    fi_b = g.const(f"l{n}.fi.b", g.w(f"{p}intermediate.dense.bias"))
    if cfg.hidden_act == "gelu":
        hidden = g.op("BiasGelu", [fi, fi_b], domain=MS_DOMAIN)
    elif cfg.hidden_act == "relu":
        hidden = g.op("Relu", [g.op("Add", [fi, fi_b])])
    else:
        hidden = g.op("FastGelu", [fi, fi_b], domain=MS_DOMAIN)
    fo = g.linear(hidden, f"{p}output.dense", f"l{n}.fo", fold_bias=False)
    return g.op(
        "SkipLayerNormalization",
        [
            fo,
            x,
            g.const(f"l{n}.ln2.g", g.w(f"{p}output.LayerNorm.weight")),
            g.const(f"l{n}.ln2.b", g.w(f"{p}output.LayerNorm.bias")),
            g.const(f"l{n}.fo.b", g.w(f"{p}output.dense.bias")),
        ],
        domain=MS_DOMAIN,
        epsilon=cfg.layer_norm_eps,
    )


def build_bert(
    cfg: BertConfig,
    weights: Mapping[str, np.ndarray],
    *,
    fused: bool = True,
    mask: Literal["lengths", "raw"] = "lengths",
) -> onnx.ModelProto:
    """The ONNX model of a BERT encoder with these weights (a :class:`ModelError` for a
    config it cannot build exactly: see :meth:`BertConfig.check_buildable`)."""
    cfg.check_buildable()
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ModelError("hidden_size is not a multiple of num_attention_heads")
    g = _Graph(weights)
    x = _embeddings(g, cfg)
    if fused:
        mask_in = g.op("Cast", ["attention_mask"], to=TensorProto.INT32)
        if mask == "lengths":  # (batch,) int32: tokens per row, the rows right-padded
            axis = g.const("c.axis1", np.array([1], np.int64))
            mask_in = g.op("ReduceSum", [mask_in, axis], keepdims=0)
        for n in range(cfg.num_hidden_layers):
            x = _fused_layer(g, cfg, x, mask_in, n)
    else:
        # (1 - mask) * -10000, shaped (batch, 1, 1, seq) to broadcast over heads and queries
        m = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
        axes = g.const("c.axes12", np.array([1, 2], np.int64))
        m = g.op("Unsqueeze", [m, axes])
        one = g.const("c.mask_one", np.array(1.0, np.float32))
        big = g.const("c.mask_big", np.array(-10000.0, np.float32))
        mask_add = g.op("Mul", [g.op("Sub", [one, m]), big])
        for n in range(cfg.num_hidden_layers):
            x = _plain_layer(g, cfg, x, mask_add, n)
    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))
    graph = helper.make_graph(
        g.nodes,
        "autoembed-bert",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info(
                "attention_mask", TensorProto.INT64, ["batch", "sequence"]
            ),
        ],
        [
            helper.make_tensor_value_info(
                "last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", cfg.hidden_size]
            )
        ],
        initializer=g.inits,
    )
    opsets = [helper.make_opsetid("", OPSET)]
    if fused:
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="autoembed")
    model.ir_version = 8
    return model
