"""Prometheus metrics of one process (a registry per Worker/app, no global state)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .engine import EmbedStats


class _EngineCollector(Collector):
    """Texts, tokens and truncated texts embedded, read from the embedders' own counters
    (counters: a rate is for the scraper to take, over the window it wants)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        texts = CounterMetricFamily("autoembed_texts", "Texts embedded", labels=["model"])
        tokens = CounterMetricFamily("autoembed_tokens", "Tokens embedded", labels=["model"])
        truncated = CounterMetricFamily(
            "autoembed_truncated_texts", "Texts cut at the model's token limit", labels=["model"]
        )
        for name, stats in self.metrics.engines.items():
            texts.add_metric([name], stats.texts)
            tokens.add_metric([name], stats.tokens)
            truncated.add_metric([name], stats.truncated)
        yield texts
        yield tokens
        yield truncated


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.started = time.monotonic()
        self.engines: dict[str, EmbedStats] = {}
        self.claimed = Counter(
            "autoembed_jobs_claimed", "Jobs claimed", ["lane"], registry=self.registry
        )
        self.completed = Counter(
            "autoembed_jobs_completed", "Jobs finished", ["lane"], registry=self.registry
        )
        self.failed = Counter(
            "autoembed_jobs_failed", "Job attempts that failed", ["lane"], registry=self.registry
        )
        self.queue_depth = Gauge(
            "autoembed_queue_depth", "Jobs waiting, by status", ["status"], registry=self.registry
        )
        self.batch_seconds = Histogram(
            "autoembed_batch_seconds",
            "Seconds from claim to commit of one batch",
            ["lane"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.chunks_written = Counter(
            "autoembed_chunks_written",
            "Passages embedded and stored (passages kept as they were are not counted)",
            ["watch"],
            registry=self.registry,
        )
        self.chunks_dropped = Counter(
            "autoembed_chunks_dropped",
            "Passages past the cap of a row (max_chunks), not embedded",
            ["watch"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "autoembed_http_requests", "HTTP requests", ["path", "status"], registry=self.registry
        )
        self.registry.register(_EngineCollector(self))

    def track(self, name: str, stats: EmbedStats) -> None:
        self.engines[name] = stats

    def render(self) -> bytes:
        return generate_latest(self.registry)
