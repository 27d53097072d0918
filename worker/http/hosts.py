"""Which ``Host`` and ``Origin`` headers a request may carry: the defence against DNS
rebinding and cross-site requests when the API has no key.

Without ``AUTOEMBED_API_KEY`` the server listens on loopback only, but a web page the user
opens can still reach it: a form or ``fetch`` in ``no-cors`` mode POSTs (a "simple" request
that needs no CORS preflight), and a page whose name is re-pointed at 127.0.0.1 (DNS
rebinding) can even read the answers. Browsers cannot forge ``Host`` and ``Origin``, so:

- ``Host`` must name this server: ``localhost``, ``127.0.0.1``, ``[::1]`` or the address the
  connection came in on, with the port it listens on; or an entry of
  ``AUTOEMBED_HTTP_ALLOWED_HOSTS`` (``name`` for any port, ``name:port`` for one).
- ``Origin``, when a browser sends one, must be such a host too (any scheme), or an entry of
  ``AUTOEMBED_HTTP_ALLOWED_ORIGINS`` (``scheme://host[:port]``; ``null`` for sandboxed pages).
  Clients that are not browsers send no ``Origin``.
- POST bodies must be ``Content-Type: application/json`` (see ``common.read_json``): the one
  type a simple cross-site request cannot send.

With an API key the key decides (a foreign page has no key, and CORS preflights are not
answered, so a browser never sends one cross-site), and Host and Origin are not checked
unless ``AUTOEMBED_HTTP_ALLOWED_HOSTS`` (or ``..._ORIGINS``) is set; ``*`` turns a check off,
which is refused without a key.

Starlette's ``TrustedHostMiddleware`` was not used: it ignores the port (another local
program on another port would pass), answers in plain text rather than the API's JSON
errors, and does not look at ``Origin``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import Settings
from ..errors import ConfigError
from .common import HTTPError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def split_host(value: str, default_port: int | None = 80) -> tuple[str, int | None] | None:
    """``name[:port]`` or ``[v6]:port`` as (lowercase name without brackets or trailing
    dot, port); None if it is not one."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
    elif value.count(":") > 1:  # a bare IPv6 address, no port
        name, port_text = value, ""
    else:
        name, _, port_text = value.partition(":")
    name = name.rstrip(".")
    if not name or any(c in name for c in "/?#@ \\"):
        return None
    if not port_text:
        return name, default_port
    if not port_text.isdigit() or int(port_text) > 65535:
        return None
    return name, int(port_text)


def _entries(text: str) -> list[str]:
    return [e.strip() for e in text.split(",") if e.strip()]


@dataclass(frozen=True)
class HostPolicy:
    check_hosts: bool
    check_origins: bool
    hosts: frozenset[tuple[str, int | None]]  # configured: (name, port or None for any)
    origins: frozenset[str]  # configured, normalised: scheme://host[:port] or "null"

    @classmethod
    def from_settings(cls, settings: Settings) -> HostPolicy:
        """The policy the settings ask for; ConfigError for an entry that is not a host
        or an origin, or a ``*`` without an API key."""
        keyed = bool(settings.api_key)
        host_entries = _entries(settings.http_allowed_hosts)
        origin_entries = _entries(settings.http_allowed_origins)
        for var, entries in (
            ("AUTOEMBED_HTTP_ALLOWED_HOSTS", host_entries),
            ("AUTOEMBED_HTTP_ALLOWED_ORIGINS", origin_entries),
        ):
            if "*" in entries and not keyed:
                raise ConfigError(
                    f"{var}=* turns off the check that keeps web pages from using this "
                    "API (DNS rebinding, cross-site requests); without an API key it is "
                    "the only protection. Name the hosts or origins, or set AUTOEMBED_API_KEY"
                )
        hosts = set()
        for entry in host_entries:
            if entry == "*":
                continue
            parsed = split_host(entry, None)
            if parsed is None:
                raise ConfigError(
                    f"AUTOEMBED_HTTP_ALLOWED_HOSTS: {entry!r} is not a host name or "
                    "name:port (e.g. embed.example.com or 10.0.0.5:8080)"
                )
            hosts.add(parsed)
        origins = {
            o for o in (_origin_entry(e) for e in origin_entries if e != "*") if o is not None
        }
        check_hosts = not keyed or (bool(host_entries) and "*" not in host_entries)
        check_origins = check_hosts or (bool(origin_entries) and "*" not in origin_entries)
        return cls(check_hosts, check_origins, frozenset(hosts), frozenset(origins))

    def host_allowed(self, host: str | None, server: tuple[str, int] | None) -> bool:
        """Whether ``host`` (a Host header's value) names this server; ``server`` is the
        address the connection came in on (the ASGI scope's ``server``)."""
        if host is None:
            return False
        parsed = split_host(host)
        return parsed is not None and self._ours(*parsed, server)

    def origin_allowed(self, origin: str, server: tuple[str, int] | None) -> bool:
        normal = _normal_origin(origin)
        if normal is None:
            return False
        if normal in self.origins:
            return True
        if normal == "null":
            return False
        parts = urlsplit(normal)
        port = parts.port or DEFAULT_PORTS[parts.scheme]
        return parts.hostname is not None and self._ours(parts.hostname, port, server)

    def _ours(self, name: str, port: int | None, server: tuple[str, int] | None) -> bool:
        if (name, port) in self.hosts or (name, None) in self.hosts:
            return True
        if server is None:
            return False
        own = {*LOOPBACK_NAMES, str(server[0]).lower()}
        return name in own and port == server[1]


def _normal_origin(value: str) -> str | None:
    """``scheme://host[:port]`` in lowercase without the scheme's default port, "null", or
    None if it is neither."""
    value = value.strip().lower()
    if value == "null":
        return value
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username or parts.password:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and port != DEFAULT_PORTS[parts.scheme]:
        host += f":{port}"
    return f"{parts.scheme}://{host}"


def _origin_entry(entry: str) -> str | None:
    normal = _normal_origin(entry)
    if normal is None:
        raise ConfigError(
            f"AUTOEMBED_HTTP_ALLOWED_ORIGINS: {entry!r} is not an origin "
            "(scheme://host[:port], e.g. https://app.example.com, or null)"
        )
    return normal


class HostGuard:
    """ASGI middleware: refuses a request whose Host (400) or Origin (403) is not allowed."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.policy.check_origins:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        server = _server(scope)
        host = headers.get("host")
        if self.policy.check_hosts and not self.policy.host_allowed(host, server):
            error = HTTPError(
                400,
                f"Host {host!r} does not name this server; if it should, add it to "
                "AUTOEMBED_HTTP_ALLOWED_HOSTS",
                code="invalid_host",
            )
            await error.response()(scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is not None and not self.policy.origin_allowed(origin, server):
            error = HTTPError(
                403,
                f"requests from web pages at {origin!r} are refused; if that page should use "
                "this API, add its origin to AUTOEMBED_HTTP_ALLOWED_ORIGINS",
                code="origin_not_allowed",
            )
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _server(scope: Scope) -> tuple[str, int] | None:
    server: Any = scope.get("server")
    if isinstance(server, tuple | list) and len(server) == 2 and server[1] is not None:
        return str(server[0]), int(server[1])
    return None
