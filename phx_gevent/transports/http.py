"""What both transports do with the HTTP request: params, hosts, connect_info, auth token (origin: origin.py).

Everything here reads a WSGI environ and nothing else, so it is shared by
the WebSocket handshake and long-poll session creation.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

from ..errors import PhxError
from .origin import OriginSetting, check_origin, compile_check_origin, compile_origins, host_of, origin_refusal

__all__ = [
    "URI",
    "parse_params",
    "OriginSetting",
    "check_origin",
    "compile_check_origin",
    "compile_origins",
    "origin_refusal",
    "connect_info",
    "split_protocols",
    "AUTH_TOKEN_PREFIX",
    "decode_auth_token",
    "CONNECT_INFO_KEYS",
    "CSRF_SESSION_KEY",
    "csrf_token",
    "close_after",
    "ENVIRON_CLOSE",
    "compile_hosts",
    "host_allowed",
    "LOOPBACK_HOSTS",
    "compile_proxies",
    "client_address",
    "ENVIRON_PEER",
]

#: The host names ``serve()``/``make_server()`` accept by default when bound to a loopback address.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

#: Environ key: the TCP peer's address when a trusted proxy's header replaced ``REMOTE_ADDR``.
ENVIRON_PEER = "phx_gevent.peer_addr"


class _HostRule(NamedTuple):
    host: str
    wildcard: bool


def compile_hosts(hosts: Any) -> list[_HostRule] | None:
    """Parse an ``allowed_hosts`` setting: ``None`` (no check) or a list of host names.

    ``"*.example.com"`` matches the domain's subdomains (not the domain
    itself), ``"*"`` matches anything; ports are ignored, IPv6 literals may be
    given with or without brackets. Raises ``ValueError`` for a string (a
    common slip: it would be a list of letters) or an empty entry.
    """
    if hosts is None:
        return None
    if isinstance(hosts, (str, bytes)) or not isinstance(hosts, Iterable):
        raise ValueError(f"allowed_hosts must be None or a list of host names, got {hosts!r}")
    rules = []
    for entry in hosts:
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"allowed_hosts entries must be non-empty strings, got {entry!r}")
        entry = entry.strip().lower()
        if entry.startswith("[") and entry.endswith("]"):
            entry = entry[1:-1]
        if entry.startswith("*."):
            rules.append(_HostRule(entry[2:], True))
        else:
            rules.append(_HostRule(entry, False))
    return rules


def host_allowed(environ: Mapping[str, Any], rules: list[_HostRule] | None) -> bool:
    """Whether the request's ``Host`` header (else ``SERVER_NAME``) matches ``rules`` (``None``: always)."""
    if rules is None:
        return True
    raw = environ.get("HTTP_HOST")
    if raw is None:
        raw = environ.get("SERVER_NAME", "")
    if "," in raw:
        return False  # several Host headers (joined by the server): refused, never guessed
    host = host_of(raw)
    if host is None:
        return False
    for rule in rules:
        if rule.host == "*" or host == rule.host or (rule.wildcard and host.endswith("." + rule.host)):
            return True
    return False


def compile_proxies(proxies: Any) -> list[Any]:
    """Parse a ``trusted_proxies`` setting: addresses or networks (``"10.0.0.0/8"``); raises ``ValueError``."""
    import ipaddress

    if proxies is None:
        return []
    if isinstance(proxies, (str, bytes)) or not isinstance(proxies, Iterable):
        raise ValueError(f"trusted_proxies must be a list of addresses or networks, got {proxies!r}")
    return [ipaddress.ip_network(str(p).strip(), strict=False) for p in proxies]


def _ip(value: str) -> Any:
    import ipaddress

    try:
        addr = ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        return None
    mapped = getattr(addr, "ipv4_mapped", None)
    return mapped if mapped is not None else addr


