"""The HTTP surface: database webhooks, ``/embed``, ``/v1/embeddings``, health and metrics.

- ``POST /webhook``: Supabase-style database webhooks (``{"type", "table", "schema",
  "record", "old_record"}``). A watched row is queued durably with the triggers' own
  ``enqueue`` statement (same queue, same deduplication), a worker is woken with ``notify``,
  and the answer is 202 at once; DELETE drops the row's pending jobs; an UPDATE that left the
  watched column as it was queues nothing, as the triggers do.
- ``POST /embed``: the request and response of Supabase's "Generate Embeddings" Edge
  Function: ``{"input": "text"}`` -> ``{"embedding": [...]}`` (a list in, a list out), with
  ``mean_pool`` and ``normalize`` as in ``Session.run``.
- ``POST /v1/embeddings``: OpenAI-compatible, for pgai's vectorizer, LangChain, LlamaIndex.
- ``GET /healthz`` (no auth): database, model and listener checks; 503 when one fails.
- ``GET /metrics`` (no auth): Prometheus text.

Texts over the model's limit are truncated, and every embedding response says how many
were in an ``X-Autoembed-Truncated`` header (bodies stay exactly what Supabase's and
OpenAI's clients expect; ``usage`` counts the tokens actually embedded).

Errors are JSON in OpenAI's shape, ``{"error": {"message", "type", "code", "param"}}``,
on every endpoint: 400 not JSON or empty input, 401 no or wrong Bearer token, 404 unknown
model or unwatched table, 413 body or input list too large, 415 a body not declared
``application/json``, 422 a field of the wrong type or value (``param`` names it), 400 a
foreign ``Host`` and 403 a foreign ``Origin`` (hosts.py), 408 a request not sent in time and
503 too many connections (connections.py), 503 database unavailable (with Retry-After).

Why Starlette + uvicorn: a small, well-kept ASGI stack (both already dependencies) that
gives routing, streaming request bodies (so the size limit holds while reading) and a
server that runs inside our own event loop, next to the worker, with nothing more.
"""

from __future__ import annotations

from .app import create_app
from .common import TRUNCATED_HEADER, HTTPError, Service
from .connections import Limits
from .server import HttpServer, bind, limits_of, listen_address, serve, serve_with_worker

__all__ = [
    "TRUNCATED_HEADER",
    "HTTPError",
    "HttpServer",
    "Limits",
    "Service",
    "bind",
    "create_app",
    "limits_of",
    "listen_address",
    "serve",
    "serve_with_worker",
]
