"""An in-process adapter: several PubSub "nodes" in one process, joined by a bus.

For tests and for trying multi-node behaviour (long-poll routing,
disconnects, presence) without Redis. Envelopes are handed over
asynchronously, in order, like a network would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import gevent
from gevent.queue import Queue

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
    """One node on a :class:`MemoryBus`."""

    def __init__(self, bus: MemoryBus, node_name: str | None = None) -> None:
        self.bus = bus
        self.node_name = node_name or make_node_name("memory")
        self._receive: Callable[[dict[str, Any]], None] | None = None
        self._inbox: Queue = Queue()
        self._worker: Any = None
        self.published = 0
        self.received = 0

    def start(self, receive: Callable[[dict[str, Any]], None]) -> None:
        self._receive = receive
        if self not in self.bus.adapters:
            self.bus.adapters.append(self)
        self._worker = gevent.spawn(self._run)

    def publish(self, envelope: dict[str, Any]) -> None:
        self.published += 1
        for adapter in self.bus.adapters:
            if adapter is not self:
                adapter._inbox.put(envelope)

    def stop(self) -> None:
        if self in self.bus.adapters:
            self.bus.adapters.remove(self)
        if self._worker is not None:
            self._worker.kill(block=False)
            self._worker = None

    def _run(self) -> None:
        for envelope in self._inbox:
            self.received += 1
            if self._receive is not None:
                self._receive(envelope)

    def stats(self) -> dict[str, Any]:
        return {"published": self.published, "received": self.received}
