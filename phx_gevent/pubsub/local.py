"""The in-process PubSub layer: topics, the fastlane dispatcher, blinker for listeners.

Every broadcast goes through one blinker signal per PubSub, sent with the
topic as the sender. Its first receiver is the dispatcher, which looks up the
topic and loops over a plain list of subscribers (a blinker call per delivery
would cost ~25x a loop iteration). The application may connect its own
receivers to the same signal, for one topic or for all; each runs isolated
from the others' failures.

A subscriber is a :class:`phx_gevent.contracts.Subscriber`. A topic's first subscriber (or
receiver) calls ``Adapter.interest``: per-topic routing then receives its broadcasts.

The fastlane encodes a broadcast once per distinct encoder (serializer and
framing) and hands the same bytes to every connection (PROTOCOL.md 5.7).

On a topic that keeps history (:mod:`phx_gevent.pubsub.history`), a
broadcast of a kept event carries an offset; subscribers with a true
``offsets`` attribute get a second variant of the frame with the offset in
the ref slot (:meth:`Topic.dispatch_offset`); every other subscriber gets
the plain frame. Topics without history take the unchanged :meth:`Topic.dispatch`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from blinker import ANY, Signal

from .. import telemetry
from ..contracts import Subscriber
from ..flow import flow
from . import codec
from .base import Adapter, make_node_name
from .history import HistoryConfig, HistoryEntry, HistoryRules, MemoryHistory, Recovery, parse_offset
from .request import NodeRequests, Responder
from .topic import ALL_EVENTS, RecoveryBuffer, Topic

__all__ = ["PubSub", "Topic", "ALL_EVENTS", "RecoveryBuffer", "check_broadcast"]

log = logging.getLogger(__name__)

#: Seconds between two publications of the history topic patterns in Redis.
RULES_REFRESH = 60.0


def check_broadcast(topic: Any, event: Any, payload: Any) -> None:
    """Raise ``TypeError`` unless topic and event are strings and payload a dict or bytes."""
    if not isinstance(topic, str):
        raise TypeError(f"topic must be a string, got {type(topic).__name__}")
    if not isinstance(event, str):
        raise TypeError(f"event must be a string, got {type(event).__name__}")
    if not isinstance(payload, (dict, bytes, bytearray, memoryview)):
        raise TypeError(f"a broadcast payload must be a dict or bytes, got {type(payload).__name__}")


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
        self._receivers: dict[tuple[Any, Any], None] = {}
        self._started = False
        #: Topic patterns that keep history, and where it is kept.
        self.history_rules = HistoryRules()
        self.history_store: Any = None
        # broadcast_from senders of history broadcasts, until their echo comes back.
        self._history_from: dict[int, Any] = {}
        self._rules_publisher: Any = None
        self._history_token = 0
        if adapter is not None and getattr(adapter, "supports_history", False):
            adapter.on_history_fallback = self._history_fallback  # type: ignore[attr-defined]

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the adapter (idempotent); called lazily on first use in each process."""
        if not self._started:
            if self.adapter is not None:
                # Marked started only once the adapter is: one that refused
                # (e.g. an unpatched process) is tried again, never skipped.
                self.adapter.start(self._receive)
                if self.history_rules:
                    self._publish_history_rules()
            self._started = True
        if self.adapter is not None:
            # The adapter renames itself in a forked child (gunicorn --preload): follow it.
            self.node_name = self.adapter.node_name

    def stop(self, timeout: float | None = None) -> int:
        """Stop the adapter, letting it forward what it queued (bounded); returns how many it dropped.

        ``timeout``: seconds for the adapter to send what it holds (default:
        the adapter's own).
        """
        dropped = 0
        if self._rules_publisher is not None:
            self._rules_publisher.kill(block=False)
            self._rules_publisher = None
        if self._started and self.adapter is not None:
            dropped = int(self.adapter.stop(timeout) or 0)
        self._started = False
        return dropped

    # -- subscriptions ------------------------------------------------------------------

    def subscribe(self, topic: str, sub: Subscriber) -> None:
        """Add ``sub`` (see the module docstring for its shape) to ``topic``; idempotent."""
        t = self.topics.get(topic)
        if t is None:
            t = self.topics[topic] = Topic(topic)
            if self.adapter is not None:
                self.adapter.interest(topic)
        t.subs[sub] = None

    def unsubscribe(self, topic: str, sub: Subscriber) -> None:
        """Remove ``sub`` from ``topic``; the topic is forgotten once empty. Idempotent."""
        t = self.topics.get(topic)
        if t is None:
            return
        t.subs.pop(sub, None)
        if not t.subs:
            del self.topics[topic]
            if self.adapter is not None:
                self.adapter.release(topic)

    def wait_routed(self, topic: str, timeout: float | None = None) -> bool:
        """Wait until other nodes' broadcasts on ``topic`` reach this process (a join calls it before its reply).

        False after ``timeout`` (default: the adapter's), or at once while the adapter is down. Never raises.
        """
        return True if self.adapter is None else self.adapter.wait_routed(topic, timeout)

    def subscriber_count(self, topic: str) -> int:
        """How many subscribers ``topic`` has in this process."""
        t = self.topics.get(topic)
        return 0 if t is None else len(t.subs)

    def connect(self, receiver: Callable[..., Any], topic: Any = ANY) -> Callable[..., Any]:
        """Call ``receiver(topic, event=..., payload=..., from_=...)`` for each broadcast.

        For one topic, or every topic when ``topic`` is omitted. The receiver is
        held strongly; an exception in it is logged and does not affect delivery.
        It runs inside the broadcaster's greenlet: keep it short and non-blocking.
        For one topic it returns once broadcasts from other nodes reach it (:meth:`wait_routed`, bounded).
        """
        if topic is not ANY and (receiver, topic) not in self._receivers and self.adapter is not None:
            self._receivers[(receiver, topic)] = None
            self.adapter.interest(topic)
            self.wait_routed(topic)
        self.signal.connect(receiver, sender=topic, weak=False)
        return receiver

    def disconnect(self, receiver: Callable[..., Any], topic: Any = ANY) -> None:
        """Undo :meth:`connect`."""
        self.signal.disconnect(receiver, sender=topic)
        if self._receivers.pop((receiver, topic), 0) is None and self.adapter is not None:
            self.adapter.release(topic)

    # -- history ------------------------------------------------------------------------

    def keep_history(self, pattern: str, config: HistoryConfig | dict[str, Any]) -> None:
        """Keep history for topics matching ``pattern`` (``"room:*"`` or an exact topic).

        Raises ``ValueError`` when the pattern already keeps history with
        another config. With an adapter that cannot share offsets (not Redis),
        history topics are broadcast as plain ones and recoveries answer
        ``recovered: false``, with a warning.
        """
        cfg = HistoryConfig.coerce(config)
        if cfg is None:
            return
        self.history_rules.add(pattern, cfg)
        if self.history_store is None:
            self.history_store = self._make_history_store()
        if self._started and self.adapter is not None:
            self._publish_history_rules()

    def _make_history_store(self) -> Any:
        adapter = self.adapter
        if adapter is None:
            return MemoryHistory()
        if getattr(adapter, "supports_history", False):
            from .history_redis import RedisHistory

            return RedisHistory(adapter.history_pool(), adapter.prefix)  # type: ignore[attr-defined]
        log.warning(
            "phx_gevent: %s cannot share history offsets between nodes; history topics are broadcast without them",
            type(adapter).__name__,
        )
        return False

    def _publish_history_rules(self) -> None:
        store = self.history_store
        if not store or not hasattr(store, "publish_rules"):
            return

        if self._rules_publisher is not None and not self._rules_publisher.dead:
            self._rules_publisher.kill(block=False)

        def publish() -> None:
            # Again every minute: a flushed or restarted Redis must not leave
            # emitters publishing history topics without offsets for long.
            failed = False
            while True:
                try:
                    store.publish_rules(self.history_rules)
                    failed = False
                except Exception as exc:
                    if not failed:  # Redis down: emitters publish plain meanwhile
                        log.warning("phx_gevent: could not publish the history topic patterns to Redis: %s", exc)
                    failed = True
                gevent.sleep(RULES_REFRESH)

        import gevent

        self._rules_publisher = gevent.spawn(publish)

    def history_config(self, topic: str, event: str | None = None) -> HistoryConfig | None:
        """The history config of ``topic`` (and ``event``, if given), or ``None`` when not kept."""
        if not self.history_rules:
            return None
        cfg = self.history_rules.for_topic(topic)
        if cfg is None or (event is not None and not cfg.keeps(event)):
            return None
        return cfg

    def fetch_history(
        self, topic: str, since: Any = None, last: int | None = None, *, has_since: bool = True
    ) -> Recovery:
        """What a recovery of ``topic`` from offset ``since`` replays (may wait for Redis).

        ``has_since=False`` with ``last``: the last ``last`` messages (a
        backlog). Never raises: a bad, unknown, other-topic or too-old offset,
        or Redis failing, gives ``recovered`` False and no entries.
        """
        cfg = self.history_config(topic)
        store = self.history_store
        if cfg is None or not store:
            return Recovery(has_since and since is None, [])
        return store.fetch(topic, since, last, cfg, has_since=has_since)

    def history(self, topic: str, since: str | None = None, limit: int = 100) -> list[HistoryEntry] | None:
        """The kept messages of ``topic``: after offset ``since``, or the last ``limit`` when ``since`` is None.

        Returns ``None`` when the messages after ``since`` are not all kept
        any more (or ``since`` is unknown): the caller must refetch from its
        own storage. ``limit`` is capped at 100 for a backlog.
        """
        if since is None:
            result = self.fetch_history(topic, None, limit, has_since=False)
        else:
            result = self.fetch_history(topic, since, None, has_since=True)
        if not result.recovered:
            return None
        return result.entries[:limit] if since is not None else result.entries

    def _history_fallback(self, plain: bytes) -> None:
        # The adapter could not append a history broadcast: deliver it here
        # without offset (the adapter marked the gap and forwards it plain).
        envelope = codec.decode(plain)
        from_ = self._history_from.pop(envelope["x"], None) if envelope["x"] is not None else None
        self.local_deliver(envelope["t"], envelope["e"], envelope["p"], from_)

    def _in_sequence(self, topic: str, offset: str) -> bool:
        """Gap detection for a received history message: False to skip it (already delivered).

        Messages of a topic arrive in offset order; a jump means this node
        missed some (its Redis listener was down, or its inbox overflowed):
        they are fetched from the history and delivered first.
        """
        t = self.topics.get(topic)
        if t is None:
            return True
        parsed = parse_offset(offset)
        if parsed is None:
            return True
        prev = t.hist
        if prev is not None and prev[0] == parsed[0]:
            if parsed[1] <= prev[1]:
                return False
            if parsed[1] > prev[1] + 1 and self.history_store:
                self._fill_gap(t, topic, prev, parsed[1])
        if t is self.topics.get(topic):
            t.hist = parsed
        return True

    def _fill_gap(self, t: Topic, topic: str, prev: tuple[str, int], upto: int | None) -> None:
        cfg = self.history_config(topic)
        if cfg is None:
            return
        rec = self.history_store.fetch(topic, f"{prev[0]}-{prev[1]}", None, cfg, has_since=True)
        if upto is None and rec.epoch == "":
            # Catching up after an outage, and Redis has no history of the topic (it
            # restarted empty): nobody published since, so nothing was missed here.
            # The offsets clients hold will answer ``recovered: false``.
            return
        if rec.recovered:
            for entry in rec.entries:
                seq = parse_offset(entry.offset)
                if seq is None or (upto is not None and seq[1] >= upto):
                    break
                if entry.event is None:
                    continue  # never reached when a recovery would see one; kept for safety
                self.local_deliver(topic, entry.event, entry.payload, None, entry.offset)
                t.hist = seq
            return
        # Not in the history any more: the clients that track offsets rejoin (phx_error),
        # and their recovery answers ``recovered: false``. Never a silent gap.
        lost: list[Any] = [sub for sub in t.subs if getattr(sub, "offsets", False)]  # channels that know history
        log.warning(
            "phx_gevent: missed history messages of %r after offset %s-%s that Redis no longer has; "
            "%d channel(s) told to rejoin",
            topic,
            prev[0],
            prev[1],
            len(lost),
        )
        for sub in lost:
            try:
                sub.history_lost()
            except Exception:
                log.exception("phx_gevent: could not end %r after a history gap", sub)

    def _broadcast_history(self, topic: str, event: str, payload: Any, from_: Any, cfg: HistoryConfig) -> None:
        store = self.history_store
        adapter = self.adapter
        if adapter is None:
            offset = store.append(topic, event, payload, cfg)
            self.local_deliver(topic, event, payload, from_, offset)
            return
        self.start()
        token = None
        if from_ is not None:
            self._history_token += 1
            token = self._history_token
            self._history_from[token] = from_
            if len(self._history_from) > 100_000:
                # Echoes that never came back (an outage): forget the oldest.
                for key in list(self._history_from)[:50_000]:
                    del self._history_from[key]
        envelope = {"k": "b", "n": self.node_name, "t": topic, "e": event, "p": payload, "x": token}
        if adapter.publish_history(envelope, cfg):
            return  # delivered here too, with its offset, when Redis echoes it
        if token is not None:
            self._history_from.pop(token, None)
        envelope["x"] = None if from_ is None else id(from_)
        self.local_deliver(topic, event, payload, from_)
        adapter.publish(envelope)

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
        if self.history_rules and self.history_store is not False:
            cfg = self.history_config(topic, event)
            if cfg is not None:
                self._broadcast_history(topic, event, payload, from_, cfg)
                return
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

    def local_deliver(self, topic: str, event: str, payload: Any, from_: Any = None, offset: str | None = None) -> None:
        """Send the blinker signal for ``topic`` now, with no flow control (internal)."""
        receivers = self.signal.receivers
        if len(receivers) == 1:
            # Only our dispatcher is connected: skip blinker's set arithmetic.
            if offset is None:
                self._dispatch(topic, event=event, payload=payload, from_=from_)
            else:
                self._dispatch_offset(topic, event, payload, from_, offset)
            return
        dispatch = self._dispatch
        others = [r for r in self.signal.receivers_for(topic) if r != dispatch]
        if offset is None:
            dispatch(topic, event=event, payload=payload, from_=from_)
        else:
            self._dispatch_offset(topic, event, payload, from_, offset)
        for receiver in others:
            try:
                receiver(topic, event=event, payload=payload, from_=from_)
            except Exception:
                log.exception("phx_gevent: broadcast receiver %r failed", receiver)

    def _dispatch(self, topic: str, *, event: str, payload: Any, from_: Any = None) -> None:
        t = self.topics.get(topic)
        if t is not None:
            n = t.dispatch(event, payload, from_)
            if telemetry.broadcast.receivers:  # once per broadcast, never per delivery
                self._emit_broadcast(topic, event, n, t.size)
        elif telemetry.broadcast.receivers:
            self._emit_broadcast(topic, event, 0, 0)

    def _emit_broadcast(self, topic: str, event: str, n: int, size: int) -> None:
        telemetry.emit(
            telemetry.broadcast,
            self,
            {"subscribers": n, "bytes": size},
            {"topic": topic, "event": event, "node": self.node_name},
        )

    def _dispatch_offset(self, topic: str, event: str, payload: Any, from_: Any, offset: str) -> None:
        t = self.topics.get(topic)
        if t is not None:
            n = t.dispatch_offset(event, payload, from_, offset)
            if telemetry.broadcast.receivers:  # once per broadcast, never per delivery
                self._emit_broadcast(topic, event, n, t.size)
        elif telemetry.broadcast.receivers:
            self._emit_broadcast(topic, event, 0, 0)

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

    def requests(self, name: str, serve: Callable[[dict[str, Any], Responder], None], timeout: float) -> NodeRequests:
        """Request/response with other nodes under handler ``name`` (see :mod:`phx_gevent.pubsub.request`).

        ``serve(request, responder)`` gets the requests other nodes send here;
        the returned object's ``ask(node, message, work)`` sends one.
        """
        return NodeRequests(self, name, serve, timeout)

    def _receive(self, envelope: dict[str, Any]) -> None:
        """Entry point for envelopes from other nodes (called by the adapter)."""
        try:
            kind = envelope.get("k")
            if kind == "b":
                offset = envelope.get("o")
                if offset is None:
                    self.local_deliver(envelope["t"], envelope["e"], envelope["p"])
                else:
                    from_ = None
                    if envelope["n"] == self.node_name and envelope["x"] is not None:
                        from_ = self._history_from.pop(envelope["x"], None)
                    if self._in_sequence(envelope["t"], offset) and not envelope.get("g"):
                        self.local_deliver(envelope["t"], envelope["e"], envelope["p"], from_, offset)
            elif kind == "sync":
                # The adapter's listener is back after an outage: catch up on every
                # history topic with subscribers here from what Redis kept.
                for name, t in list(self.topics.items()):
                    if t.hist is not None:
                        self._fill_gap(t, name, t.hist, None)
            elif kind == "d" and envelope.get("to") == self.node_name:
                handler = self._handlers.get(envelope["t"])
                if handler is not None:
                    handler(envelope["p"], envelope["n"])
        except Exception:
            log.exception("phx_gevent: failed to deliver a message from node %r", envelope.get("n"))