def client_address(environ: Mapping[str, Any], proxies: list[Any]) -> str | None:
    """The client's address behind trusted proxies, or ``None`` when ``REMOTE_ADDR`` is not one of them.

    Reads ``X-Forwarded-For`` from the right: each hop that is itself a
    trusted proxy is skipped, the first one that is not is the client (what
    a client writes into the header itself, further left, is never
    believed). All hops trusted: the leftmost.
    """
    if not proxies:
        return None
    peer = _ip(environ.get("REMOTE_ADDR") or "")
    if peer is None or not any(peer in net for net in proxies):
        return None
    header = environ.get("HTTP_X_FORWARDED_FOR")
    if not header:
        return None
    hops = [h.strip() for h in header.split(",") if h.strip()]
    for hop in reversed(hops):
        ip = _ip(hop)
        if ip is None:
            return None  # garbage in the chain: keep the proxy's own address
        if not any(ip in net for net in proxies):
            return str(ip)
    ip = _ip(hops[0]) if hops else None
    return str(ip) if ip is not None else None


#: Environ key: the WSGI handler closes the connection after this response without reading the rest of the body.
ENVIRON_CLOSE = "phx_gevent.close_connection"


def close_after(response: Any) -> Any:
    """Mark ``response`` (a Flask response of the current request) as the last one on its connection.

    It carries ``Connection: close``, and phx_gevent's WSGI handler closes
    the connection after it without reading (or discarding) what is left of
    the request body: an unwanted upload costs nothing more. Returns
    ``response``. Outside a request, only the header is set.
    """
    from flask import has_request_context, request

    response.headers["Connection"] = "close"
    if has_request_context():
        request.environ[ENVIRON_CLOSE] = True
    return response


#: The subprotocol entry phoenix.js uses to carry ``authToken`` (PROTOCOL.md 3.4).
AUTH_TOKEN_PREFIX = "base64url.bearer.phx."

#: The connect_info keys a mount may ask for (besides static ``{"key": value}`` pairs).
CONNECT_INFO_KEYS = frozenset(
    {"peer_data", "x_headers", "uri", "user_agent", "trace_context_headers", "sec_websocket_headers", "session"}
)

#: Where :func:`csrf_token` keeps the token in the Flask session.
CSRF_SESSION_KEY = "_phx_csrf_token"


def csrf_token() -> str:
    """The CSRF token of the current Flask session (created on first use), like Phoenix's ``get_csrf_token()``.

    Render it into the page and pass it as the ``_csrf_token`` connect param
    (``new Socket("/socket", {params: {_csrf_token: token}})``); a socket
    mounted with ``connect_info=["session"]`` then gets the session. Call
    it inside a request (it reads and may write ``flask.session``, so the
    app needs a ``SECRET_KEY``); raises ``RuntimeError`` outside one.
    """
    from flask import session

    token = session.get(CSRF_SESSION_KEY)
    if not isinstance(token, str) or not token:
        token = session[CSRF_SESSION_KEY] = secrets.token_urlsafe(32)
    return token


def _session(params: Mapping[str, Any], check_csrf: bool, csrf_token_key: str) -> dict[str, Any] | None:
    """``connect_info["session"]``: the Flask session, only with a valid CSRF token (PROTOCOL.md 3.5)."""
    from flask import has_request_context, session

    if not has_request_context():
        return None
    data = dict(session)
    if check_csrf:
        # A page on another site can open a WebSocket with our cookies, but it
        # cannot read the token rendered into our pages: without it, no session.
        expected = data.get(CSRF_SESSION_KEY)
        given = params.get(csrf_token_key)
        if not isinstance(expected, str) or not isinstance(given, str):
            return None
        if not hmac.compare_digest(expected.encode(), given.encode()):
            return None
    return data


# Limits on query parameters: more fields or deeper nesting is refused (403).
MAX_PARAMS = 1000
MAX_DEPTH = 16


class URI(NamedTuple):
    """``connect_info["uri"]``: the request URI, as Phoenix's ``%URI{}``."""

    scheme: str
    host: str
    port: int
    path: str
    query: str


class ParamsError(PhxError, ValueError):
    """The query string is too big or too deep."""


def _parse_key(key: str) -> list[str]:
    # Plug's nested syntax, which phoenix.js produces: a[b][c]=v, a[]=v
    if "[" not in key or not key.endswith("]"):
        return [key]
    head, _, rest = key.partition("[")
    parts = [head]
    for piece in rest[:-1].split("]["):
        parts.append(piece)
    if len(parts) > MAX_DEPTH:
        raise ParamsError("query parameter nested too deep")
    return parts


