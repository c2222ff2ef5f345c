"""What reaches a channel besides client messages: extra-topic broadcasts and ``call`` requests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from gevent.event import AsyncResult

from ..pubsub.local import ALL_EVENTS

if TYPE_CHECKING:  # pragma: no cover
    from .process import ChannelProcess

__all__ = ["Broadcast", "CallFrom", "InfoSubscription"]


class Broadcast(NamedTuple):
    """A broadcast on a topic a channel subscribed to with ``endpoint.subscribe``; seen in ``handle_info``."""

    topic: str
    event: str
    payload: Any


class InfoSubscription:
    """Subscribes a channel to another topic: broadcasts arrive in ``handle_info``."""

    __slots__ = ("owner", "intercept", "writer", "topic")

    def __init__(self, proc: ChannelProcess, topic: str) -> None:
        self.owner = proc
        self.topic = topic
        self.intercept = ALL_EVENTS
        self.writer = None

    def deliver(self, topic: str, event: str, payload: Any) -> None:
        self.owner.send(Broadcast(topic, event, payload))


class CallFrom:
    """The caller of a ``channel_pid.call`` (GenServer's ``from``): ``handle_call``'s second argument.

    :meth:`reply` answers it, from any greenlet; only the first answer counts.
    """

    __slots__ = ("result",)

    def __init__(self) -> None:
        self.result: AsyncResult = AsyncResult()

    def reply(self, value: Any) -> None:
        """Answer the call with ``value`` (``GenServer.reply/2``); later answers are ignored."""
        if not self.result.ready():
            self.result.set(value)

    def _fail(self, exc: BaseException) -> None:
        if not self.result.ready():
            self.result.set_exception(exc)

    @property
    def answered(self) -> bool:
        """True once the call has its answer (or failed)."""
        return self.result.ready()
