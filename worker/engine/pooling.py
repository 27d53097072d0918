"""Pooling of token states into one vector per text, and L2 normalisation."""

from __future__ import annotations

import numpy as np

from .registry import Pooling


def pool(hidden: np.ndarray, mask: np.ndarray, how: Pooling) -> np.ndarray:
    """(batch, seq, dim) token states -> (batch, dim) float32."""
    if how == "cls":
        return np.ascontiguousarray(hidden[:, 0, :], dtype=np.float32)
    m = mask.astype(np.float32)[:, :, None]
    summed = (hidden * m).sum(axis=1)
    counts = np.maximum(m.sum(axis=1), 1e-9)  # as sentence-transformers clamps
    return (summed / counts).astype(np.float32)


def normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
