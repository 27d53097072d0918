"""Checked downloads: httpx streaming, tenacity retries, sha256, atomic rename."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tqdm import tqdm

from ..errors import ChecksumMismatch, ModelNotAvailable
from .registry import ModelSpec, RemoteFile

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class _Retryable(Exception):
    """A transfer error worth another try (connection lost, 5xx, short body)."""


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, _Retryable | httpx.TransportError)


def _fetch_once(client: httpx.Client, url: str, dest: Path, file: RemoteFile) -> str:
    digest = hashlib.sha256()
    with client.stream("GET", url) as resp:
        if resp.status_code >= 500 or resp.status_code == 429:
            raise _Retryable(f"{url}: HTTP {resp.status_code}")
        if resp.status_code != 200:
            raise ModelNotAvailable(f"{url}: HTTP {resp.status_code}")
        expected = file.size or int(resp.headers.get("content-length") or 0) or None
        got = 0
        show = sys.stderr.isatty()
        with (
            dest.open("wb") as out,
            tqdm(
                total=expected,
                unit="B",
                unit_scale=True,
                desc=file.path,
                disable=not show,
                leave=False,
            ) as bar,
        ):
            for chunk in resp.iter_bytes(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        if expected is not None and got != expected:
            raise _Retryable(f"{url}: transfer cut off at {got} of {expected} bytes")
    return digest.hexdigest()


def download_file(
    client: httpx.Client, url: str, dest: Path, file: RemoteFile, attempts: int = 4
) -> str:
    """Fetch ``url`` into ``dest`` (retrying transfer errors) and check its sha256.

    Returns the sha256. On a checksum mismatch ``dest`` is removed and ChecksumMismatch
    raised: a wrong file is never left behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        for attempt in Retrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
            retry=retry_if_exception(_is_retryable),
            reraise=False,
        ):
            with attempt:
                n = attempt.retry_state.attempt_number
                if n > 1:
                    log.warning("retrying %s (attempt %d of %d)", url, n, attempts)
                sha = _fetch_once(client, url, dest, file)
    except RetryError as exc:
        dest.unlink(missing_ok=True)
        cause = exc.last_attempt.exception()
        raise ModelNotAvailable(
            f"download of {url} failed after {attempts} tries: {cause}"
        ) from exc
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    if file.sha256 is not None and sha != file.sha256:
        dest.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{url}: sha256 {sha} does not match the pinned {file.sha256}; "
            "the file was discarded (a changed upstream file, or a proxy rewriting it)"
        )
    return sha


def download_model(spec: ModelSpec, target: Path, base_url: str) -> dict[str, str]:
    """Download every file of ``spec`` into ``target`` as one atomic step.

    Files land in a temporary directory beside ``target`` first; only when all of them are
    there and checked is it renamed to ``target``. Returns {file: sha256}.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    shas: dict[str, str] = {}
    try:
        timeout = httpx.Timeout(30.0, read=60.0)
        with httpx.Client(follow_redirects=True, timeout=timeout) as client:
            for file in spec.files:
                url = spec.url(base_url, file)
                log.info("downloading %s", url)
                try:
                    shas[file.path] = download_file(client, url, staging / file.path, file)
                except ModelNotAvailable:
                    if file.optional:
                        continue
                    raise
        try:
            os.rename(staging, target)
        except OSError:
            if not target.exists():
                raise
            # another process finished the same download first: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return shas
