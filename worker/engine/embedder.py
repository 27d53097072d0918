"""The embedding pipeline: tokenize -> length-sorted token-budget batches -> ONNX Runtime ->
pool -> normalise, with vectors returned in the caller's order."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..errors import EmbeddingError, ModelError
from .pooling import normalize as l2_normalize
from .registry import DEFAULT_MODEL
from .resolve import ModelFiles, cache_root, resolve
from .session import POOLED, Device, Precision, create_session, pick_device, prepare_graph
from .tokenize import Encoded, TextTokenizer, pad, token_budget_batches

log = logging.getLogger(__name__)
T = TypeVar("T")


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


PAD_AHEAD = 4  # padded batches a helper thread may hold ready ahead of inference
TOKENIZE_AHEAD = 2  # chunks of texts another may hold tokenized ahead of padding


@dataclass(frozen=True)
class _Batch:
    """One padded batch of one chunk of texts."""

    enc: Encoded
    index: np.ndarray  # the chunk's rows in this batch, in batch order
    input_ids: np.ndarray | None  # None: the chunk is empty
    mask: np.ndarray | None
    last: bool  # the chunk's last batch


def _check_texts(texts: Sequence[str]) -> None:
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise EmbeddingError(f"text {i} is {type(t).__name__}, not str")


_DONE = object()


@contextmanager
def _ahead(source: Iterator[T], depth: int) -> Iterator[Iterator[T]]:
    """``source`` run in a helper thread, up to ``depth`` items ahead of its consumer (with
    ``depth`` 0, in the consumer's own thread). An exception in ``source`` is raised in the
    consumer where the item would have been; leaving the block stops the thread."""
    if depth <= 0:
        yield source
        return
    items: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        _lower_priority_once()
        try:
            for item in source:
                if not put((item, None)):
                    return
        except BaseException as exc:  # handed to the consumer
            put((_DONE, exc))
        else:
            put((_DONE, None))

    def consume() -> Iterator[T]:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item  # type: ignore[misc]

    thread = threading.Thread(target=produce, name="autoembed-prepare", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()


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
        # texts tokenized at a time ahead of the device, in a long ``embed`` on CUDA
        self.chunk_texts = self.max_batch
        # batch widths rounded up to a multiple of tokens: on CUDA each new batch shape
        # costs a first slow run, and rounding bounds the shapes to max_tokens / 16
        self.pad_multiple = 16 if self.device == "cuda" else 1
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

    def _padded(self, chunks: Iterable[Encoded]) -> Iterator[_Batch]:
        """Each chunk's batches, padded (the host side of inference). An empty chunk gives
        one empty batch, so that every chunk ends with a batch marked ``last``."""
        for enc in chunks:
            batches = token_budget_batches(enc.lengths, self.token_budget, self.max_batch)
            if not batches:
                yield _Batch(enc, np.empty(0, np.int64), None, None, last=True)
            for k, index in enumerate(batches):
                input_ids, mask = pad(
                    enc.ids, index, enc.lengths, self.pad_multiple, self.max_tokens
                )
                yield _Batch(enc, index, input_ids, mask, last=k == len(batches) - 1)

    def _pipeline(
        self, batches: Iterator[_Batch], how: str, normalize: bool
    ) -> Iterator[np.ndarray]:
        """Runs the batches as they come, one array per chunk, in order."""
        result: np.ndarray | None = None
        started: float | None = None
        count = 0
        for b in batches:
            if started is None:
                started = time.perf_counter()
            n = len(b.enc.ids)
            if b.input_ids is not None and b.mask is not None:
                try:
                    vectors = self._run(b.input_ids, b.mask, how)
                except Exception as exc:
                    raise EmbeddingError(f"{self.name}: inference failed: {exc}") from exc
                if normalize:
                    vectors = l2_normalize(vectors)
                if result is None:
                    result = np.empty((n, vectors.shape[1]), dtype=np.float32)
                result[b.index] = vectors
                count += 1
            if b.last:
                if result is None:
                    result = np.empty((0, getattr(self, "dim", 0)), dtype=np.float32)
                enc = b.enc
                self.stats.add(
                    n, enc.total_tokens, enc.truncated, count, time.perf_counter() - started
                )
                yield result
                result, started, count = None, None, 0

    def embed_encoded(
        self, enc: Encoded, *, mean_pool: bool = True, normalize: bool = True
    ) -> np.ndarray:
        """Vectors for texts already tokenized (``encode``), in their order. On CUDA, with
        more than ``max_batch`` texts, the next batch is padded in a helper thread while the
        current one runs."""
        how = self.pooling if mean_pool else "cls"
        if len(enc.ids) == 0:
            return np.empty((0, getattr(self, "dim", 0)), dtype=np.float32)
        batches = self._padded([enc])
        several = self.device == "cuda" and len(enc.ids) > self.max_batch
        with _ahead(batches, PAD_AHEAD if several else 0) as ready:
            return next(self._pipeline(ready, how, normalize))

    def embed_many(
        self,
        chunks: Iterable[Sequence[str]],
        *,
        mean_pool: bool = True,
        normalize: bool = True,
    ) -> Iterator[np.ndarray]:
        """One float32 ``(len(chunk), dim)`` array per chunk of texts, in order, as each is
        done: the same vectors as ``embed(chunk)`` for each chunk.

        Two helper threads work ahead of inference: one tokenizes up to ``TOKENIZE_AHEAD``
        chunks ahead, the other pads up to ``PAD_AHEAD`` batches ahead, so that on a GPU the
        host's work overlaps the device's. ``chunks`` may be a generator that produces texts
        as they are read; it is read only that far ahead. An error in a chunk (a text that
        is not a string, inference failing) is raised when that chunk's turn comes, after
        the arrays of the chunks before it. Closing the generator (or leaving a ``for`` loop
        over it) stops the helper threads; chunks they had prepared are dropped.
        """
        how = self.pooling if mean_pool else "cls"

        def encoded() -> Iterator[Encoded]:
            for chunk in chunks:
                _check_texts(chunk)
                yield self.encode(chunk)

        with (
            _ahead(encoded(), TOKENIZE_AHEAD) as tokenized,
            _ahead(self._padded(tokenized), PAD_AHEAD) as ready,
        ):
            yield from self._pipeline(ready, how, normalize)

    def embed(
        self, texts: Sequence[str], *, mean_pool: bool = True, normalize: bool = True
    ) -> np.ndarray:
        """float32 (len(texts), dim), in the order given. An empty list gives (0, dim).

        ``mean_pool`` and ``normalize`` are the options of Supabase's ``Session.run``:
        ``mean_pool=False`` takes the first token's state (CLS) instead of the mean. An empty
        string is embedded as the model sees it, ``[CLS] [SEP]``: a valid, content-free
        vector. (The worker never embeds one: it clears the vector instead.)

        On CUDA a list longer than ``chunk_texts`` is sorted by characters (longest first)
        and tokenized ``chunk_texts`` at a time in a helper thread while the chunks before
        it run on the device (``embed_many``); each chunk is then sorted by tokens.
        """
        _check_texts(texts)
        n, size = len(texts), self.chunk_texts
        if self.device != "cuda" or n <= size:
            return self.embed_encoded(self.encode(texts), mean_pool=mean_pool, normalize=normalize)
        # characters predict tokens well enough to keep the padding of a global sort
        order = np.argsort(-np.fromiter(map(len, texts), np.int64, n), kind="stable")
        parts = [[texts[i] for i in order[s : s + size]] for s in range(0, n, size)]
        result = np.empty((n, self.dim), dtype=np.float32)
        for s, vectors in zip(
            range(0, n, size),
            self.embed_many(parts, mean_pool=mean_pool, normalize=normalize),
            strict=True,
        ):
            result[order[s : s + size]] = vectors
        return result

    def embed_detailed(
        self, texts: Sequence[str], *, mean_pool: bool = True, normalize: bool = True
    ) -> Embedding:
        enc = self.encode(texts)
        vectors = self.embed_encoded(enc, mean_pool=mean_pool, normalize=normalize)
        return Embedding(vectors, enc.total_tokens, enc.truncated)
