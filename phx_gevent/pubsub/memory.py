"""An in-process adapter: several PubSub "nodes" in one process, joined by a bus.

For tests and for trying multi-node behaviour (long-poll routing,
disconnects, presence) without Redis. Envelopes are handed over
asynchronously, in order, like a network would, and (by default) through
the same wire format as the Redis adapter (:mod:`phx_gevent.pubsub.codec`):
a payload that Redis could not carry fails here too, and receivers get a
copy, never the sender's objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import gevent
from gevent.queue import Queue

from . import codec
from .base import Adapter, make_node_name

__all__ = ["MemoryBus", "MemoryAdapter"]

log = logging.getLogger(__name__)


class MemoryBus:
    """The shared medium: every adapter attached to one bus sees the others' envelopes."""

    def __init__(self) -> None:
        self.adapters: list[MemoryAdapter] = []

    def adapter(self, node_name: str | None = None) -> MemoryAdapter:
        """A new adapter (a new node) on this bus."""
        return MemoryAdapter(self, node_name)


class MemoryAdapter(Adapter):
    """One node on a :class:`MemoryBus`.

    ``encode=True`` sends envelopes through the Redis adapter's wire format;
    ``False`` hands the sender's objects over as they are.
    """

    def __init__(self, bus: MemoryBus, node_name: str | None = None, *, encode: bool = True) -> None:
        if node_name is not None and (not node_name or "\n" in node_name):
            raise ValueError(f"node_name must be a non-empty string without newlines, got {node_name!r}")
        self.bus = bus
        self.node_name = node_name or make_node_name("memory")
        self.encode = encode
        self._receive: Callable[[dict[str, Any]], None] | None = None
        self._inbox: Queue = Queue()
        self._worker: Any = None
        self.published = 0
        self.received = 0

    def start(self, receive: Callable[[dict[str, Any]], None]) -> None:
        """Join the bus and deliver what other nodes publish to ``receive`` (idempotent)."""
        self._receive = receive
        if self not in self.bus.adapters:
            self.bus.adapters.append(self)
        if self._worker is None:
            self._worker = gevent.spawn(self._run)

    def publish(self, envelope: dict[str, Any]) -> None:
        """Hand ``envelope`` to every other node on the bus; raises ``TypeError`` if it cannot be encoded."""
        message: Any = codec.encode(envelope, self.node_name) if self.encode else envelope
        self.published += 1
        for adapter in self.bus.adapters:
            if adapter is not self:
                adapter._inbox.put(message)

    def stop(self, timeout: float | None = None) -> int:
        """Leave the bus (publishing is synchronous: nothing is pending, 0 dropped). Idempotent."""
        if self in self.bus.adapters:
            self.bus.adapters.remove(self)
        if self._worker is not None:
            self._worker.kill(block=False)
            self._worker = None
        self._inbox = Queue()
        return 0

    def _run(self) -> None:
        for message in self._inbox:
            envelope = codec.decode(message) if isinstance(message, bytes) else message
            if envelope["k"] == "d" and envelope.get("to") != self.node_name:
                continue  # Redis routes direct messages by channel: only the addressee gets them
            self.received += 1
            if self._receive is not None:
                self._receive(envelope)

    def stats(self) -> dict[str, Any]:
        """``published`` and ``received`` envelope counts."""
        return {"node": self.node_name, "published": self.published, "received": self.received}
