"""The Redis adapter's outgoing queue: pure bookkeeping, no I/O, no clock of its own.

Envelopes wait here for Redis: first *queued*, then *in flight* once written
until Redis acknowledges them. While Redis is unreachable the queue doubles as
the replay buffer. The rules it keeps, each a method unit-tested without Redis
(tests/test_outbox.py):

- bounded by count (``max_pending``) and bytes (``max_pending_bytes``), in
  flight included; making room drops the oldest *queued* envelopes (those in
  flight may already be in Redis);
- too old to be worth sending: broadcasts after ``replay_window`` seconds,
  direct messages (node to node) after ``direct_ttl``;
- a failed write puts what was in flight back at the head, in order;
- a history append that will not run is handed to a fallback (the adapter
  delivers it without offset and sends it as a plain broadcast instead).

The connection loops (:mod:`phx_gevent.pubsub.redis`) decide *when* these
happen; this module decides *what* happens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["HistoryCmd", "Item", "Outbox"]


class HistoryCmd:
    """A history append waiting to run (an ``EVALSHA`` of the append script) instead of a ``PUBLISH``."""

    __slots__ = ("args", "topic", "config")

    def __init__(self, args: tuple[Any, ...], topic: str, config: Any) -> None:
        self.args = args
        self.topic = topic
        self.config = config


#: (queued at, channel or history command, encoded envelope)
Item = tuple[float, "bytes | HistoryCmd", bytes]


class Outbox:
    """Queued and in-flight envelopes of one Redis adapter, with their bounds (see the module doc)."""

    __slots__ = ("queue", "inflight", "pending_bytes", "max_pending", "max_pending_bytes", "dprefix", "_next_scan")

    def __init__(self, max_pending: int, max_pending_bytes: int, direct_prefix: bytes) -> None:
        #: Waiting to be written, oldest first.
        self.queue: deque[Item] = deque()
        #: Written, not yet acknowledged, in the order written.
        self.inflight: deque[Item] = deque()
        #: Bytes of everything queued or in flight.
        self.pending_bytes = 0
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        #: What the channels of direct messages start with (any other channel carries broadcasts).
        self.dprefix = direct_prefix
        self._next_scan = 0.0

    def __len__(self) -> int:
        """Envelopes queued or in flight."""
        return len(self.queue) + len(self.inflight)

    def full(self, size: int) -> bool:
        """Whether one more envelope of ``size`` bytes would break a bound."""
        return len(self) >= self.max_pending or self.pending_bytes + size > self.max_pending_bytes

    def add(self, item: Item) -> None:
        """Queue ``item`` (the caller made room first)."""
        self.queue.append(item)
        self.pending_bytes += len(item[2])

    def drop_oldest(self, size: int, fallback: Callable[[Item], Any]) -> tuple[int, bool]:
        """Drop queued envelopes, oldest first, until one of ``size`` bytes fits.

        History appends dropped go to ``fallback``. Returns how many were
        dropped, and whether the new one now fits (when it does not, everything
        left is in flight and the caller drops the new one).
        """
        dropped = 0
        queue = self.queue
        while self.full(size) and queue:
            old = queue.popleft()
            self.pending_bytes -= len(old[2])
            if type(old[1]) is HistoryCmd:
                fallback(old)
            dropped += 1
        return dropped, not self.full(size)

    def expire(self, now: float, replay_window: float, direct_ttl: float, fallback: Callable[[Item], Any]) -> int:
        """Drop what waited too long: broadcasts ``replay_window`` s, direct messages ``direct_ttl`` s.

        Direct messages may sit behind younger broadcasts, so they are found
        by a scan of the whole queue, at most ten times a second. Returns how
        many were dropped.
        """
        limit = now - replay_window
        expired = 0
        queue = self.queue
        while queue and queue[0][0] < limit:
            old = queue.popleft()
            self.pending_bytes -= len(old[2])
            if type(old[1]) is HistoryCmd:
                fallback(old)
            expired += 1
        direct_limit = now - direct_ttl
        if queue and queue[0][0] < direct_limit and now >= self._next_scan:
            self._next_scan = now + 0.1
            dprefix = self.dprefix
            kept = [
                item
                for item in queue
                if item[0] >= direct_limit or type(item[1]) is HistoryCmd or not item[1].startswith(dprefix)  # type: ignore[union-attr]
            ]
            if len(kept) != len(queue):
                expired += len(queue) - len(kept)
                self.pending_bytes = sum(len(item[2]) for item in kept) + sum(len(item[2]) for item in self.inflight)
                queue.clear()
                queue.extend(kept)
        return expired

    def take(self, batch_size: int, budget: int = 1024 * 1024) -> deque[Item]:
        """Move up to ``batch_size`` queued envelopes (about ``budget`` bytes) in flight; returns the in-flight ones.

        Does nothing while envelopes are already in flight (they are written
        again first).
        """
        inflight = self.inflight
        if not inflight:
            queue = self.queue
            while queue and len(inflight) < batch_size and budget > 0:
                item = queue.popleft()
                budget -= len(item[2])
                inflight.append(item)
        return inflight

    def acknowledged(self) -> Item:
        """The oldest in-flight envelope was acknowledged by Redis: forget it and return it."""
        item = self.inflight.popleft()
        self.pending_bytes -= len(item[2])
        return item

    def requeue(self) -> None:
        """A write failed: what was in flight goes back to the head of the queue, in order."""
        if self.inflight:
            self.queue.extendleft(reversed(self.inflight))
            self.inflight.clear()

    def convert_history(self, fallback: Callable[[Item], Item]) -> None:
        """Redis is unreachable: every queued history append becomes what ``fallback`` returns for it."""
        if any(type(item[1]) is HistoryCmd for item in self.queue):
            converted = [fallback(it) if type(it[1]) is HistoryCmd else it for it in self.queue]
            self.queue.clear()
            self.queue.extend(converted)

    def clear(self) -> int:
        """Forget everything (the adapter stopped); returns how many envelopes were not forwarded."""
        lost = len(self)
        self.queue.clear()
        self.inflight.clear()
        self.pending_bytes = 0
        return lost
