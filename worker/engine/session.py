"""ONNX graphs prepared for a device and precision, and ONNX Runtime sessions over them.

Graphs built or rewritten here are cached under ``<cache>/graphs/<sha256 of the weights>``,
so a changed weights file gets a new graph and an unchanged one is never rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from ..errors import ModelError
from .bert_onnx import BertConfig, build_bert, load_safetensors
from .resolve import ModelFiles

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "int8", "fp16"]
BUILDER_VERSION = 3  # 3: attention mask as lengths (fused CUDA attention)
POOLED = {"mean": "autoembed_mean", "cls": "autoembed_cls"}


class _Quiet(logging.Filter):
    """Drops the advice onnxruntime's tools log at WARNING on every run (not actionable)."""

    NOISE = ("Please consider to run pre-processing", "Model producer not matched")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISE)


_QUIET = _Quiet()
for _name in ("", "onnxruntime.transformers.optimizer", "onnxruntime.transformers.onnx_model"):
    logging.getLogger(_name).addFilter(_QUIET)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _save_atomic(model: onnx.ModelProto, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def pick_device(device: Device) -> Literal["cpu", "cuda"]:
    if device == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if device == "cuda":
        raise ModelError(
            "--device cuda: this onnxruntime has no CUDA provider; "
            "pip uninstall onnxruntime && pip install onnxruntime-gpu (CUDA 12/13 and cuDNN 9)"
        )
    return "cpu"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- graphs


def _probe_same(a: Path | bytes, b: Path | bytes, hidden: int) -> float:
    """Smallest per-token cosine between two graphs' outputs on a padded random batch."""
    import onnxruntime as ort

    rng = np.random.default_rng(7)
    ids = rng.integers(1000, 20000, size=(2, 24), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 15:] = 0
    outs = []
    for model in (a, b):
        src = str(model) if isinstance(model, Path) else model
        sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in {i.name for i in sess.get_inputs()}:
            feeds["token_type_ids"] = np.zeros_like(ids)
        outs.append(sess.run(None, feeds)[0].reshape(-1, hidden)[mask.reshape(-1) == 1])
    x, y = outs
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return float(cos.min())


def _fuse_onnx(files: ModelFiles, source: Path, dest: Path) -> Path:
    """ONNX Runtime's transformer fusions (Attention, SkipLayerNorm, Gelu) for an exported
    BERT graph, kept only if the outputs stay the same; else the original graph."""
    marker = dest.with_suffix(".json")
    if dest.is_file():
        return dest
    if marker.is_file():
        return source
    used = source
    if importlib.util.find_spec("sympy") is None:
        # onnxruntime's fusions need its symbolic shape inference, which needs sympy (an
        # optional extra of recent onnxruntime); without it they fail halfway, leaking a
        # temporary directory. No marker: installing sympy later gets the fused graph.
        log.warning(
            "graph fusion skipped for %s: it needs sympy (pip install sympy); "
            "the unfused graph gives the same vectors, more slowly",
            source,
        )
        return source
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        cfg = BertConfig.from_file(files.config) if files.config else None
        if cfg is not None:
            opt = optimize_model(
                str(source),
                model_type="bert",
                num_heads=cfg.num_attention_heads,
                hidden_size=cfg.hidden_size,
                opt_level=0,
            )
            stats = opt.get_fused_operator_statistics()
            fused = stats.get("Attention", 0) + stats.get("MultiHeadAttention", 0)
            if fused:
                model_bytes = opt.model.SerializeToString()
                cos = _probe_same(source, model_bytes, cfg.hidden_size)
                if cos >= 0.99999:
                    _save_atomic(opt.model, dest)
                    used = dest
                else:
                    log.warning("attention fusion changed the outputs (cos %.6f): not used", cos)
    except Exception as exc:  # the optimizer is best effort; the original graph always works
        log.warning("graph fusion skipped for %s: %s", source, exc)
    if used is source:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"fused": False, "source": str(source)}))
    return used


