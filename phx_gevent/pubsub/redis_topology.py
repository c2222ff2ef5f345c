"""The Redis Cluster adapter's topology: the slot map, re-read and applied (topics and envelopes re-homed).

Mixin of :class:`~phx_gevent.pubsub.redis_cluster.RedisClusterAdapter`, which
holds the state declared below. :meth:`Topology.refresh` wakes the topology
greenlet (a shard saw ``MOVED``, a dropped subscription, an unreachable
primary); it reads ``CLUSTER SLOTS`` (:func:`~phx_gevent.pubsub.redis_slots.discover`)
and applies a changed map: shards for new primaries, the topics whose slot
moved released on the old shard and held on the new one, queued envelopes
moved along, each shard's counting channel, shards without slots stopped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import Event

from .. import supervise
from . import redis_connect
from .outbox import Item
from .redis_shard import ShardAdapter, item_slot
from .redis_slots import Address, ClusterVersionError, SlotMap, discover
from .routing import direct_channel, topic_channel

try:
    import redis
    from redis.crc import key_slot
except ImportError:  # pragma: no cover
    redis = None  # type: ignore[assignment]

__all__ = ["Topology"]

log = logging.getLogger(__name__)

_monotonic = time.monotonic


class Topology:
    """The slot map of a cluster adapter, and what follows when it changes (see the module docstring)."""

    if TYPE_CHECKING:  # pragma: no cover - declared by RedisClusterAdapter
        prefix: str
        node_name: str
        target: redis_connect.RedisTarget
        connect_timeout: float
        refresh_interval: float
        max_pending: int
        replay_window: float
        _running: bool
        _map: SlotMap | None
        _shards: dict[Address, ShardAdapter]
        _topics: dict[str, int]
        _waiting: deque[tuple[float, Any]]
        _gaps: dict[str, Any]
        _refresh_event: Event
        _counters: dict[str, int]
        _log_refresh: supervise.LogLimiter

        def _shard(self, channel: bytes) -> ShardAdapter | None: ...
        def _shard_at(self, slot: int) -> ShardAdapter | None: ...
        def _add_shard(self, address: Address) -> ShardAdapter: ...
        def publish(self, envelope: dict[str, Any]) -> None: ...

    def refresh(self, reason: str) -> None:
        """Read the slot map again soon (a shard saw ``MOVED``, a dropped subscription, an outage)."""
        log.debug("phx_gevent: Redis Cluster slot map refresh: %s", reason)
        self._refresh_event.set()

    def rehome(self, item: Item, reason: str) -> None:
        """A shard was told ``item``'s slot is elsewhere: send it again once the slot map is read."""
        self._counters["moved"] += 1
        self._waiting.append((item[0], item))
        self.refresh(reason)

    def _hold(self, envelope: dict[str, Any]) -> None:
        # No slot map yet (the cluster unreachable since start): keep it, bounded, for when it comes.
        if len(self._waiting) >= self.max_pending:
            self._waiting.popleft()
            self._counters["unrouted"] += 1
        self._waiting.append((_monotonic(), dict(envelope)))
        self._refresh_event.set()

    def _seeds(self) -> list[Address]:
        known = list(self._map.primaries()) if self._map is not None else []
        return known + [n for n in self.target.nodes if n not in known]

    def _run_topology(self) -> None:
        delay = 0.1
        while self._running:
            self._refresh_event.wait(self.refresh_interval if self._map is not None else delay)
            self._refresh_event.clear()
            if not self._running:
                return
            # Shards that cannot reach their primary: maybe a replica took over.
            try:
                slot_map = discover(self.target, self._seeds(), self.connect_timeout)
            except ClusterVersionError as exc:  # the cluster was replaced by an older one: say so, retry
                delay = 2.0
                if self._log_refresh.ready() is not None:
                    log.error("phx_gevent: %s", exc)
                continue
            except redis.ConnectionError as exc:
                delay = min(delay * 2, 2.0)
                if self._log_refresh.ready() is not None:
                    log.warning("phx_gevent: Redis Cluster %s: %s", self.target.describe(), exc)
                continue
            delay = 0.1
            self._counters["refreshes"] += 1
            self._apply(slot_map)

    def _apply(self, slot_map: SlotMap) -> None:
        old = self._map
        changed = old != slot_map
        self._map = slot_map
        if changed:
            self._counters["map_changes"] += int(old is not None)
            if old is not None:
                log.warning("phx_gevent: Redis Cluster slot map changed; moving topics whose slot moved")
            self._rehome_topics(old, slot_map)
            direct = int(key_slot(direct_channel(self.prefix, self.node_name)))
            home = slot_map.owner(direct)
            for address, shard in list(self._shards.items()):
                if address != home:
                    shard.hold_direct(False)
            if home is not None:
                self._shard_at(direct).hold_direct(True)  # type: ignore[union-attr]
            for address in slot_map.primaries():
                if address not in self._shards:
                    self._add_shard(address)
            for address, shard in self._shards.items():
                shard.count_on(self._count_channel(slot_map, address))
            for address, shard in list(self._shards.items()):
                if address not in slot_map.primaries():
                    # No slots any more: its queued envelopes go to their new shards, then it stops.
                    for item in shard.take_items(lambda _slot: True):
                        self._waiting.append((item[0], item))
                    del self._shards[address]
                    gevent.spawn(shard.stop, 0.5)
        for topic, config in list(self._gaps.items()):
            target = self._shard(topic_channel(self.prefix, topic))
            if target is not None:
                target.history_gap(topic, config)
                del self._gaps[topic]
        self._flush_waiting()

    def _count_channel(self, slot_map: SlotMap, address: Address) -> bytes | None:
        # The first of <prefix>:n:{0}, {1}, ... whose slot the shard owns: every node picks the same one.
        for k in range(20_000):
            channel = f"{self.prefix}:n:{{{k}}}".encode()
            if slot_map.owner(int(key_slot(channel))) == address:
                return channel
        return None  # a shard with very few slots: its replay does not wait for the others

    def _rehome_topics(self, old: SlotMap | None, new: SlotMap) -> None:
        if old is None:
            # First map: the shards take the interest gathered so far.
            for topic, n in self._topics.items():
                shard = self._shard_at(int(key_slot(topic_channel(self.prefix, topic))))
                for _ in range(n):
                    if shard is not None:
                        shard.interest(topic)
            return
        for topic, n in self._topics.items():
            slot = int(key_slot(topic_channel(self.prefix, topic)))
            before, after = old.owner(slot), new.owner(slot)
            if before == after:
                continue
            self._counters["rehomed"] += 1
            previous = self._shards.get(before) if before is not None else None
            for _ in range(n):
                if previous is not None:
                    previous.release(topic)
            if after is not None:
                new_shard = self._shard_at(slot)
                for _ in range(n):
                    if new_shard is not None:
                        new_shard.interest(topic)
        for address, shard in list(self._shards.items()):
            for item in shard.take_items(lambda slot, a=address: new.owner(slot) != a):
                self._waiting.append((item[0], item))

    def _flush_waiting(self) -> None:
        limit = _monotonic() - self.replay_window
        waiting, self._waiting = self._waiting, deque()
        for queued, what in waiting:
            if queued < limit:
                self._counters["unrouted"] += 1
                continue
            if isinstance(what, dict):
                self.publish(what)
                continue
            shard = self._shard_at(item_slot(what))
            if shard is None:
                self._waiting.append((queued, what))
            else:
                shard.add_item(what)
