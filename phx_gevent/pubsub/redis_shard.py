"""One Redis Cluster shard of :class:`~phx_gevent.pubsub.redis_cluster.RedisClusterAdapter`.

A :class:`ShardAdapter` is a :class:`~phx_gevent.pubsub.redis.RedisAdapter` on
one shard primary, with its own publisher, listener, subscription writer and
delivery greenlets, speaking sharded pub/sub (Redis 7+):

- broadcasts and direct messages go out with ``SPUBLISH`` (to the shard that
  owns the channel's hash slot: the cluster adapter routes them here);
- subscriptions are ``SSUBSCRIBE``/``SUNSUBSCRIBE``, one command per hash slot
  (Redis refuses a cross-slot one), all of a round still written at once;
- history appends run the same scripts with ``SPUBLISH`` (legal: the topic's
  channel and its history keys share the ``{topic}`` hash tag, one slot);
- the nodes are counted (``PUBSUB SHARDNUMSUB``) on a counting channel in
  this shard's slots, so a replay after this shard's outage waits for the
  other nodes to resubscribe here, as with one Redis;
- ``MOVED``/``ASK`` on a publish hands the envelope back to the cluster
  adapter, which refreshes its slot map and sends it to the new owner; on a
  subscription (an error, or a ``sunsubscribe`` Redis pushes when a slot
  migrates) the map is refreshed, the topics re-homed, and this connection
  resubscribes what it still holds.

A shard that is down affects only its own topics: the other shards'
greenlets and connections are independent.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from . import history_redis as _history
from .outbox import HistoryCmd, Item
from .redis import RedisAdapter
from .subscriptions import State

try:
    import redis
    from redis.crc import key_slot
    from redis.exceptions import AskError, ClusterDownError, MovedError, ResponseError, TryAgainError
except ImportError:  # pragma: no cover
    redis = None  # type: ignore[assignment]
    ResponseError = AskError = ClusterDownError = MovedError = TryAgainError = Exception  # type: ignore[assignment,misc]

if TYPE_CHECKING:  # pragma: no cover
    from .redis_cluster import RedisClusterAdapter

__all__ = ["SHARDED_APPEND_SCRIPT", "SHARDED_GAP_SCRIPT", "ShardAdapter", "item_slot", "is_redirect"]

log = logging.getLogger(__name__)

#: The history scripts, publishing on the topic's shard channel.
SHARDED_APPEND_SCRIPT = _history.APPEND_SCRIPT.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
SHARDED_GAP_SCRIPT = _history.GAP_SCRIPT.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")


def is_redirect(exc: BaseException) -> bool:
    """Whether a Redis error says the slot lives elsewhere (``MOVED``, ``ASK``) or the cluster is reconfiguring."""
    # redis-py parses these replies into their own classes (and strips the word from the message).
    if isinstance(exc, (AskError, ClusterDownError, MovedError, TryAgainError)):
        return True
    return str(exc).startswith(("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"))


def item_slot(item: Item) -> int:
    """The hash slot an outbox item is written to (its channel, or its history keys)."""
    target = item[1]
    if type(target) is HistoryCmd:
        return int(key_slot(str(target.args[0]).encode()))
    return int(key_slot(target))  # type: ignore[arg-type]


class _SlotMoved(redis.ConnectionError):
    """Redis dropped a shard subscription (its slot migrated): resubscribe on a fresh connection."""


class ShardAdapter(RedisAdapter):
    """A :class:`RedisAdapter` on one shard primary, speaking sharded pub/sub (see the module docstring)."""

    _publish_cmd = b"SPUBLISH"
    _numsub = b"SHARDNUMSUB"

    def __init__(self, cluster: RedisClusterAdapter, address: tuple[str, int], target: Any, **options: Any) -> None:
        self.cluster = cluster
        self.address = address
        self._holds_direct = False
        #: The shard channel every node holds on this shard, only to be counted (None until the map is known).
        self._count_chan: bytes | None = None
        self._count_nodes = False
        super().__init__(target, cluster.prefix, node_name=cluster.node_name, routing="topic", **options)
        self._where = f"{address[0]}:{address[1]} (cluster shard)"
        self.on_history_fallback = cluster.on_history_fallback

    def __repr__(self) -> str:
        return f"<ShardAdapter {self._where} prefix={self.prefix!r} node={self.node_name!r}>"

    # -- what this connection holds ---------------------------------------------------------

    def _fixed_channels(self) -> tuple[bytes, ...]:
        # The direct channel only on the shard that owns its slot; the counting channel last.
        fixed = (self._dchan,) if self._holds_direct else ()
        return fixed + (self._count_chan,) if self._count_chan is not None else fixed

    def count_on(self, channel: bytes | None) -> None:
        """Hold ``channel`` (a shard channel in this shard's slots, the same for every node) to count the nodes.

        The publisher counts them (``PUBSUB SHARDNUMSUB``) so that after an
        outage of this shard it replays once the other nodes have resubscribed
        here (waiting at most ``replay_wait``), as with one Redis.
        """
        if channel == self._count_chan:
            return
        from time import monotonic

        old, self._count_chan = self._count_chan, channel
        if old is not None:
            self._subs.release(old, monotonic())
        if channel is not None:
            self._subs.acquire(channel)
            self._bchan = channel
        self._count_nodes = channel is not None
        self._subs.tail = channel  # subscribed last on a new connection: once counted, the rest is in place
        self._fixed = self._fixed_channels()
        self._bus_event.set()

    def hold_direct(self, hold: bool) -> None:
        """Hold (or let go of) this node's direct channel, when its slot is (or stops being) on this shard."""
        if hold == self._holds_direct:
            return
        self._holds_direct = hold
        if hold:
            self._subs.acquire(self._dchan)
        else:
            from time import monotonic

            self._subs.release(self._dchan, monotonic())
        self._fixed = self._fixed_channels()
        self._bus_event.set()

    def take_items(self, moved: Any) -> list[Item]:
        """Remove and return the queued envelopes whose slot ``moved(slot)`` says left this shard."""
        out = self._out
        taken = [item for item in out.queue if moved(item_slot(item))]
        if taken:
            kept = [item for item in out.queue if not moved(item_slot(item))]
            out.queue.clear()
            out.queue.extend(kept)
            out.pending_bytes -= sum(len(item[2]) for item in taken)
            self._space.set()
        return taken

    def add_item(self, item: Item) -> None:
        """Queue an envelope another shard had (re-homed after a slot moved)."""
        if self._out.full(len(item[2])) and not self._make_room(len(item[2])):
            return
        self._out.add(item)
        self._out_event.set()

    # -- sharded pub/sub --------------------------------------------------------------------

    def _subscription_commands(self, commands: Any) -> list[tuple[bytes, ...]]:
        packed: list[tuple[bytes, ...]] = []
        for verb, groups in ((b"SUNSUBSCRIBE", commands.unsubscribe), (b"SSUBSCRIBE", commands.subscribe)):
            for channels in groups:
                by_slot: dict[int, list[bytes]] = defaultdict(list)
                for channel in channels:
                    by_slot[key_slot(channel)].append(channel)
                packed.extend((verb, *chs) for chs in by_slot.values())
        return packed

    def _on_reply(self, kind: bytes, channel: bytes) -> bool:
        if kind == b"ssubscribe":
            return super()._on_reply(b"subscribe", channel)
        if kind == b"sunsubscribe":
            if self._subs.state(channel) is State.UNSUBSCRIBING or not self._subs.refs(channel):
                self._subs.unsubscribed(channel)
                return False
            # Not asked for: Redis moved the channel's slot to another shard.
            self.cluster.refresh(f"Redis dropped the subscription of {channel!r} (slot moved)")
            raise _SlotMoved(f"slot of {channel!r} moved; resubscribing")
        return super()._on_reply(kind, channel)

    def _sub_failed(self, exc: BaseException) -> None:
        # _SlotMoved is a ConnectionError: the listener resubscribes on a new connection.
        if isinstance(exc, _SlotMoved) or (isinstance(exc, ResponseError) and is_redirect(exc)):
            self._counters["moved"] = self._counters.get("moved", 0) + 1
            self.cluster.refresh(f"subscription redirected: {exc}")
        else:
            # The shard is unreachable: a replica may have been promoted in its place.
            self.cluster.refresh(f"shard {self._where} unreachable: {exc}")
        super()._sub_failed(exc)

    def _subscribe_refused(self, exc: BaseException) -> None:
        if not is_redirect(exc):
            super()._subscribe_refused(exc)
            return
        # MOVED/ASK (the slot left this shard) or CLUSTERDOWN/TRYAGAIN on an SSUBSCRIBE: read the slot
        # map again and resubscribe on a new connection (after the usual backoff), by which time the
        # topic is re-homed; never count a refused subscription as in place.
        self._counters["moved"] = self._counters.get("moved", 0) + 1
        self.cluster.refresh(f"subscription redirected: {exc}")
        raise _SlotMoved(f"subscription redirected ({type(exc).__name__}: {exc}); resubscribing")

    def _refused(self, item: Item, exc: BaseException) -> bool:
        if not is_redirect(exc):
            return False
        self._counters["moved"] = self._counters.get("moved", 0) + 1
        self.cluster.rehome(item, f"publish redirected: {exc}")
        return True

    def _probe(self, conn: Any) -> None:
        if self._count_chan is not None:
            super()._probe(conn)
            return
        # No counting channel yet: just check the connection.
        conn.send_command("PING", check_health=False)
        conn.read_response()

    # -- history scripts --------------------------------------------------------------------

    def _load_scripts(self, conn: Any) -> None:
        conn.send_command("SCRIPT", "LOAD", SHARDED_APPEND_SCRIPT, check_health=False)
        sha = conn.read_response()
        self._append_sha = sha if isinstance(sha, bytes) else str(sha).encode()

    def _reset_gaps(self, conn: Any) -> None:
        for topic, config in list(self._gaps.items()):
            args = _history.gap_args(self.prefix, self.node_name, topic, config, self.routing)
            conn.send_command("EVAL", SHARDED_GAP_SCRIPT, 2, *args)
            conn.read_response()
            self._gaps.pop(topic, None)

    def history_pool(self, max_connections: int = 8, timeout: float = 5.0) -> Any:
        """Not per shard: history reads go through the cluster adapter's client."""
        return self.cluster.history_pool(max_connections, timeout)