def _quantize_int8(fp32: Path, dest: Path) -> Path:
    if dest.is_file():
        return dest
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log.info("quantizing %s to int8 (per-channel weights)", fp32.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".int8.", suffix=".onnx", dir=dest.parent)
    os.close(fd)
    try:
        quantize_dynamic(
            str(fp32),
            tmp,
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _to_fp16(fp32: Path, dest: Path) -> Path:
    if dest.is_file():
        return dest
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    _save_atomic(model, dest)
    return dest


def _hidden_output(model: onnx.ModelProto) -> str:
    names = [str(o.name) for o in model.graph.output]
    if "last_hidden_state" in names:
        return "last_hidden_state"
    for out in model.graph.output:
        if len(out.type.tensor_type.shape.dim) == 3:
            return str(out.name)
    raise ModelError("the ONNX graph has no (batch, sequence, hidden) output to pool")


def add_pooling(model: onnx.ModelProto) -> onnx.ModelProto:
    """Append mean pooling (over the attention mask) and CLS pooling to a graph, as two
    extra (batch, hidden) outputs. Only they leave the session: the token states stay where
    they were computed (on a GPU, a batch of them is hundreds of MB)."""
    from onnx import TensorProto, helper, numpy_helper

    hidden = _hidden_output(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    g = model.graph
    p = "autoembed_pool_"
    consts: dict[str, np.ndarray] = {
        f"{p}axis1": np.array([1], np.int64),
        f"{p}axis2": np.array([2], np.int64),
        f"{p}eps": np.array(1e-9, np.float32),
        f"{p}zero": np.array(0, np.int64),
    }
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> None:
        g.node.append(helper.make_node(op, inputs, [out], name=out, **attrs))

    def reduce_sum(x: str, out: str, keepdims: int) -> None:
        if opset >= 13:
            node("ReduceSum", [x, f"{p}axis1"], out, keepdims=keepdims)
        else:
            node("ReduceSum", [x], out, axes=[1], keepdims=keepdims)

    node("Cast", ["attention_mask"], f"{p}mask", to=TensorProto.FLOAT)
    if opset >= 13:
        node("Unsqueeze", [f"{p}mask", f"{p}axis2"], f"{p}mask3")
    else:
        node("Unsqueeze", [f"{p}mask"], f"{p}mask3", axes=[2])
    node("Cast", [hidden], f"{p}hidden", to=TensorProto.FLOAT)
    node("Mul", [f"{p}hidden", f"{p}mask3"], f"{p}masked")
    reduce_sum(f"{p}masked", f"{p}sum", 0)
    reduce_sum(f"{p}mask", f"{p}count", 1)
    node("Max", [f"{p}count", f"{p}eps"], f"{p}count1")
    node("Div", [f"{p}sum", f"{p}count1"], POOLED["mean"])
    node("Gather", [f"{p}hidden", f"{p}zero"], POOLED["cls"], axis=1)
    for name in POOLED.values():
        g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", None]))
    return model


def _pooled(source: Path, dest: Path) -> Path:
    if not dest.is_file():
        _save_atomic(add_pooling(onnx.load(str(source))), dest)
    return dest


def prepare_graph(files: ModelFiles, precision: Precision, cache: Path) -> Path:
    """The ONNX file to run for this model and precision, building it if needed: the
    model's graph (built from safetensors, or as given, fused where that changes nothing),
    quantized or halved as asked, with pooling appended."""
    source = files.weights
    cfg: BertConfig | None = None
    if files.onnx is None:
        assert files.config is not None  # inspect() requires it with safetensors
        cfg = BertConfig.from_file(files.config)
        cfg.check_buildable()  # before any cached graph is looked at or weights are read
    key = f"{file_sha256(source)[:24]}-v{BUILDER_VERSION}"
    folder = cache / "graphs" / key
    if files.onnx is not None:
        fp32 = _fuse_onnx(files, files.onnx, folder / "fp32.onnx")
    else:
        fp32 = folder / "fp32.onnx"
        if not fp32.is_file():
            assert cfg is not None
            log.info("building an ONNX graph from %s", source)
            _save_atomic(build_bert(cfg, load_safetensors(source), fused=True), fp32)
    if precision == "int8":
        graph = _quantize_int8(fp32, folder / "int8.onnx")
    elif precision == "fp16":
        graph = _to_fp16(fp32, folder / "fp16.onnx")
    else:
        graph = fp32
    return _pooled(graph, folder / f"{precision}.pooled.onnx")


def create_session(
    path: Path,
    device: Literal["cpu", "cuda"],
    threads: int | None,
    mem_pattern: bool | None = None,
) -> Any:
    """An ONNX Runtime session over the graph at ``path``. ``mem_pattern`` (default: on
    CPU only) is ONNX Runtime's plan of one allocation per input shape, made at the first
    run of each shape: batch shapes change with every batch here, and on CUDA each new
    plan is a new device allocation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_mem_pattern = device != "cuda" if mem_pattern is None else mem_pattern
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or usable_cpus()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    providers: list[Any] = ["CPUExecutionProvider"]
    if device == "cuda":
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            try:
                preload()
            except Exception as exc:  # pragma: no cover - depends on the CUDA install
                log.debug("preload_dlls: %s", exc)
        providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load {path}: {exc}") from exc
    active = session.get_providers()[0]
    if device == "cuda" and active != "CUDAExecutionProvider":
        raise ModelError(
            "the CUDA provider did not start (CUDA or cuDNN libraries missing?); "
            "run with --device cpu, or see onnxruntime's CUDA requirements"
        )
    return session