def parse_params(query: str) -> dict[str, Any]:
    """Decode a query string into nested dicts (``a[b]=c`` → ``{"a": {"b": "c"}}``).

    ``a[]=1&a[]=2`` gives a list. A key seen as both a value and a nested map
    keeps the first shape. Raises :class:`ParamsError` past 1000 fields or 16
    levels.
    """
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_PARAMS)
    except ValueError as exc:
        raise ParamsError(str(exc)) from None
    params: dict[str, Any] = {}
    for key, value in pairs:
        _assign(params, _parse_key(key), value)
    return params


def _assign(target: dict[str, Any], parts: list[str], value: str) -> None:
    for i, part in enumerate(parts[:-1]):
        if parts[i + 1] == "" and i + 2 == len(parts):
            # a[]=v appends to a list
            items = target.setdefault(part, [])
            if isinstance(items, list):
                items.append(value)
            return
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            return  # a[b]=1 after a=1: keep the first shape
        target = child
    last = parts[-1]
    if last and not isinstance(target.get(last), (dict, list)):
        target[last] = value


def split_protocols(header: str | None) -> list[str]:
    """The entries of a ``Sec-WebSocket-Protocol`` header."""
    if not header:
        return []
    return [p.strip() for p in header.split(",") if p.strip()]


def decode_auth_token(entry: str) -> str | None:
    """Decode the token phoenix.js puts after ``base64url.bearer.phx.``; None when malformed.

    phoenix.js uses *standard* base64 without padding despite the prefix's
    name; both alphabets and optional padding are accepted.
    """
    data = entry[len(AUTH_TOKEN_PREFIX) :].strip().rstrip("=")
    data += "=" * (-len(data) % 4)
    try:
        raw = base64.b64decode(data.replace("-", "+").replace("_", "/"), validate=True)
        return raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None


def connect_info(
    environ: Mapping[str, Any],
    keys: Iterable[Any],
    extra: Mapping[str, Any] | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    check_csrf: bool = True,
    csrf_token_key: str = "_csrf_token",
) -> dict[str, Any]:
    """Build ``connect_info`` with only the keys asked for (PROTOCOL.md 3.5).

    Shapes: ``peer_data`` → ``{"address": str, "port": int, "ssl_cert": None}``;
    ``x_headers``, ``trace_context_headers`` and ``sec_websocket_headers`` →
    lists of ``(lowercase name, value)``; ``uri`` → :class:`URI`;
    ``user_agent`` → ``str`` or ``None``; ``session`` → a copy of the Flask
    session as a ``dict``, or ``None`` unless ``params[csrf_token_key]`` is
    the session's :func:`csrf_token` (when ``check_csrf``). A mapping among
    ``keys`` is copied as static pairs. Cookies and other headers are never
    exposed. Raises ``ValueError`` for an unknown key.
    """
    info: dict[str, Any] = {}
    for key in keys:
        if isinstance(key, Mapping):
            info.update(key)
        elif key == "session":
            info["session"] = _session(params or {}, check_csrf, csrf_token_key)
        elif key == "peer_data":
            try:
                port = int(environ.get("REMOTE_PORT") or 0)
            except ValueError:
                port = 0
            info["peer_data"] = {"address": environ.get("REMOTE_ADDR", ""), "port": port, "ssl_cert": None}
        elif key == "user_agent":
            info["user_agent"] = environ.get("HTTP_USER_AGENT")
        elif key == "uri":
            scheme = environ.get("wsgi.url_scheme", "http")
            host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "")
            hostname = host_of(host) or ""
            try:
                port = urlsplit("//" + host).port or int(environ.get("SERVER_PORT") or 0)
            except ValueError:
                port = 0
            info["uri"] = URI(scheme, hostname, port, environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""))
        elif key in ("x_headers", "trace_context_headers", "sec_websocket_headers"):
            info[key] = _headers(environ, key)
        else:
            raise ValueError(f"unknown connect_info key {key!r}")
    if extra:
        info.update(extra)
    return info


def _headers(environ: Mapping[str, Any], kind: str) -> list[tuple[str, str]]:
    found = []
    for name, value in environ.items():
        if not name.startswith("HTTP_"):
            continue
        header = name[5:].lower().replace("_", "-")
        if kind == "x_headers" and header.startswith("x-"):
            found.append((header, value))
        elif kind == "trace_context_headers" and header in ("traceparent", "tracestate"):
            found.append((header, value))
        elif kind == "sec_websocket_headers" and header.startswith("sec-websocket-"):
            found.append((header, value))
    return found
