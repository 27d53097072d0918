"""Model downloads against a real HTTP server on loopback: success, a checksum mismatch, a
transfer cut off midway, and offline."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from autoembed.engine.registry import ModelSpec, RemoteFile
from autoembed.engine.resolve import resolve
from autoembed.errors import ChecksumMismatch, ModelNotAvailable

from .conftest import DATA

TOKENIZER = (DATA / "gte-small" / "tokenizer.json").read_bytes()
CONFIG = (DATA / "gte-small" / "config.json").read_bytes()
WEIGHTS = bytes(range(256)) * 4096  # 1 MiB stands in for onnx/model.onnx
FILES = {"tokenizer.json": TOKENIZER, "config.json": CONFIG, "onnx/model.onnx": WEIGHTS}


class Hub:
    """A tiny model hub: /<repo>/resolve/<rev>/<path>, with faults on demand."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.cut_off = 0  # how many transfers to break midway
        self.corrupt: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.requests.append(self.path)
                path = self.path.split("/resolve/main/", 1)[-1]
                body = FILES.get(path)
                if body is None:
                    self.send_error(404)
                    return
                if path in hub.corrupt:
                    body = body[:-1] + b"!"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path == "onnx/model.onnx" and hub.cut_off > 0:
                    hub.cut_off -= 1
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-transfer
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub() -> Iterator[Hub]:
    h = Hub()
    yield h
    h.close()


def spec(weights_sha: str | None = None) -> ModelSpec:
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    return ModelSpec(
        name="tiny-gte",
        dim=384,
        pooling="mean",
        max_tokens=512,
        hub_repo="org/tiny-gte",
        files=(
            RemoteFile("tokenizer.json", sha(TOKENIZER)),
            RemoteFile("config.json", sha(CONFIG)),
            RemoteFile("onnx/model.onnx", weights_sha or sha(WEIGHTS), len(WEIGHTS)),
        ),
    )


def env(hub: Hub, cache: Path, **extra: str) -> dict[str, str]:
    return {"AUTOEMBED_CACHE_DIR": str(cache), "AUTOEMBED_HUB_URL": hub.url, **extra}


def test_download_success(hub: Hub, tmp_path: Path) -> None:
    files = resolve("tiny-gte", env(hub, tmp_path), spec_override=spec())
    assert files.root == (tmp_path / "tiny-gte").resolve()
    assert (tmp_path / "tiny-gte" / "onnx" / "model.onnx").read_bytes() == WEIGHTS
    assert files.max_tokens == 512 and files.pooling == "mean"
    # a second resolve uses the cache: no new request
    before = len(hub.requests)
    resolve("tiny-gte", env(hub, tmp_path), spec_override=spec())
    assert len(hub.requests) == before


def test_checksum_mismatch_leaves_nothing(hub: Hub, tmp_path: Path) -> None:
    hub.corrupt.add("onnx/model.onnx")
    with pytest.raises(ChecksumMismatch, match="does not match the pinned.*discarded"):
        resolve("tiny-gte", env(hub, tmp_path), spec_override=spec())
    assert list(tmp_path.iterdir()) == []  # neither the model nor a partial download


def test_cut_off_transfer_is_retried(hub: Hub, tmp_path: Path) -> None:
    hub.cut_off = 2
    files = resolve("tiny-gte", env(hub, tmp_path), spec_override=spec())
    assert (files.root / "onnx" / "model.onnx").read_bytes() == WEIGHTS
    assert sum(1 for r in hub.requests if r.endswith("model.onnx")) == 3


def test_offline_error_names_model_files_and_directory(hub: Hub, tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailable) as info:
        resolve("tiny-gte", env(hub, tmp_path, AUTOEMBED_OFFLINE="1"), spec_override=spec())
    message = str(info.value)
    assert "'tiny-gte'" in message and "AUTOEMBED_OFFLINE" in message
    assert "tokenizer.json, config.json, onnx/model.onnx" in message
    assert str(tmp_path / "tiny-gte") in message
    assert hub.requests == []


def test_no_network_is_the_same_clear_error(tmp_path: Path) -> None:
    # nothing listens on this port: every try is refused, then the clear error
    with pytest.raises(ModelNotAvailable, match="download failed.*Put its files"):
        resolve(
            "gte-small",
            {"AUTOEMBED_CACHE_DIR": str(tmp_path), "AUTOEMBED_HUB_URL": "http://127.0.0.1:9"},
        )
    assert list(tmp_path.iterdir()) == []
