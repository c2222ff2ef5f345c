"""The Redis Cluster adapter: pub/sub sharded by topic over the cluster's primaries (Redis 7+).

``Endpoint(app, pubsub="redis+cluster://h1:7000,h2:7001")`` (or a list of
``"host:port"`` nodes) builds a :class:`RedisClusterAdapter`. Each topic's
channel ``<prefix>:t:{<topic>}`` hashes (by its ``{topic}`` tag, shared with
the topic's history keys) to one slot, and the slot to one shard primary.
The adapter keeps one :class:`~phx_gevent.pubsub.redis_shard.ShardAdapter`
per primary (its own publisher and subscriber connections, SPUBLISH and
SSUBSCRIBE), so:

- adding shards adds pub/sub capacity: a broadcast is carried by one shard,
  and a node subscribes on a shard only to the topics it has local interest in;
- losing one shard affects only the topics (and the direct channels) whose
  slots it holds; its connections reconnect with backoff and resubscribe when
  it (or the replica promoted in its place) is back;
- the slot map (``CLUSTER SLOTS``) is read at start, every
  ``refresh_interval`` seconds, and at once when Redis answers ``MOVED``/``ASK``,
  drops a subscription (a migrated slot) or a shard is unreachable; topics
  whose slot moved are unsubscribed from the old shard and subscribed on the
  new one, and their queued envelopes follow.

Only topic routing exists here (a single broadcast channel would not shard).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import gevent
from gevent.event import Event

from .. import supervise
from . import redis_connect
from .base import Adapter, make_node_name
from .redis import RedisAdapter
from .redis_shard import ShardAdapter
from .redis_slots import Address, ClusterVersionError, SlotMap, cluster_client, discover
from .redis_topology import Topology
from .routing import direct_channel, topic_channel

try:
    import redis
    from redis.crc import key_slot
except ImportError:  # pragma: no cover
    redis = None  # type: ignore[assignment]

__all__ = ["RedisClusterAdapter", "SlotMap", "cluster_client", "discover", "redis_adapter"]  # re-exported

log = logging.getLogger(__name__)

_monotonic = time.monotonic

# RedisAdapter's own options (the rest are redis-py connection options).
_ADAPTER_OPTIONS = frozenset(inspect.signature(RedisAdapter.__init__).parameters) - {
    "self",
    "url",
    "prefix",
    "redis_kwargs",
    "node_name",
    "routing",
}


def _after_fork(ref: weakref.ref[RedisClusterAdapter]) -> None:
    adapter = ref()
    if adapter is not None:
        adapter._forked()


def redis_adapter(url: str | Sequence[Any], prefix: str = "phx", **options: Any) -> Adapter:
    """The adapter for ``url``: :class:`RedisClusterAdapter` for a cluster URL or node list, else a RedisAdapter."""
    if isinstance(url, str) and not url.lower().startswith(("redis+cluster://", "rediss+cluster://")):
        return RedisAdapter(url, prefix, **options)
    return RedisClusterAdapter(url, prefix, **options)


class RedisClusterAdapter(Topology, Adapter):
    """Carries envelopes between nodes over a Redis Cluster, sharded by topic (see the module docstring).

    ``nodes``
        ``redis+cluster://[user:password@]h1:p1,h2:p2`` (``rediss+cluster://``
        for TLS) or a list of ``"host:port"`` / ``(host, port)``: where
        discovery starts. Raises ``ValueError`` when it cannot be parsed
        (nothing connects before :meth:`start`).
    ``refresh_interval``
        Seconds between two reads of the slot map (it is also read at once on
        ``MOVED``, a dropped subscription, or a shard that cannot be reached).
    Every other option of :class:`~phx_gevent.pubsub.redis.RedisAdapter`
    applies to each shard; other keyword arguments go to redis-py's
    connections (``password``, ``ssl_ca_certs``...).
    """

    requires_monkey_patching = True
    supports_history = True
    routing = "topic"

    def __init__(
        self,
        nodes: str | Sequence[Any],
        prefix: str = "phx",
        *,
        node_name: str | None = None,
        routing: str | None = None,
        refresh_interval: float = 5.0,
        **options: Any,
    ) -> None:
        if routing not in (None, "topic"):
            raise ValueError("a Redis Cluster shards by topic: routing must be 'topic' (leave it out)")
        if isinstance(nodes, str) and "routing=" in nodes:
            from .routing import split_routing

            nodes, routed = split_routing(nodes, None)
            if routed != "topic":
                raise ValueError(f"a Redis Cluster shards by topic: drop routing={routed} from the URL")
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ValueError(f"prefix must be a non-empty string without spaces, got {prefix!r}")
        if refresh_interval <= 0:
            raise ValueError(f"refresh_interval must be positive, got {refresh_interval!r}")
        self.shard_options = {k: v for k, v in options.items() if k in _ADAPTER_OPTIONS}
        redis_kwargs = {k: v for k, v in options.items() if k not in _ADAPTER_OPTIONS}
        self.connect_timeout = float(options.get("connect_timeout", 2.0))
        redis_kwargs.setdefault("socket_timeout", float(options.get("socket_timeout", 5.0)))
        redis_kwargs.setdefault("socket_connect_timeout", self.connect_timeout)
        #: Where the cluster is (:mod:`phx_gevent.pubsub.redis_connect`).
        self.target = redis_connect.target(nodes, **redis_kwargs)
        if self.target.kind != "cluster":
            raise ValueError(f"{self.target.describe()} is not a cluster URL: use RedisAdapter (or redis_adapter(url))")
        # A throw-away shard validates the per-shard options now (a bad value fails at configuration).
        RedisAdapter(redis_connect.RedisTarget("single", (), None, False, {"host": "127.0.0.1"}), **self.shard_options)
        self.url = nodes
        self.prefix = prefix
        self._node_auto = node_name is None
        self.node_name = node_name or make_node_name()
        self.refresh_interval = float(refresh_interval)
        self.max_pending = int(options.get("max_pending", 10_000))
        self.replay_window = float(options.get("replay_window", 10.0))
        self._on_history_fallback: Callable[[bytes], None] | None = None
        self._receive: Callable[[dict[str, Any]], None] | None = None
        self._history_client: Any = None
        self._running = False
        self._owner_pid = os.getpid()
        self._reset()
        os.register_at_fork(after_in_child=functools.partial(_after_fork, weakref.ref(self)))

    def _reset(self) -> None:
        self._map: SlotMap | None = None
        self._shards: dict[Address, ShardAdapter] = {}
        # Local holders per topic (the shards hold the channels; this survives re-homing).
        self._topics: dict[str, int] = {}
        # Envelopes waiting for a slot map (none yet, or re-routed after MOVED): (queued at, envelope|item).
        self._waiting: deque[tuple[float, Any]] = deque()
        self._gaps: dict[str, Any] = {}
        self._refresh_event = Event()
        self._stop = Event()
        self._greenlet: Any = None
        self._counters = {"refreshes": 0, "map_changes": 0, "rehomed": 0, "unrouted": 0, "moved": 0}
        self._log_refresh = supervise.LogLimiter(30.0)

    def __repr__(self) -> str:
        return f"<RedisClusterAdapter {self.target.describe()} prefix={self.prefix!r} node={self.node_name!r}>"

    @property
    def on_history_fallback(self) -> Callable[[bytes], None] | None:
        """Set by the PubSub: delivers locally a history broadcast that could not be appended (every shard)."""
        return self._on_history_fallback

    @on_history_fallback.setter
    def on_history_fallback(self, callback: Callable[[bytes], None] | None) -> None:
        self._on_history_fallback = callback
        for shard in self._shards.values():
            shard.on_history_fallback = callback

    # -- routing ------------------------------------------------------------------------------

    def _shard(self, channel: bytes) -> ShardAdapter | None:
        return self._shard_at(int(key_slot(channel)))

    def _shard_at(self, slot: int) -> ShardAdapter | None:
        address = self._map.owner(slot) if self._map is not None else None
        if address is None:
            return None
        shard = self._shards.get(address)
        if shard is None:
            shard = self._add_shard(address)
        return shard

    def _add_shard(self, address: Address) -> ShardAdapter:
        kwargs = {k: v for k, v in self.target.kwargs.items() if k not in ("path", "db")}
        kwargs.update(host=address[0], port=address[1], db=0)
        node_target = redis_connect.RedisTarget("single", (), None, self.target.tls, kwargs)
        shard = ShardAdapter(self, address, node_target, **self.shard_options)
        self._shards[address] = shard
        if self._running and self._receive is not None:
            shard.start(self._receive)
        return shard

    def shard_for(self, topic: str) -> Address | None:
        """The ``(host, port)`` of the primary that carries ``topic`` now (``None`` before the map is known)."""
        return self._map.owner(int(key_slot(topic_channel(self.prefix, topic)))) if self._map else None

    # -- Adapter interface --------------------------------------------------------------------

    def start(self, receive: Callable[[dict[str, Any]], None]) -> None:
        """Read the slot map (or keep trying in the background) and start one shard per primary; idempotent.

        Never raises because Redis is down. Raises
        :class:`~phx_gevent.errors.NotMonkeyPatchedError` in an unpatched process, and
        :class:`~phx_gevent.pubsub.redis_slots.ClusterVersionError` when the cluster runs a
        Redis older than 7 (no sharded pub/sub); either leaves the adapter stopped.
        """
        self._receive = receive
        if self._running:
            self.ensure_started()
            return
        from gevent import monkey

        if not monkey.is_module_patched("socket"):
            from ..errors import NotMonkeyPatchedError
            from .redis import NOT_PATCHED_MESSAGE

            raise NotMonkeyPatchedError(NOT_PATCHED_MESSAGE)
        self._running = True
        self._owner_pid = os.getpid()
        self._stop = Event()
        for shard in self._shards.values():
            shard.start(receive)
        try:
            self._apply(discover(self.target, self._seeds(), self.connect_timeout))
        except ClusterVersionError:
            self._running = False
            raise
        except redis.ConnectionError as exc:
            log.warning("phx_gevent: Redis Cluster %s not reachable yet (%s); retrying", self.target.describe(), exc)
        self._greenlet = supervise.spawn("Redis Cluster topology", self._run_topology)

    def ensure_started(self) -> None:
        """Restart in a forked child an adapter that was started in its parent."""
        if self._receive is not None and (not self._running or self._owner_pid != os.getpid()):
            self._running = False
            self.start(self._receive)

    def publish(self, envelope: dict[str, Any]) -> None:
        """Queue ``envelope`` on the shard of its channel; never waits for Redis (see :meth:`RedisAdapter.publish`)."""
        if self._owner_pid != os.getpid():
            self.ensure_started()
        if envelope["k"] == "b":
            channel = topic_channel(self.prefix, envelope["t"])
        else:
            channel = direct_channel(self.prefix, envelope["to"])
        shard = self._shard(channel)
        if shard is None:
            self._hold(envelope)
            return
        shard.publish(envelope)

    def publish_history(self, envelope: dict[str, Any], config: Any) -> bool:
        """Queue a history append on the topic's shard (see :meth:`Adapter.publish_history`)."""
        shard = self._shard(topic_channel(self.prefix, envelope["t"]))
        if shard is None:
            self._gaps[envelope["t"]] = config
            return False
        return shard.publish_history(envelope, config)

    def history_gap(self, topic: str, config: Any) -> None:
        """Record that ``topic``'s history missed a message (on its shard, or until the shard is known)."""
        shard = self._shard(topic_channel(self.prefix, topic))
        if shard is None:
            self._gaps[topic] = config
        else:
            shard.history_gap(topic, config)

    def interest(self, topic: str) -> None:
        """One more local holder of ``topic``: its channel is subscribed on the topic's shard (batched)."""
        self._topics[topic] = self._topics.get(topic, 0) + 1
        shard = self._shard(topic_channel(self.prefix, topic))
        if shard is not None:
            shard.interest(topic)

    def release(self, topic: str) -> None:
        """One local holder of ``topic`` fewer (the last one unsubscribes after ``linger``)."""
        n = self._topics.get(topic, 0) - 1
        if n < 0:
            return
        if n:
            self._topics[topic] = n
        else:
            del self._topics[topic]
        shard = self._shard(topic_channel(self.prefix, topic))
        if shard is not None:
            shard.release(topic)

    def wait_routed(self, topic: str, timeout: float | None = None) -> bool:
        """Wait until the topic's shard confirmed this node's subscription; False at once while it is unknown."""
        shard = self._shard(topic_channel(self.prefix, topic))
        if shard is None:
            return False
        return shard.wait_routed(topic, timeout)

    def history_pool(self, max_connections: int = 8, timeout: float = 5.0) -> Any:
        """A ``RedisCluster`` client (routes each script by its keys' slot) for history reads and rules."""
        if self._history_client is None:
            self._history_client = cluster_client(self.target, max_connections=max_connections)
        return self._history_client

    def stop(self, timeout: float | None = None) -> int:
        """Stop every shard (each sends what it holds first, within ``timeout``); returns how many were dropped."""
        if not self._running:
            return 0
        self._running = False
        self._stop.set()
        self._refresh_event.set()
        lost = len(self._waiting)
        self._waiting.clear()
        shards = list(self._shards.values())
        jobs = [gevent.spawn(shard.stop, timeout) for shard in shards]
        gevent.joinall(jobs)
        lost += sum(int(job.value or 0) for job in jobs)
        if self._greenlet is not None and self._greenlet is not gevent.getcurrent():
            self._greenlet.kill(block=False)
        if self._history_client is not None:
            try:
                self._history_client.close()
            except Exception:
                log.debug("phx_gevent: closing the cluster history client failed", exc_info=True)
            self._history_client = None
        return lost

    def ping(self) -> float | None:
        """Seconds the slowest shard takes to answer PING; ``None`` when one does not answer (or none is known)."""
        shards = list(self._shards.values())
        if not shards:
            return None
        times = [shard.ping() for shard in shards]
        return None if any(t is None for t in times) else max(t for t in times if t is not None)

    @property
    def connected(self) -> bool:
        """True when the slot map is known and every shard is connected."""
        return self._map is not None and bool(self._shards) and all(s.connected for s in self._shards.values())

    def stats(self) -> dict[str, Any]:
        """The shards' counters summed (as :meth:`RedisAdapter.stats`), plus ``shards``: per ``host:port``, its own."""
        per = {f"{h}:{p}": shard.stats() for (h, p), shard in self._shards.items()}
        total: dict[str, Any] = dict(self._counters)
        for stats in per.values():
            for key, value in stats.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
        total.update(
            node=self.node_name,
            routing="topic",
            connected=self.connected,
            publisher_connected=bool(per) and all(s["publisher_connected"] for s in per.values()),
            listener_connected=bool(per) and all(s["listener_connected"] for s in per.values()),
            last_error=next((s["last_error"] for s in per.values() if s.get("last_error")), None),
            publish_pending=total.get("publish_pending", 0) + len(self._waiting),
            shards=per,
        )
        return total

    # -- process lifecycle --------------------------------------------------------------------

    def _forked(self) -> None:
        # In a child right after fork(): the shards (and their greenlets) belong to the parent.
        self._running = False
        if self._node_auto:
            self.node_name = make_node_name()
        self._history_client = None
        topics = self._topics  # the local layer's interest is inherited with it: kept, subscribed again
        self._reset()
        self._topics = topics
