"""The embedding engine: models by name or path, run in-process on ONNX Runtime."""

from __future__ import annotations

from .embedder import Embedder, Embedding, EmbedStats
from .registry import DEFAULT_MODEL, REGISTRY, ModelSpec
from .resolve import ModelFiles, resolve

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "EmbedStats",
    "Embedder",
    "Embedding",
    "ModelFiles",
    "ModelSpec",
    "resolve",
]
