"""Where Redis is and how to reach it: one parser for the adapter, the history store and the Emitter.

:func:`target` turns what a user passes as ``pubsub=`` (or to
:class:`~phx_gevent.Emitter`) into a :class:`RedisTarget`, validating it
before anything connects:

``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS), ``unix:///path.sock?db=0``
    One Redis server (ACL users in the user part; TLS files as options or
    query arguments: ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
    ``ssl_cert_reqs``).
``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]`` (``rediss+sentinel://``)
    A primary found through Redis Sentinel. Each new connection asks the
    sentinels for the current primary, so a reconnection after a failover
    reaches the promoted replica. The user part is the data nodes'; the
    sentinels' own credentials are the options ``sentinel_username`` and
    ``sentinel_password``.
``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://``), or a list of nodes
    A Redis Cluster (7+). The nodes are where discovery starts (``CLUSTER
    SLOTS``); the others are found. Only database 0 exists there.

Nothing here ever prints a password: :meth:`RedisTarget.describe` is what logs
and reprs show.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

try:
    import redis
    from redis.connection import SSLConnection, parse_url
    from redis.sentinel import Sentinel, SentinelConnectionPool
except ImportError:  # pragma: no cover - redis-py is a requirement, but fail clearly without it
    redis = None  # type: ignore[assignment]

__all__ = ["RedisTarget", "target", "SSL_OPTIONS"]

#: Options that only mean something over TLS.
SSL_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_ca_path", "ssl_check_hostname")
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
_SCHEMES = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("single", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
_FORMS = (
    "redis://[user:password@]host:6379/0, rediss://... (TLS), unix:///path/redis.sock?db=0, "
    "redis+sentinel://host:26379[,host:26379]/<primary name>[/db], or "
    "redis+cluster://host:7000[,host:7001] (rediss+... for TLS)"
)


@dataclass(frozen=True, repr=False)
class RedisTarget:
    """A validated Redis location: one server, a Sentinel-managed primary or a Cluster.

    ``kind`` is ``"single"``, ``"sentinel"`` or ``"cluster"``; ``nodes`` the
    ``(host, port)`` pairs of the sentinels or of the cluster's seed nodes
    (empty for a single server); ``service`` the Sentinel primary's name;
    ``tls`` whether connections use TLS; ``kwargs`` the redis-py connection
    keyword arguments of a data node (secrets included: never log them).
    """

    kind: str
    nodes: tuple[tuple[str, int], ...]
    service: str | None
    tls: bool
    kwargs: dict[str, Any] = field(hash=False)
    sentinel_kwargs: dict[str, Any] = field(hash=False, default_factory=dict)
    url: str | None = None

    def __repr__(self) -> str:
        return f"<RedisTarget {self.describe()}>"

    def describe(self) -> str:
        """Where Redis is, for logs and reprs: scheme, user, hosts, never a password."""
        kw = self.kwargs
        scheme = "rediss" if self.tls else "redis"
        user = kw.get("username")
        auth = f"{quote(str(user), safe='')}:***@" if user else ("***@" if kw.get("password") else "")
        hosts = ",".join(f"{h}:{p}" for h, p in self.nodes)
        if self.kind == "cluster":
            return f"{scheme}+cluster://{auth}{hosts}"
        if self.kind == "sentinel":
            return f"{scheme}+sentinel://{auth}{hosts}/{self.service}/{kw.get('db', 0)}"
        if "path" in kw:
            return f"unix://{auth}{kw['path']}?db={kw.get('db', 0)}"
        return f"{scheme}://{auth}{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"

    # -- single server and Sentinel: a redis-py pool -----------------------------------------

    def pool(self, *, blocking: bool = False, max_connections: int | None = None, timeout: float = 5.0) -> Any:
        """A redis-py connection pool to the (current) primary; raises ``ValueError`` for a cluster.

        Under Sentinel each new connection asks the sentinels where the
        primary is, so reconnecting after a failover reaches the new one.
        ``blocking``: a ``BlockingConnectionPool`` (callers wait for a free
        connection at most ``timeout`` seconds).
        """
        if self.kind == "cluster":
            raise ValueError("a Redis Cluster has no single connection pool: use the cluster's node connections")
        kwargs = dict(self.kwargs)
        if self.kind == "sentinel":
            sentinel = Sentinel(list(self.nodes), sentinel_kwargs=self.sentinel_kwargs)
            kwargs.pop("connection_class", None)
            base = SentinelConnectionPool(self.service, sentinel, ssl=self.tls, **kwargs)
            if not blocking:
                return base
            # Same connections (each resolves the primary when it connects), blocking when all are busy;
            # the Sentinel pool stays referenced so that a failover can still disconnect idle connections.
            pool = redis.BlockingConnectionPool(
                connection_class=base.connection_class,
                max_connections=max_connections or 50,
                timeout=timeout,
                **base.connection_kwargs,
            )
            pool._phx_sentinel_pool = base  # type: ignore[attr-defined]
            return pool
        if blocking:
            return redis.BlockingConnectionPool(max_connections=max_connections or 50, timeout=timeout, **kwargs)
        return redis.ConnectionPool(**kwargs)

    # -- Cluster: one connection per node, made by the caller's router ----------------------

    def node_connection(self, host: str, port: int, **overrides: Any) -> Any:
        """A new, unconnected redis-py ``Connection`` to one cluster node (TLS and credentials applied)."""
        kwargs = {
            k: v for k, v in self.kwargs.items() if k not in ("connection_class", "db", "path", "ssl", "host", "port")
        }
        kwargs.update(overrides)
        cls = SSLConnection if self.tls else redis.Connection
        return cls(host=host, port=int(port), **kwargs)


def _split_hosts(text: str, default_port: int, what: str) -> tuple[tuple[str, int], ...]:
    hosts: list[tuple[str, int]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", part)
        if m is None:
            raise ValueError(f"cannot read {what} {part!r}: write host:port (an IPv6 address as [::1]:port)")
        host = unquote(m.group(1) or m.group(3))
        port = int(m.group(2) or m.group(4) or default_port)
        if not 0 < port < 65536:
            raise ValueError(f"{what} {part!r} has port {port}, outside 1-65535")
        hosts.append((host, port))
    if not hosts:
        raise ValueError(f"no {what} given: write at least one host:port")
    return tuple(hosts)


def _nodes_list(nodes: Iterable[Any]) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for node in nodes:
        if isinstance(node, str):
            out.extend(_split_hosts(node, 6379, "cluster node"))
        elif isinstance(node, Sequence) and len(node) == 2:
            out.extend(_split_hosts(f"{node[0]}:{int(node[1])}", 6379, "cluster node"))
        else:
            raise ValueError(f"a cluster node is 'host:port' or (host, port), got {node!r}")
    if not out:
        raise ValueError("an empty list of cluster nodes: give at least one 'host:port'")
    return tuple(out)


def target(url: str | Sequence[Any] | RedisTarget, **options: Any) -> RedisTarget:
    """Parse and validate where Redis is (see the module docstring); connects nothing.

    ``options`` are redis-py connection options (``password``, ``username``,
    ``ssl_ca_certs``, ``socket_timeout``...) plus ``sentinel_username`` /
    ``sentinel_password``. Raises ``ValueError`` naming the fix for a URL or
    an option that cannot work (an unknown scheme, no Sentinel service name, a
    database other than 0 on a cluster, TLS files without TLS, ...).
    """
    if redis is None:  # pragma: no cover
        raise ImportError("Redis support needs redis-py: pip install 'phx_gevent[redis]'")
    if isinstance(url, RedisTarget):
        return url
    options = dict(options)
    sentinel_kwargs = {k.removeprefix("sentinel_"): options.pop(k) for k in _SENTINEL_OPTIONS if k in options}
    if not isinstance(url, str):
        if isinstance(url, (bytes, bytearray)) or not isinstance(url, (Sequence, Iterable)):
            raise TypeError(f"a Redis location is a URL string or a list of cluster nodes, got {type(url).__name__}")
        nodes = _nodes_list(url)
        tls = bool(options.pop("ssl", False)) or any(k in options for k in SSL_OPTIONS)
        kwargs = _node_kwargs(f"{'rediss' if tls else 'redis'}://{nodes[0][0]}:{nodes[0][1]}/0", options, tls)
        return RedisTarget("cluster", nodes, None, tls, kwargs, {}, None)
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", url)
    scheme = m.group(1).lower() if m else ""
    if scheme not in _SCHEMES:
        shown = f"{scheme}://" if scheme else "no scheme"
        raise ValueError(f"unsupported Redis URL ({shown}); write one of: {_FORMS}")
    kind, tls = _SCHEMES[scheme]
    if not tls:
        given = [k for k in SSL_OPTIONS if k in options or re.search(rf"[?&]{k}=", url)]
        if given:
            raise ValueError(f"{', '.join(given)} given for a plain-text URL: write rediss://... to use TLS")
    if kind == "single":
        kwargs = _node_kwargs(url, options, tls)
        if scheme == "unix" and not kwargs.get("path"):
            raise ValueError("unix:// URL without a socket path: write unix:///run/redis/redis.sock?db=0")
        return RedisTarget("single", (), None, tls, kwargs, {}, url)
    rest = url[m.end() :] if m else url
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    userinfo, at, hostpart = netloc.rpartition("@")
    base = "rediss" if tls else "redis"
    if kind == "sentinel":
        nodes = _split_hosts(hostpart, 26379, "sentinel")
        parts = [unquote(p) for p in path.split("/") if p]
        if not parts:
            raise ValueError(
                "redis+sentinel:// needs the primary's name after the hosts: "
                "redis+sentinel://host:26379,host:26380/mymaster/0"
            )
        service, db = parts[0], parts[1] if len(parts) > 1 else "0"
        if len(parts) > 2 or not db.isdigit():
            raise ValueError(
                f"cannot read {'/'.join(parts)!r} as <primary name>/<db>: e.g. redis+sentinel://h:26379/mymaster/0"
            )
        single = f"{base}://{userinfo}{at}{nodes[0][0]}:{nodes[0][1]}/{db}" + (f"?{query}" if query else "")
        kwargs = _node_kwargs(single, options, tls)
        kwargs.pop("host", None)
        kwargs.pop("port", None)
        skw = {k: v for k, v in kwargs.items() if k.startswith(("socket_", "ssl"))}
        skw.update(sentinel_kwargs)
        return RedisTarget("sentinel", nodes, service, tls, kwargs, skw, None)
    nodes = _split_hosts(hostpart, 6379, "cluster node")
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"Redis Cluster has only database 0: drop '/{path.strip('/')}' from the URL")
    single = f"{base}://{userinfo}{at}{nodes[0][0]}:{nodes[0][1]}/0" + (f"?{query}" if query else "")
    kwargs = _node_kwargs(single, options, tls)
    return RedisTarget("cluster", nodes, None, tls, kwargs, {}, None)


def _node_kwargs(url: str, options: dict[str, Any], tls: bool) -> dict[str, Any]:
    try:
        kwargs = parse_url(url)
    except ValueError as exc:
        raise ValueError(f"cannot parse the Redis URL: {exc}; write one of: {_FORMS}") from None
    kwargs.update(options)
    if tls:
        kwargs["connection_class"] = SSLConnection
    if kwargs.get("password") and not kwargs.get("username") and options.get("username") is None:
        kwargs.pop("username", None)
    # Keep the pool's defaults out: RESP2 everywhere (pub/sub arrays, every Redis speaks it).
    kwargs["protocol"] = 2
    return kwargs
