"""The in-process PubSub layer: topics, the fastlane dispatcher, blinker for listeners.

Every broadcast goes through one blinker signal per PubSub, sent with the
topic as the sender. Its first receiver is the dispatcher, which looks up the
topic and loops over a plain list of subscribers (a blinker call per delivery
would cost ~25x a loop iteration). The application may connect its own
receivers to the same signal, for one topic or for all; each runs isolated
from the others' failures.

A subscriber is any object with:

``owner``
    Identity compared with the ``broadcast_from`` sender (a channel process).
``intercept``
    A container of event names handled by :meth:`deliver` instead of the
    fastlane (:data:`ALL_EVENTS` for subscribers that want everything).
``writer``
    The connection's writer: ``writer.encoder.broadcast(topic, event,
    payload)`` gives the ready frame (``None`` to skip this connection) and
    ``writer.write(frame)`` queues it.
``deliver(topic, event, payload)``
    Called for intercepted events.

The fastlane encodes a broadcast once per distinct encoder (serializer and
framing) and hands the same bytes to every connection (PROTOCOL.md 5.7).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from blinker import ANY, Signal

from ..flow import flow
from ..serializers import EncodeError
from .base import Adapter, make_node_name

__all__ = ["PubSub", "Topic", "ALL_EVENTS"]

log = logging.getLogger(__name__)


class _AllEvents:
    """A container that holds every event name."""

    __slots__ = ()

    def __contains__(self, item: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "ALL_EVENTS"


#: ``intercept`` value of subscribers that take every event through ``deliver``.
ALL_EVENTS = _AllEvents()


def check_broadcast(topic: Any, event: Any, payload: Any) -> None:
    """Raise ``TypeError`` unless topic and event are strings and payload a dict or bytes."""
    if not isinstance(topic, str):
        raise TypeError(f"topic must be a string, got {type(topic).__name__}")
    if not isinstance(event, str):
        raise TypeError(f"event must be a string, got {type(event).__name__}")
    if not isinstance(payload, (dict, bytes, bytearray, memoryview)):
        raise TypeError(f"a broadcast payload must be a dict or bytes, got {type(payload).__name__}")


class Topic:
    """The subscribers of one topic and the loop that delivers to them."""

    __slots__ = ("name", "subs")

    def __init__(self, name: str) -> None:
        self.name = name
        # An insertion-ordered set: O(1) unsubscribe, delivery in join order.
        self.subs: dict[Any, None] = {}

    def dispatch(self, event: str, payload: Any, from_: Any = None) -> int:
        """Deliver to every subscriber except ``from_``'s; returns the number reached.

        Raises ``TypeError``/``OverflowError``/:class:`EncodeError` before
        delivering anything when the payload cannot be encoded.
        """
        topic = self.name
        subs = list(self.subs)
        frames: dict[Any, Any] = {}
        # Encode for the first fastlane subscriber before any delivery, so a
        # payload that cannot be encoded fails the whole broadcast, not half of it.
        for sub in subs:
            if event not in sub.intercept:
                enc = sub.writer.encoder
                try:
                    frames[enc] = enc.broadcast(topic, event, payload)
                except EncodeError:
                    # The format cannot carry it (binary over V1): skip those connections.
                    frames[enc] = None
                break
        last_enc: Any = None
        last_frame: Any = None
        n = 0
        for sub in subs:
            if sub.owner is from_:
                continue
            if event in sub.intercept:
                sub.deliver(topic, event, payload)
                n += 1
                continue
            writer = sub.writer
            enc = writer.encoder
            if enc is not last_enc:
                last_frame = frames.get(enc, frames)
                if last_frame is frames:
                    try:
                        last_frame = enc.broadcast(topic, event, payload)
                    except EncodeError:
                        last_frame = None
                    frames[enc] = last_frame
                last_enc = enc
            if last_frame is not None:
                writer.write(last_frame)
                n += 1
        return n


class PubSub:
    """Topic subscriptions and local delivery; forwards to other nodes through an adapter.

    ``adapter`` is ``None`` for one process, or an
    :class:`~phx_gevent.pubsub.base.Adapter` (e.g. Redis) for several.
    """

    def __init__(self, adapter: Adapter | None = None, name: str = "phx_gevent") -> None:
        self.name = name
        self.adapter = adapter
        self.node_name = adapter.node_name if adapter is not None else make_node_name()
        self.topics: dict[str, Topic] = {}
        #: The blinker signal every broadcast goes through; the sender is the topic.
        self.signal = Signal(f"{name}.broadcast")
        self.signal.connect(self._dispatch, weak=False)
        self._handlers: dict[str, Callable[[Any, str], None]] = {}
        self._started = False

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the adapter (idempotent); called lazily on first use in each process."""
        if not self._started:
            if self.adapter is not None:
                # Marked started only once the adapter is: one that refused
                # (e.g. an unpatched process) is tried again, never skipped.
                self.adapter.start(self._receive)
            self._started = True
        if self.adapter is not None:
            # The adapter renames itself in a forked child (gunicorn --preload): follow it.
            self.node_name = self.adapter.node_name

    def stop(self) -> None:
        """Stop the adapter."""
        if self._started and self.adapter is not None:
            self.adapter.stop()
        self._started = False

    # -- subscriptions ------------------------------------------------------------------

    def subscribe(self, topic: str, sub: Any) -> None:
        """Add ``sub`` (see the module docstring for its shape) to ``topic``; idempotent."""
        t = self.topics.get(topic)
        if t is None:
            t = self.topics[topic] = Topic(topic)
        t.subs[sub] = None

    def unsubscribe(self, topic: str, sub: Any) -> None:
        """Remove ``sub`` from ``topic``; the topic is forgotten once empty. Idempotent."""
        t = self.topics.get(topic)
        if t is None:
            return
        t.subs.pop(sub, None)
        if not t.subs:
            del self.topics[topic]

    def subscriber_count(self, topic: str) -> int:
        """How many subscribers ``topic`` has in this process."""
        t = self.topics.get(topic)
        return 0 if t is None else len(t.subs)

    def connect(self, receiver: Callable[..., Any], topic: Any = ANY) -> Callable[..., Any]:
        """Call ``receiver(topic, event=..., payload=..., from_=...)`` for each broadcast.

        For one topic, or every topic when ``topic`` is omitted. The receiver is
        held strongly; an exception in it is logged and does not affect delivery.
        It runs inside the broadcaster's greenlet: keep it short and non-blocking.
        """
        self.signal.connect(receiver, sender=topic, weak=False)
        return receiver

    def disconnect(self, receiver: Callable[..., Any], topic: Any = ANY) -> None:
        """Undo :meth:`connect`."""
        self.signal.disconnect(receiver, sender=topic)

    # -- broadcasting -------------------------------------------------------------------

    def broadcast(self, topic: str, event: str, payload: Any, from_: Any = None) -> None:
        """Deliver to every subscriber of ``topic`` on every node (``from_``'s own excepted).

        Waits while the process is above its high-water mark
        (:class:`~phx_gevent.errors.BroadcastTimeout` past the timeout).
        Raises ``TypeError`` for a payload that is not a dict or bytes or that
        JSON cannot encode; then nothing was delivered.
        """
        check_broadcast(topic, event, payload)
        flow.wait()
        if self.adapter is not None:
            self.start()
            envelope = {
                "k": "b",
                "n": self.node_name,
                "t": topic,
                "e": event,
                "p": payload,
                "x": None if from_ is None else id(from_),
            }
            self.local_deliver(topic, event, payload, from_)
            self.adapter.publish(envelope)
        else:
            self.local_deliver(topic, event, payload, from_)

    def local_broadcast(self, topic: str, event: str, payload: Any, from_: Any = None) -> None:
        """Like :meth:`broadcast`, but this process only."""
        check_broadcast(topic, event, payload)
        flow.wait()
        self.local_deliver(topic, event, payload, from_)

    def local_deliver(self, topic: str, event: str, payload: Any, from_: Any = None) -> None:
        """Send the blinker signal for ``topic`` now, with no flow control (internal)."""
        receivers = self.signal.receivers
        if len(receivers) == 1:
            # Only our dispatcher is connected: skip blinker's set arithmetic.
            self._dispatch(topic, event=event, payload=payload, from_=from_)
            return
        dispatch = self._dispatch
        others = [r for r in self.signal.receivers_for(topic) if r != dispatch]
        dispatch(topic, event=event, payload=payload, from_=from_)
        for receiver in others:
            try:
                receiver(topic, event=event, payload=payload, from_=from_)
            except Exception:
                log.exception("phx_gevent: broadcast receiver %r failed", receiver)

    def _dispatch(self, topic: str, *, event: str, payload: Any, from_: Any = None) -> None:
        t = self.topics.get(topic)
        if t is not None:
            t.dispatch(event, payload, from_)

    # -- node-to-node -------------------------------------------------------------------

    def register(self, name: str, handler: Callable[[Any, str], None]) -> None:
        """Handle direct messages named ``name``: ``handler(payload, sender_node)``."""
        self._handlers[name] = handler

    def send_direct(self, node: str, name: str, payload: Any) -> None:
        """Send ``payload`` to handler ``name`` on ``node`` (this node: called at once)."""
        if node == self.node_name:
            handler = self._handlers.get(name)
            if handler is not None:
                handler(payload, node)
            return
        if self.adapter is None:
            return
        self.start()
        self.adapter.publish({"k": "d", "n": self.node_name, "to": node, "t": name, "e": "", "p": payload, "x": None})

    def _receive(self, envelope: dict[str, Any]) -> None:
        """Entry point for envelopes from other nodes (called by the adapter)."""
        try:
            kind = envelope.get("k")
            if kind == "b":
                self.local_deliver(envelope["t"], envelope["e"], envelope["p"])
            elif kind == "d" and envelope.get("to") == self.node_name:
                handler = self._handlers.get(envelope["t"])
                if handler is not None:
                    handler(envelope["p"], envelope["n"])
        except Exception:
            log.exception("phx_gevent: failed to deliver a message from node %r", envelope.get("n"))
