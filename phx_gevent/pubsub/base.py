"""The PubSub adapter interface: how broadcasts travel between processes and machines.

The in-process layer (:class:`~phx_gevent.pubsub.PubSub`) always delivers to
local subscribers itself, at once. An adapter only *forwards*: it carries
envelopes to the other nodes and hands the envelopes it receives from them
back to the local layer. phoenix_pubsub draws the same line.

An envelope is a plain dict of JSON-compatible values plus, under ``"p"``,
the payload (a dict or ``bytes``). Adapters serialize it in a format that
executes nothing when decoded (never pickle). Keys:

``k``  kind: ``"b"`` broadcast, ``"d"`` direct message to one node
``n``  sender node name (adapters drop their own echoes with it)
``t``  topic (broadcast) or handler name (direct)
``e``  event
``p``  payload
``x``  identifier of the ``broadcast_from`` sender, or ``None``
``to`` destination node (direct messages only)
``o``  offset of a broadcast on a history topic (received envelopes only)
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["Adapter", "make_node_name"]


def make_node_name(prefix: str | None = None) -> str:
    """A node name unique across machines and restarts: ``host:pid:random``."""
    host = socket.gethostname() or "localhost"
    name = f"{host}:{os.getpid()}:{secrets.token_hex(4)}"
    return f"{prefix}@{name}" if prefix else name


class Adapter:
    """Base class of cross-node adapters. Subclasses implement the three methods.

    ``node_name`` identifies this process among all nodes sharing the bus.
    """

    node_name: str
    #: How broadcasts reach other nodes: ``"broadcast"`` (every node receives every
    #: one) or ``"topic"`` (only nodes with an :meth:`interest` in the topic).
    routing: str = "broadcast"
    #: True when the adapter implements :meth:`publish_history` (shared offsets).
    supports_history: bool = False

    #: True for adapters whose greenlets do blocking I/O through the standard
    #: library (Redis): :func:`~phx_gevent.serve` then refuses an unpatched process.
    requires_monkey_patching: bool = False

    def start(self, receive: Callable[[dict[str, Any]], None]) -> None:
        """Begin receiving: call ``receive(envelope)`` for every envelope from another node.

        ``receive`` never blocks for long and never raises. Called once, from
        the process that will serve requests (after a gunicorn fork).
        """
        raise NotImplementedError

    def publish(self, envelope: dict[str, Any]) -> None:
        """Send ``envelope`` to every other node, preserving the caller's order.

        Must not block a request for long and must not raise because the bus
        is down: what cannot be forwarded is counted and logged.
        """
        raise NotImplementedError

    def publish_history(self, envelope: dict[str, Any], config: Any) -> bool:
        """Append a broadcast to its topic's shared history and publish it to every node, this one included.

        The local layer then delivers it when it comes back, with its offset
        (so every node delivers in offset order). Returns False when that
        cannot be done now (the bus is down): the caller delivers locally
        without an offset. Only adapters with ``supports_history``.
        """
        return False

    def interest(self, topic: str) -> None:
        """One more local holder of ``topic`` (reference-counted with :meth:`release`).

        The local layer calls it for the first subscriber of a topic, for a
        receiver connected to one topic and while a join waits
        (:meth:`wait_routed`). Adapters that route per topic (Redis,
        ``routing="topic"``) receive a topic's broadcasts from other nodes
        only while it has holders; the default delivers every broadcast to
        every node and ignores it. Never blocks, never raises because the bus
        is down.
        """

    def release(self, topic: str) -> None:
        """One local holder of ``topic`` fewer (see :meth:`interest`); never blocks."""

    def wait_routed(self, topic: str, timeout: float | None = None) -> bool:
        """Wait until broadcasts other nodes publish on ``topic`` from now on reach this node.

        Holds ``topic`` (:meth:`interest`) while it waits. Returns True at
        once when they already do, False after ``timeout`` seconds (the
        adapter's own default when ``None``) or at once while the bus is
        unreachable: the caller goes on (a join still succeeds during an
        outage). Never raises because the bus is down.
        """
        return True

    def stop(self, timeout: float | None = None) -> int:
        """Forward what is still queued (for at most ``timeout`` seconds), stop receiving, release connections.

        Returns how many envelopes could not be forwarded (dropped).
        """
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring (published, received, dropped, ...)."""
        return {}
