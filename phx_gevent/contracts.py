"""The seams between the layers, as ``typing.Protocol`` classes checked by mypy.

Each layer talks to the next through one of these, never through a concrete
class, so a transport, a subscriber, a writer or an adapter can be replaced
(a test fake, a new transport) without touching the other side. The layers
and the flow of a frame and of a broadcast through them are drawn in
docs/architecture.md.

:class:`Transport`
    What a :class:`~phx_gevent.connection.Connection` writes through: the
    WebSocket transport, the long-poll session, the in-process transport of
    :mod:`phx_gevent.testing`.
:class:`Writer`
    The fastlane target of a connection: broadcasts are encoded once per
    :class:`Encoder` and the same frame is written to every writer that
    shares it (:mod:`phx_gevent.transports.writer`, the long-poll session,
    the recovery buffer of a joining channel).
:class:`Subscriber`
    What :class:`~phx_gevent.pubsub.PubSub` delivers a topic's broadcasts to:
    a channel (frames straight to its writer, intercepted events through
    ``deliver``), a connection's id subscription, a Presence tracker.
:class:`Adapter`
    How broadcasts cross processes and machines
    (:class:`~phx_gevent.pubsub.base.Adapter` is the base class of the
    in-memory and Redis adapters; anything with these methods works).
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any, Protocol, runtime_checkable

__all__ = ["Adapter", "Encoder", "Subscriber", "Transport", "Writer"]


@runtime_checkable
class Encoder(Protocol):
    """Encodes a broadcast once for every connection that shares a wire format.

    Encoders are compared by identity: two writers with the same encoder get
    the same frame object.
    """

    def broadcast(self, topic: str, event: str, payload: Any) -> Any:
        """The ready frame of a broadcast (raises ``EncodeError`` when the format cannot carry it)."""
        ...

    def wrap(self, data: str | bytes) -> Any:
        """The frame of one message the serializer already encoded."""
        ...


@runtime_checkable
class Writer(Protocol):
    """The sending side of one connection, as the fan-out sees it."""

    @property
    def encoder(self) -> Any:
        """The fastlane key: writers with the same encoder share broadcast frames."""
        ...

    def write(self, frame: Any) -> None:
        """Queue one ready frame; never blocks, never raises for a dead peer (the frame is dropped)."""
        ...


@runtime_checkable
class Transport(Protocol):
    """What a connection writes through (WebSocket, long-poll, the test transport)."""

    @property
    def name(self) -> str:
        """``"websocket"`` or ``"longpoll"`` (what ``socket.transport`` reports)."""
        ...

    @property
    def writer(self) -> Writer:
        """The fastlane target of the connection's channels."""
        ...

    def send(self, data: str | bytes) -> None:
        """Queue one encoded message (``str`` text, ``bytes`` binary)."""
        ...

    def close(self, code: int, reason: str) -> None:
        """End the connection with a WebSocket close code (long-poll ignores the code)."""
        ...


@runtime_checkable
class Subscriber(Protocol):
    """A subscription of :class:`~phx_gevent.pubsub.PubSub` to one topic."""

    @property
    def owner(self) -> Any:
        """The ``broadcast_from`` identity: a broadcast whose ``from_`` is this owner skips it."""
        ...

    @property
    def intercept(self) -> Container[str]:
        """Events handed to :meth:`deliver` instead of written as frames (``ALL_EVENTS``: all of them)."""
        ...

    @property
    def writer(self) -> Writer | None:
        """Where non-intercepted events go as ready frames (``None`` only when everything is intercepted)."""
        ...

    def deliver(self, topic: str, event: str, payload: Any) -> None:
        """Handle an intercepted event; called in the broadcaster's greenlet, so it must not block."""
        ...


@runtime_checkable
class Adapter(Protocol):
    """Carries envelopes between nodes (see :mod:`phx_gevent.pubsub.base` for the envelope keys)."""

    #: This process's name among the nodes sharing the bus.
    node_name: str
    #: True when :meth:`publish_history` keeps a shared, offset-numbered history.
    supports_history: bool

    def start(self, receive: Callable[[dict[str, Any]], None]) -> None:
        """Begin handing every envelope from another node to ``receive``."""
        ...

    def publish(self, envelope: dict[str, Any]) -> None:
        """Send an envelope to every other node; never raises because the bus is down."""
        ...

    def publish_history(self, envelope: dict[str, Any], config: Any) -> bool:
        """Append to the topic's shared history and publish to every node; False when it cannot now."""
        ...

    def interest(self, topic: str) -> None:
        """One more local holder of ``topic``: receive its broadcasts from other nodes (reference-counted)."""
        ...

    def release(self, topic: str) -> None:
        """One local holder of ``topic`` fewer."""
        ...

    def wait_routed(self, topic: str, timeout: float | None = None) -> bool:
        """Wait (bounded) until broadcasts on ``topic`` from other nodes reach this node; False when not."""
        ...

    def stop(self) -> None:
        """Stop receiving and release connections."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring."""
        ...
