"""A Redis Cluster's slot map: which primary serves which hash slot, and how to read it.

:class:`SlotMap` is pure (parsed from ``CLUSTER SLOTS``, unit-tested without
Redis); :func:`discover` asks the first node that answers; :func:`cluster_client`
is a redis-py ``RedisCluster`` for key-routed commands (history scripts and
rules, the Emitter).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from ..errors import PhxError
from . import redis_connect

try:
    import redis
except ImportError:  # pragma: no cover
    redis = None  # type: ignore[assignment]

__all__ = ["Address", "ClusterVersionError", "MIN_VERSION", "SlotMap", "cluster_client", "discover", "redis_version"]

#: The oldest Redis whose cluster has sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``), which the adapter uses.
MIN_VERSION = (7, 0)


class ClusterVersionError(PhxError, RuntimeError):
    """The Redis Cluster runs a Redis older than :data:`MIN_VERSION`: its pub/sub cannot be sharded."""


#: A node: ``(host, port)``.
Address = tuple[str, int]


class SlotMap:
    """Which primary serves which hash slot (from ``CLUSTER SLOTS``); pure, no I/O."""

    def __init__(self, ranges: Sequence[tuple[int, int, Address]]) -> None:
        self.ranges = sorted(ranges)
        self._starts = [r[0] for r in self.ranges]

    @classmethod
    def from_reply(cls, reply: Any, default_host: str) -> SlotMap:
        """Parse a RESP2 ``CLUSTER SLOTS`` reply (an empty host means the node we asked)."""
        ranges = []
        for entry in reply:
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            ranges.append((start, end, (host if host and host != "?" else default_host, int(primary[1]))))
        return cls(ranges)

    def owner(self, slot: int) -> Address | None:
        """The primary of ``slot``, or ``None`` when no node serves it."""
        i = bisect.bisect_right(self._starts, slot) - 1
        if i >= 0:
            start, end, address = self.ranges[i]
            if start <= slot <= end:
                return address
        return None

    def primaries(self) -> set[Address]:
        """Every primary that serves at least one slot."""
        return {r[2] for r in self.ranges}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SlotMap) and self.ranges == other.ranges

    __hash__ = None  # type: ignore[assignment]


def discover(target: redis_connect.RedisTarget, seeds: Sequence[Address], timeout: float = 2.0) -> SlotMap:
    """The slot map, asked of the first of ``seeds`` that answers; raises ``redis.ConnectionError`` if none does."""
    errors = []
    for host, port in seeds:
        conn = target.node_connection(host, port, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            conn.connect()
            conn.send_command("CLUSTER", "SLOTS", check_health=False)
            reply = conn.read_response()
            if isinstance(reply, Exception):
                raise reply
            if reply:
                version = _server_version(conn)
                if version is not None and version < MIN_VERSION:
                    raise ClusterVersionError(
                        f"the Redis Cluster node {host}:{port} runs Redis {'.'.join(map(str, version))}: "
                        "phx_gevent's cluster mode needs Redis 7 or newer (sharded pub/sub: SPUBLISH, "
                        "SSUBSCRIBE). Upgrade the cluster, or use one Redis (redis://) or Sentinel (redis+sentinel://)."
                    )
                return SlotMap.from_reply(reply, host)
            errors.append(f"{host}:{port}: no slots assigned")
        except (redis.RedisError, OSError) as exc:
            errors.append(f"{host}:{port}: {type(exc).__name__}: {exc}")
        finally:
            conn.disconnect()
    raise redis.ConnectionError("no Redis Cluster node answered CLUSTER SLOTS (" + "; ".join(errors) + ")")


def redis_version(info: Any) -> tuple[int, ...] | None:
    """``(major, minor, ...)`` from the text of ``INFO server``; ``None`` when it has no ``redis_version``."""
    text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("redis_version:"):
            try:
                return tuple(int(part) for part in line.split(":", 1)[1].strip().split("."))
            except ValueError:
                return None
    return None


def _server_version(conn: Any) -> tuple[int, ...] | None:
    # Managed services may refuse INFO: then nothing is known and nothing is refused.
    try:
        conn.send_command("INFO", "server", check_health=False)
        reply = conn.read_response()
    except redis.ResponseError:
        return None
    return None if isinstance(reply, Exception) else redis_version(reply)


def cluster_client(target: redis_connect.RedisTarget, **options: Any) -> Any:
    """A redis-py ``RedisCluster`` client for ``target`` (history reads, rules, the Emitter): routes by key."""
    from redis.cluster import ClusterNode, RedisCluster

    kwargs = {k: v for k, v in target.kwargs.items() if k not in ("host", "port", "db", "connection_class", "path")}
    kwargs.update(options)
    if target.tls:
        kwargs["ssl"] = True
    nodes = [ClusterNode(host, port) for host, port in target.nodes]
    return RedisCluster(startup_nodes=nodes, **kwargs)
