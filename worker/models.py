"""The worker's loaded models: loaded in the background (a first download or an int8
quantisation can take minutes, and nothing else waits for it), by name, once.

A model that fails to load (not installed, not cached, no network, a download cut off, a
full disk) is reported with the way out in the message, and tried again with backoff (up
to every five minutes): files put in place, or a network that comes back, are picked up
without a restart. Its watches wait meanwhile, and say why (logs, /healthz, status).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .engine import Embedder
from .errors import AutoembedError
from .metrics import Metrics

log = logging.getLogger(__name__)

EmbedderFactory = Callable[[str], Embedder]


@dataclass
class Trouble:
    error: str
    retry_at: float  # monotonic time of the next try
    failures: int


class Models:
    def __init__(
        self,
        factory: EmbedderFactory,
        metrics: Metrics,
        *,
        retry_seconds: float = 5.0,
        retry_max_seconds: float = 300.0,
    ) -> None:
        self.factory = factory
        self.metrics = metrics
        self.loaded: dict[str, Embedder] = {}
        self.troubles: dict[str, Trouble] = {}
        self.retry_seconds = retry_seconds
        self.retry_max_seconds = retry_max_seconds
        self._loading: dict[str, asyncio.Task[None]] = {}
        self.changed = asyncio.Event()  # set whenever a load ends, well or not

    def get(self, name: str) -> Embedder | None:
        return self.loaded.get(name)

    def error(self, name: str) -> str | None:
        trouble = self.troubles.get(name)
        return trouble.error if trouble else None

    def failed(self, name: str) -> bool:
        """Tried and failed (and not being tried again right now)."""
        return name in self.troubles and name not in self._loading

    def loading(self, name: str) -> bool:
        return name in self._loading

    def want(self, name: str) -> Embedder | None:
        """The model if loaded; else start loading it (once) and return None."""
        if name in self.loaded:
            return self.loaded[name]
        if name in self._loading:
            return None
        trouble = self.troubles.get(name)
        if trouble is not None and time.monotonic() < trouble.retry_at:
            return None
        self._loading[name] = asyncio.create_task(self._load(name), name=f"load {name}")
        return None

    async def wait(self, name: str) -> Embedder | None:
        """Load now and wait for it (None: it failed; see ``error``)."""
        self.want(name)
        task = self._loading.get(name)
        if task is not None:
            await asyncio.shield(task)
        return self.loaded.get(name)

    def forget(self, keep: set[str]) -> None:
        """Unload models no watch uses any more."""
        for name in list(self.loaded):
            if name not in keep:
                del self.loaded[name]
                log.info("unloaded model %s (no watch uses it now)", name, extra={"model": name})

    async def _load(self, name: str) -> None:
        try:
            emb = await asyncio.to_thread(self.factory, name)
        except AutoembedError as exc:
            self._trouble(name, str(exc))
        except Exception as exc:
            self._trouble(name, f"{type(exc).__name__}: {exc}")
        else:
            self.loaded[name] = emb
            self.troubles.pop(name, None)
            self.metrics.track(name, emb.stats)
        finally:
            self._loading.pop(name, None)
            self.changed.set()

    def _trouble(self, name: str, error: str) -> None:
        failures = self.troubles[name].failures + 1 if name in self.troubles else 1
        delay = min(self.retry_max_seconds, self.retry_seconds * 2 ** (failures - 1))
        self.troubles[name] = Trouble(error, time.monotonic() + delay, failures)
        log.error(
            "model %s could not be loaded; its watches wait (next try in %.0f s): %s",
            name,
            delay,
            error,
            extra={"model": name, "action": "model_failed", "failures": failures},
        )

    async def aclose(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        await asyncio.gather(*self._loading.values(), return_exceptions=True)
