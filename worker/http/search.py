"""``POST /search``: the watch's search functions over HTTP, for applications that prefer
it to SQL. The query text is embedded here with the watch's model (which this process must
have loaded: its default model, or a model of the worker's watches), and the search runs as
the server's database role (row-level security applies to that role).

Request: ``{"table": "documents", "query": "text", "limit": 10, "hybrid": false,
"filter": {"tenant": 7}, "threshold": -1, "embedding_column": null}``; answer:
``{"table", "model", "results": [{"id", "similarity", ("score"), "metadata", "content"}]}``.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..errors import WatchError
from ..outcomes import is_db_outage
from ..watches import find_watch, search
from .common import HTTPError, Service, authorize, bool_of, json_object, read_json

MAX_RESULTS = 1000


def _str(body: dict[str, Any], key: str, required: bool) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise HTTPError(422, f"{key} must be a non-empty string", code="invalid_type", param=key)
    return value


async def search_route(request: Request) -> Response:
    from .routes import _dumps

    service: Service = request.app.state.service
    authorize(request, service.settings.api_key)
    body = json_object(await read_json(request, service.settings.max_body_bytes))
    table = _str(body, "table", True)
    query = _str(body, "query", True)
    column = _str(body, "embedding_column", False)
    assert table is not None and query is not None
    limit = body.get("limit", 10)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_RESULTS:
        raise HTTPError(
            422,
            f"limit must be an integer from 1 to {MAX_RESULTS}",
            code="invalid_value",
            param="limit",
        )
    threshold = body.get("threshold", -1)
    if (
        not isinstance(threshold, int | float)
        or isinstance(threshold, bool)
        or not math.isfinite(threshold)
    ):
        raise HTTPError(422, "threshold must be a number", code="invalid_type", param="threshold")
    meta = body.get("filter") or {}
    if not isinstance(meta, dict):
        raise HTTPError(422, "filter must be a JSON object", code="invalid_type", param="filter")
    hybrid = bool_of(body, "hybrid", False)
    if service.pool is None:
        raise HTTPError(
            503,
            "no database configured: set DATABASE_URL to search",
            code="no_database",
            kind="server_error",
        )
    try:
        async with service.pool.connection() as conn:
            try:
                found = await find_watch(conn, table, column)
            except WatchError as exc:
                raise HTTPError(404, str(exc), code="table_not_watched", param="table") from None
            emb = service.model(found["model"])
            result = await service.embed(emb, [query])
            rows = await search(
                conn,
                found,
                result.vectors[0],
                float(threshold),
                limit,
                text=query,
                hybrid=hybrid,
                filter=meta,
            )
    except HTTPError:
        raise
    except Exception as exc:
        if is_db_outage(exc):
            raise HTTPError(
                503,
                "database unavailable",
                code="database_unavailable",
                kind="server_error",
                headers={"Retry-After": "1"},
            ) from exc
        raise
    payload = {"table": table, "model": found["model"], "results": rows}
    return Response(_dumps(_jsonable(payload)), media_type="application/json")


def _jsonable(value: Any) -> Any:
    """Keys of any type PostgreSQL gives (uuid, numeric, dates) as JSON."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
