"""The broadcast API of an :class:`~phx_gevent.Endpoint`, without Flask: broadcast, history, subscribe.

Everything here is a thin, documented front for the endpoint's
:class:`~phx_gevent.pubsub.PubSub`; the endpoint inherits it.
"""

from __future__ import annotations

from typing import Any

from .channels.process import ChannelProcess
from .contracts import Subscriber
from .pubsub import PubSub
from .socket import SocketState

__all__ = ["Broadcaster"]


class Broadcaster:
    """Broadcasting, history and in-process subscriptions over ``self.pubsub`` (set by the subclass)."""

    pubsub: PubSub

    def broadcast(self, topic: str, event: str, payload: dict[str, Any] | bytes) -> None:
        """Send ``event`` to every subscriber of ``topic`` on every node.

        ``broadcast(<socket id>, "disconnect", {})`` closes every connection
        with that id (close 1001; the client reconnects and runs ``connect``
        again). Usable from any greenlet or Flask view. Raises ``TypeError``
        for a payload that is not a dict or bytes or cannot be encoded, and
        :class:`~phx_gevent.errors.BroadcastTimeout` when delivery stayed
        overloaded for ``broadcast_timeout`` seconds.
        """
        self.pubsub.broadcast(topic, event, payload)

    def broadcast_from(self, from_: Any, topic: str, event: str, payload: dict[str, Any] | bytes) -> None:
        """Like :meth:`broadcast`, skipping the channel ``from_`` (a channel's socket or ``channel_pid``)."""
        self.pubsub.broadcast(topic, event, payload, _owner(from_))

    def local_broadcast(self, topic: str, event: str, payload: dict[str, Any] | bytes) -> None:
        """Like :meth:`broadcast`, but only to subscribers in this process."""
        self.pubsub.local_broadcast(topic, event, payload)

    def local_broadcast_from(self, from_: Any, topic: str, event: str, payload: dict[str, Any] | bytes) -> None:
        """Like :meth:`broadcast_from`, but only in this process."""
        self.pubsub.local_broadcast(topic, event, payload, _owner(from_))

    def history(self, topic: str, since: str | None = None, limit: int = 100) -> list[Any] | None:
        """The kept messages of a history topic, as ``HistoryEntry(offset, event, payload)``.

        After offset ``since`` (at most ``limit``), or the last ``limit`` (at
        most 100) when ``since`` is None. ``None`` when the messages after
        ``since`` are no longer all kept (or the offset is unknown, malformed,
        of another topic, or Redis cannot answer): refetch from your own
        storage then. May wait for Redis. See docs/recovery.md.
        """
        self.pubsub.start()
        return self.pubsub.history(topic, since, limit)

    def subscribe(self, topic: str, subscriber: Subscriber) -> None:
        """Subscribe to ``topic`` in this process.

        ``subscriber`` is a channel's socket (broadcasts then arrive in its
        ``handle_info`` as :class:`~phx_gevent.channels.process.Broadcast`), or
        a callable ``f(topic, event=..., payload=..., from_=...)`` run in the
        broadcaster's greenlet (keep it short). With the Redis adapter's
        per-topic routing a callable's subscription returns once broadcasts
        from other workers reach it (at most ``subscribe_timeout``).
        """
        owner = _owner(subscriber)
        if isinstance(owner, ChannelProcess):
            owner.subscribe(topic)
        elif callable(subscriber):
            self.pubsub.connect(subscriber, topic)
        else:
            raise TypeError(f"subscribe expects a channel socket or a callable, got {subscriber!r}")

    def unsubscribe(self, topic: str, subscriber: Subscriber) -> None:
        """Undo :meth:`subscribe`."""
        owner = _owner(subscriber)
        if isinstance(owner, ChannelProcess):
            owner.unsubscribe(topic)
        elif callable(subscriber):
            self.pubsub.disconnect(subscriber, topic)


def _owner(value: Any) -> Any:
    if isinstance(value, SocketState):
        return value.channel_pid
    return value
