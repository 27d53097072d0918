"""One settings object, read from the environment (``DATABASE_URL``, ``AUTOEMBED_*``) and
validated; the command line overrides fields of it."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from .errors import ConfigError

ENV_PREFIX = "AUTOEMBED_"
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "int8", "fp16"]
LLMMode = Literal["ollama", "openai"]


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    model: str = "gte-small"  # AUTOEMBED_MODEL: the default for watch, embed and search
    device: Device = "auto"  # auto | cpu | cuda
    precision: Precision = "fp32"  # fp32 | int8 (CPU) | fp16 (CUDA)
    threads: int | None = None  # ONNX Runtime intra-op threads (default: usable cores)
    batch_size: int = 512  # rows claimed per round trip (sorted by length across the claim)
    concurrency: int = 2  # batches in flight per process (DB I/O overlaps inference)
    lease_seconds: float = 60.0  # a claimed job is retaken by another worker after this
    poll_seconds: float = 5.0  # fallback poll when no notification arrives
    max_attempts: int = 5  # a job fails for good after this many errors
    backoff_seconds: float = 2.0  # first retry delay; doubles per attempt, with jitter
    backoff_max_seconds: float = 300.0
    shutdown_seconds: float = 30.0  # SIGTERM: finish in-flight work for at most this long
    summary_concurrency: int = 2  # LLM generations in flight per process
    summary_lease_seconds: float = 300.0
    llm_host: str | None = None  # default: OLLAMA_HOST, AI_INFERENCE_API_HOST, localhost
    llm_mode: LLMMode = "ollama"  # ollama | openai
    llm_retries: int = 3  # quick retries inside one attempt (connection errors, 5xx)
    http: str | None = None  # HOST:PORT for the HTTP surface inside `run`
    api_key: str | None = None  # AUTOEMBED_API_KEY: Bearer token for the HTTP surface
    max_body_bytes: int = 1 << 20
    max_inputs: int = 256
    worker_name: str = ""
    index_memory: str = "1GB"  # maintenance_work_mem while the worker builds an HNSW index
    # the HTTP server's limits (worker/http/connections.py) and Host/Origin rules (hosts.py)
    http_header_timeout: float = 10.0  # seconds from connect (or last answer) to a whole head
    http_body_timeout: float = 30.0  # seconds from the end of the head to the end of the body
    http_max_connections: int = 1000  # open connections; past it the oldest unfinished closes
    http_allowed_hosts: str = ""  # comma-separated extra Host names (name or name:port)
    http_allowed_origins: str = ""  # comma-separated extra Origins (scheme://host[:port])

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)!r}")

        for name in (
            "batch_size",
            "concurrency",
            "lease_seconds",
            "poll_seconds",
            "max_attempts",
            "summary_concurrency",
            "summary_lease_seconds",
            "shutdown_seconds",
            "max_body_bytes",
            "max_inputs",
        ):
            positive(name)
        if self.backoff_seconds < 0 or self.backoff_max_seconds < self.backoff_seconds:
            raise ConfigError("backoff_seconds must be >= 0 and <= backoff_max_seconds")
        if self.device not in {"auto", "cpu", "cuda"}:
            raise ConfigError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.precision not in {"fp32", "int8", "fp16"}:
            raise ConfigError(f"precision must be fp32, int8 or fp16, not {self.precision!r}")
        if self.llm_mode not in {"ollama", "openai"}:
            raise ConfigError(f"llm_mode must be ollama or openai, not {self.llm_mode!r}")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError("threads must be positive")
        for name in ("http_header_timeout", "http_body_timeout", "http_max_connections"):
            positive(name)
        if not self.worker_name:
            object.__setattr__(self, "worker_name", f"{socket.gethostname()}:{os.getpid()}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            raw = env.get(key)
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(key, raw, f.type)
        if env.get("DATABASE_URL"):
            values.setdefault("database_url", env["DATABASE_URL"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except TypeError as exc:  # pragma: no cover - programming error
            raise ConfigError(str(exc)) from exc

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def require_database(self) -> str:
        if not self.database_url:
            raise ConfigError(
                "no database: set DATABASE_URL (e.g. postgresql://user:pass@host:5432/db) "
                "or pass --database-url; `autoembed demo` starts its own"
            )
        return self.database_url


def _parse(key: str, raw: str, annotation: object) -> Any:
    text = str(annotation)
    try:
        if "int" in text and "float" not in text:
            return int(raw)
        if "float" in text:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a number") from None
    return raw
