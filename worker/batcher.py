"""Micro-batching of concurrent embedding requests into one engine call.

Requests that arrive together are merged into one engine call (``Embedder.embed_encoded``:
``Embedder.embed`` less the tokenizing, which is done per request, see below), run in a
thread (ONNX Runtime releases the GIL) under the engine lock that the worker's inference
also holds, so HTTP and queue work never oversubscribe the cores.

Batching is natural: while one batch runs (or while the worker holds the lock), the next
requests pile up and go in together as the next batch, up to ``max_texts`` texts. Only an
idle engine waits, and briefly: until a burst settles (``settle`` seconds without a new
request, 1 ms; at most ``max_wait``, 5 ms), because requests sent together reach the event
loop some hundred microseconds apart, and a short text embeds faster than that gap. So 32
simultaneous requests cost one or two engine calls, not 32; a lone request waits 1 ms.

Each request is tokenized on its own (so its token and truncation counts are its own), and
only requests with the same ``mean_pool``/``normalize`` options share a call. A request
whose text the tokenizer refuses fails alone; if the merged inference itself fails, the
requests of that batch are retried one by one, so one bad request never fails the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .engine import Embedder, Embedding
from .engine.tokenize import Encoded
from .errors import AutoembedError, EmbeddingError

log = logging.getLogger(__name__)

DEFAULT_MAX_TEXTS = 256


class TextRejected(EmbeddingError):
    """The tokenizer refused a text of the request."""


class BatcherClosed(AutoembedError):
    """The batcher is shut down and takes no more requests."""


@dataclass
class _Request:
    texts: list[str]
    options: tuple[bool, bool]  # (mean_pool, normalize)
    future: asyncio.Future[Embedding]
    encoded: Encoded | None = None
    error: BaseException | None = None
    result: Embedding | None = field(default=None, repr=False)


class Batcher:
    """Merges concurrent ``embed`` calls on one embedder into few engine calls.

    ``calls`` counts engine calls (``embed_encoded``), ``requests`` and ``texts`` what was
    asked for: ``requests / calls`` is the batching factor.
    """

    def __init__(
        self,
        embedder: Embedder,
        *,
        lock: asyncio.Lock | None = None,
        max_texts: int = DEFAULT_MAX_TEXTS,
        settle: float = 0.001,
        max_wait: float = 0.005,
    ) -> None:
        if max_texts <= 0:
            raise ValueError("max_texts must be positive")
        self.embedder = embedder
        self.lock = lock if lock is not None else asyncio.Lock()
        self.max_texts = max_texts
        self.settle, self.max_wait = settle, max_wait
        self.calls = 0
        self.requests = 0
        self.texts = 0
        self._pending: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def embed(
        self, texts: Sequence[str], *, mean_pool: bool = True, normalize: bool = True
    ) -> Embedding:
        """Vectors (in the order given), tokens and truncated count of this request's texts."""
        if self._closed:
            raise BatcherClosed()
        future: asyncio.Future[Embedding] = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(list(texts), (mean_pool, normalize), future))
        self.requests += 1
        self.texts += len(texts)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"batcher-{self.embedder.name}")
        self._wakeup.set()
        return await future

    async def aclose(self) -> None:
        """Stop; requests waiting or running fail with :class:`BatcherClosed`."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for request in [*self._running, *self._pending]:
            if not request.future.done():
                request.future.set_exception(BatcherClosed())
        self._pending.clear()
        self._running = []

    # ------------------------------------------------------------------ internals

    async def _run(self) -> None:
        while True:
            if not self._pending:
                while not self._pending:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                await self._settle()
            async with self.lock:
                batch = self._take()  # after the lock: what arrived meanwhile goes in too
                if not batch:
                    continue
                self._running = batch
                try:
                    await asyncio.to_thread(self._compute, batch)
                except Exception as exc:  # pragma: no cover - _compute catches per request
                    for request in batch:
                        request.error = request.error or exc
            self._running = []
            for request in batch:
                if request.future.done():  # the client went away meanwhile
                    continue
                if request.result is not None:
                    request.future.set_result(request.result)
                else:
                    request.future.set_exception(request.error or EmbeddingError())

    async def _settle(self) -> None:
        """Let a burst of requests arrive before an idle engine starts on the first."""
        if self.settle <= 0:
            return
        deadline = asyncio.get_running_loop().time() + self.max_wait
        seen = -1
        while len(self._pending) != seen and asyncio.get_running_loop().time() < deadline:
            if sum(len(r.texts) for r in self._pending) >= self.max_texts:
                return
            seen = len(self._pending)
            await asyncio.sleep(self.settle)

    def _take(self) -> list[_Request]:
        """The oldest live request and those after it with the same options, within the cap
        (a request larger than the cap goes alone; requests are never split)."""
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()  # cancelled while waiting
        if not self._pending:
            return []
        first = self._pending.popleft()
        batch = [first]
        total = len(first.texts)
        kept: deque[_Request] = deque()
        while self._pending:
            request = self._pending.popleft()
            if request.future.done():
                continue
            if request.options == first.options and total + len(request.texts) <= self.max_texts:
                batch.append(request)
                total += len(request.texts)
            else:
                kept.append(request)
                if total >= self.max_texts:
                    break
        kept.extend(self._pending)
        self._pending = kept
        return batch

    def _compute(self, batch: list[_Request]) -> None:
        """In a thread: tokenize each request, run the engine once on all of them, split."""
        emb = self.embedder
        good: list[_Request] = []
        for request in batch:
            try:
                request.encoded = emb.encode(request.texts)
                good.append(request)
            except Exception as exc:
                request.error = TextRejected(f"the tokenizer refused the input: {exc}")
        if not good:
            return
        mean_pool, normalize = batch[0].options
        try:
            self._embed_merged(good, mean_pool, normalize)
        except Exception as exc:
            if len(good) == 1:
                good[0].error = _as_embedding_error(exc)
                return
            log.warning(
                "a batch of %d requests failed (%s); retrying them one by one", len(good), exc
            )
            for request in good:
                try:
                    self._embed_merged([request], mean_pool, normalize)
                except Exception as one:
                    request.error = _as_embedding_error(one)

    def _embed_merged(self, requests: list[_Request], mean_pool: bool, normalize: bool) -> None:
        encs = [r.encoded for r in requests if r.encoded is not None]
        merged = Encoded(
            ids=[ids for enc in encs for ids in enc.ids],
            lengths=np.concatenate([enc.lengths for enc in encs]),
            truncated=sum(enc.truncated for enc in encs),
        )
        self.calls += 1
        vectors = self.embedder.embed_encoded(merged, mean_pool=mean_pool, normalize=normalize)
        start = 0
        for request, enc in zip(requests, encs, strict=True):
            n = len(enc.ids)
            request.result = Embedding(vectors[start : start + n], enc.total_tokens, enc.truncated)
            start += n


def _as_embedding_error(exc: BaseException) -> EmbeddingError:
    if isinstance(exc, EmbeddingError):
        return exc
    return EmbeddingError(f"{type(exc).__name__}: {exc}")
