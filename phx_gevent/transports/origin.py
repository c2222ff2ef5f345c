"""``check_origin``: which pages may open a socket (PROTOCOL.md 3.3), and the refusal that names the fix.

Reads a WSGI environ and nothing else; shared by the WebSocket handshake and
long-poll session creation (re-exported by :mod:`phx_gevent.transports.http`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit

__all__ = ["OriginSetting", "check_origin", "compile_check_origin", "compile_origins", "host_of", "origin_refusal"]


def host_of(value: str) -> str | None:
    """The lower-case host name of a URL or ``host[:port]``, or ``None``."""
    try:
        host = urlsplit(value if "//" in value else "//" + value).hostname
    except ValueError:
        return None
    return host.lower() if host else None


class _OriginRule(NamedTuple):
    scheme: str | None
    host: str
    port: int | None
    wildcard: bool


#: A compiled ``check_origin``: on/off, allowed origins, or ``f(origin, environ) -> bool``.
OriginSetting = bool | list[_OriginRule] | Callable[[str, Mapping[str, Any]], bool]


def compile_check_origin(setting: Any) -> OriginSetting:
    """A ``check_origin`` option as the endpoint, a mount or a transport takes it, compiled once.

    ``True``/``False``/a callable are kept; a string or a list of origins
    becomes rules (:func:`compile_origins`, which raises ``ValueError`` for a
    malformed origin).
    """
    if setting is True or setting is False or callable(setting):
        return setting
    if isinstance(setting, str):
        setting = [setting]
    return compile_origins(setting)


def compile_origins(origins: Iterable[str]) -> list[_OriginRule]:
    """Parse a list of allowed origins: ``//example.com``, ``https://*.example.com:8443``.

    A component missing from an entry matches anything; ``*.`` matches the
    domain itself and every subdomain (PROTOCOL.md 3.3). Raises ``ValueError``
    for an entry without a host.
    """
    rules = []
    for entry in origins:
        parts = urlsplit(entry if "//" in entry else "//" + entry)
        host = (parts.hostname or "").lower()
        if not host:
            raise ValueError(f"check_origin entry {entry!r} has no host")
        wildcard = host.startswith("*.")
        if wildcard:
            host = host[2:]
        port = parts.port
        if port is None and parts.scheme in ("http", "https"):
            port = 80 if parts.scheme == "http" else 443
        rules.append(_OriginRule(parts.scheme or None, host, port, wildcard))
    return rules


def _origin_port(parts: Any) -> int | None:
    try:
        port = parts.port
    except ValueError:
        return None
    if port is None:
        return {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(parts.scheme)
    return port


def check_origin(environ: Mapping[str, Any], setting: OriginSetting, server_name: str | None = None) -> bool:
    """Apply ``check_origin`` to a request (PROTOCOL.md 3.3, DESIGN.md security defaults).

    * no ``Origin`` header: allowed (native clients);
    * ``True``: the Origin's host must equal the request's ``Host`` (or the
      app's ``SERVER_NAME``), ports ignored; ``Origin: null`` is refused;
    * ``False``: everything passes;
    * a list of origins (compiled by :func:`compile_origins`);
    * a callable ``f(origin: str, environ) -> bool``.
    """
    origin = environ.get("HTTP_ORIGIN")
    if origin is None or setting is False:
        return True
    if callable(setting):
        return bool(setting(origin, environ))
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    if not host:
        return False
    if setting is True:
        allowed = {host_of(environ.get("HTTP_HOST", "")), host_of(server_name or "")}
        allowed.discard(None)
        return host in allowed
    port = _origin_port(parts)
    for rule in setting:
        if rule.scheme is not None and rule.scheme != parts.scheme:
            continue
        if rule.port is not None and rule.port != port:
            continue
        if host == rule.host or (rule.wildcard and host.endswith("." + rule.host)):
            return True
    return False


def origin_refusal(environ: Mapping[str, Any], setting: Any, what: str, path: str) -> str:
    """The warning logged when ``check_origin`` refuses a request: what came, and the setting that allows it.

    ``what`` names the transport ("WebSocket", "long-poll request") and
    ``path`` the socket's mount path.
    """
    origin = str(environ.get("HTTP_ORIGIN"))
    host = environ.get("HTTP_HOST", "")
    head = f"phx_gevent: refused a {what} to {path} from origin {origin!r} (request Host {host!r})"
    if origin == "null":
        return (
            f"{head}: browsers send 'null' for file:// pages and sandboxed iframes, which check_origin never "
            "allows by name; serve the page over http(s), or pass a callable check_origin=f(origin, environ)"
        )
    if callable(setting) and setting is not True:
        return f"{head}: your check_origin callable returned False for it"
    if not host_of(origin):
        return f"{head}: the Origin header is not a URL"
    why = (
        "it is not in the check_origin list"
        if isinstance(setting, list)
        else ("check_origin=True allows only pages served from the socket's own host (or SERVER_NAME)")
    )
    return (
        f"{head}: {why}. If that page is yours, allow it: "
        f"endpoint.socket({path!r}, ..., check_origin=[{origin!r}]) "
        f"(or Endpoint(app, check_origin=[...]) for every socket; '//{host_of(origin)}' allows any scheme "
        "and port). Behind a proxy, forward the browser's Host header instead (nginx: proxy_set_header Host $host)"
    )
