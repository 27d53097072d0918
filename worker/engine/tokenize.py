"""Tokenization with the model's own ``tokenizer.json``, truncated to the model's limit.

The tokenizer files of Hugging Face models often carry a fixed padding and a truncation
length of their own (all-MiniLM-L6-v2's says 128); both are replaced here: no padding (each
batch is padded to its own longest text) and truncation at the model's real limit.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..errors import ModelError


@dataclass(frozen=True)
class Encoded:
    """Token ids of a list of texts, in the caller's order."""

    ids: list[list[int]]
    lengths: np.ndarray  # int64, tokens per text (special tokens included)
    truncated: int  # how many texts were cut at the limit

    @property
    def total_tokens(self) -> int:
        return int(self.lengths.sum())


class TextTokenizer:
    def __init__(self, path: Path, max_tokens: int) -> None:
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ModelError(f"cannot load tokenizer {path}: {exc}") from exc
        self.max_tokens = max_tokens
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_tokens)

    def encode(self, texts: Sequence[str]) -> Encoded:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=True)
        ids = [e.ids for e in encodings]
        lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
        truncated = sum(1 for e in encodings if e.overflowing)
        return Encoded(ids=ids, lengths=lengths, truncated=truncated)


def token_budget_batches(
    lengths: np.ndarray, token_budget: int, max_batch: int
) -> list[np.ndarray]:
    """Indices sorted by length (longest first), cut so that each padded batch stays within
    ``token_budget`` tokens (rows x longest) and ``max_batch`` rows. Sorting keeps padding
    small; the budget bounds memory and keeps batches the size the cores like."""
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        longest = max(int(lengths[order[start]]), 1)
        rows = max(1, min(max_batch, token_budget // longest))
        batches.append(order[start : start + rows])
        start += rows
    return batches


def pad(
    ids: list[list[int]], index: np.ndarray, lengths: np.ndarray, multiple: int = 1, cap: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (int64) for the texts at ``index``, each row
    right-padded with zeros to the longest of them (the graph reads the mask as lengths),
    rounded up to a ``multiple`` of tokens but not past ``cap`` (when given): on a GPU, few
    distinct shapes are set up once and then reused."""
    lens = lengths[index]
    width = int(lens.max()) if len(index) else 0
    if multiple > 1 and width:
        width = -(-width // multiple) * multiple
        if cap:
            width = max(min(width, cap), int(lens.max()))
    mask = np.arange(width) < lens[:, None]
    input_ids = np.zeros((len(index), width), dtype=np.int64)
    # boolean assignment fills row by row, left to right: the order the ids are chained in
    input_ids[mask] = np.fromiter(
        itertools.chain.from_iterable(ids[i] for i in index), dtype=np.int64, count=int(lens.sum())
    )
    return input_ids, mask.astype(np.int64)
