"""The embedding pipeline: tokenize -> length-sorted token-budget batches -> ONNX Runtime ->
pool -> normalise, with vectors returned in the caller's order."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EmbeddingError, ModelError
from .pooling import normalize as l2_normalize
from .registry import DEFAULT_MODEL
from .resolve import ModelFiles, cache_root, resolve
from .session import POOLED, Device, Precision, create_session, pick_device, prepare_graph
from .tokenize import Encoded, TextTokenizer, pad, token_budget_batches

log = logging.getLogger(__name__)


@dataclass
class EmbedStats:
    """Running totals since the embedder was loaded."""

    texts: int = 0
    tokens: int = 0
    truncated: int = 0
    batches: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, texts: int, tokens: int, truncated: int, batches: int, seconds: float) -> None:
        with self._lock:
            self.texts += texts
            self.tokens += tokens
            self.truncated += truncated
            self.batches += batches
            self.seconds += seconds


@dataclass(frozen=True)
class Embedding:
    """Vectors for a list of texts, with what it took to make them."""

    vectors: np.ndarray  # float32 (n, dim), in the caller's order
    tokens: int
    truncated: int


INFERENCE_NICENESS = 5
_lowered = threading.local()


def _threads() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:  # not Linux
        return set()


def _lower_priority(tid: int) -> None:
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(current + INFERENCE_NICENESS, 19))
    except (OSError, AttributeError):
        pass


def _lower_priority_once() -> None:
    """Lower the calling thread's priority (once): it runs inference, not the event loop."""
    if threading.current_thread() is threading.main_thread() or getattr(_lowered, "done", False):
        return
    _lowered.done = True
    _lower_priority(threading.get_native_id())


class Embedder:
    """One model loaded on one device. ``embed`` is thread-safe."""

    def __init__(
        self,
        files: ModelFiles,
        *,
        device: Device = "auto",
        precision: Precision = "fp32",
        threads: int | None = None,
        token_budget: int | None = None,
        max_batch: int | None = None,
        cache: Path | None = None,
    ) -> None:
        self.files = files
        self.name = files.name
        self.pooling = files.pooling
        self.max_tokens = files.max_tokens
        self.device = pick_device(device)
        if precision == "int8" and self.device != "cpu":
            raise ModelError("int8 is a CPU mode; use fp16 (or fp32) on CUDA")
        if precision == "fp16" and self.device != "cuda":
            raise ModelError("fp16 needs --device cuda; on CPU use fp32 or int8")
        self.precision = precision
        self.tokenizer = TextTokenizer(files.tokenizer, files.max_tokens)
        graph = prepare_graph(files, precision, cache or cache_root())
        started = time.perf_counter()
        before = _threads()
        self.session = create_session(graph, self.device, threads)
        # ONNX Runtime's own pool threads, and below every thread that runs inference, yield
        # to the event loop: on a small machine inference would otherwise starve the
        # database round trips and HTTP requests that should overlap it
        self._pool_threads = _threads() - before
        for tid in self._pool_threads:
            _lower_priority(tid)
        log.info(
            "loaded %s (%s, %s, pooling %s, max %d tokens) in %.2fs",
            self.name,
            self.device,
            precision,
            self.pooling,
            self.max_tokens,
            time.perf_counter() - started,
        )
        self._inputs = {i.name for i in self.session.get_inputs()}
        self.token_budget = token_budget or (32768 if self.device == "cuda" else 2048)
        self.max_batch = max_batch or (256 if self.device == "cuda" else 128)
        self.stats = EmbedStats()
        self.dim = int(self.embed(["dimension probe"]).shape[1])
        self.stats = EmbedStats()

    @classmethod
    def load(
        cls,
        model: str | None = None,
        *,
        device: Device = "auto",
        precision: Precision = "fp32",
        threads: int | None = None,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Embedder:
        """Load a model by registry name or directory path (default: gte-small)."""
        files = resolve(model or DEFAULT_MODEL, env)
        return cls(files, device=device, precision=precision, threads=threads, **kwargs)

    def encode(self, texts: Sequence[str]) -> Encoded:
        return self.tokenizer.encode(texts)

    def _run(self, input_ids: np.ndarray, mask: np.ndarray, how: str) -> np.ndarray:
        """One batch through the graph: its pooled (batch, dim) output, float32."""
        _lower_priority_once()
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        out: np.ndarray = self.session.run([POOLED[how]], feeds)[0]
        return out

    def embed_encoded(
        self, enc: Encoded, *, mean_pool: bool = True, normalize: bool = True
    ) -> np.ndarray:
        n = len(enc.ids)
        if n == 0:
            return np.empty((0, getattr(self, "dim", 0)), dtype=np.float32)
        how = self.pooling if mean_pool else "cls"
        started = time.perf_counter()
        batches = token_budget_batches(enc.lengths, self.token_budget, self.max_batch)
        result: np.ndarray | None = None
        for index in batches:
            input_ids, mask = pad(enc.ids, index, enc.lengths)
            try:
                vectors = self._run(input_ids, mask, how)
            except Exception as exc:
                raise EmbeddingError(f"{self.name}: inference failed: {exc}") from exc
            if normalize:
                vectors = l2_normalize(vectors)
            if result is None:
                result = np.empty((n, vectors.shape[1]), dtype=np.float32)
            result[index] = vectors
        assert result is not None
        self.stats.add(
            n, enc.total_tokens, enc.truncated, len(batches), time.perf_counter() - started
        )
        return result

    def embed(
        self, texts: Sequence[str], *, mean_pool: bool = True, normalize: bool = True
    ) -> np.ndarray:
        """float32 (len(texts), dim), in the order given. An empty list gives (0, dim).

        ``mean_pool`` and ``normalize`` are the options of Supabase's ``Session.run``:
        ``mean_pool=False`` takes the first token's state (CLS) instead of the mean. An empty
        string is embedded as the model sees it, ``[CLS] [SEP]``: a valid, content-free
        vector. (The worker never embeds one: it clears the vector instead.)
        """
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise EmbeddingError(f"text {i} is {type(t).__name__}, not str")
        return self.embed_encoded(self.encode(texts), mean_pool=mean_pool, normalize=normalize)

    def embed_detailed(
        self, texts: Sequence[str], *, mean_pool: bool = True, normalize: bool = True
    ) -> Embedding:
        enc = self.encode(texts)
        vectors = self.embed_encoded(enc, mean_pool=mean_pool, normalize=normalize)
        return Embedding(vectors, enc.total_tokens, enc.truncated)
