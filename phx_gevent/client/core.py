"""The Phoenix client protocol as a state machine with no I/O: phoenix.js's semantics, driven from outside.

A driver owns the transport and a clock. It tells the core what happened
(:meth:`SocketCore.transport_opened`, :meth:`~SocketCore.transport_closed`,
:meth:`~SocketCore.receive`, and :meth:`~SocketCore.advance` when
:meth:`~SocketCore.next_deadline` has passed) and carries out what the core
asks for, taken from :meth:`~SocketCore.take_actions`:

``("open",)``
    Open the transport named by :attr:`SocketCore.transport` (``"websocket"``
    or ``"longpoll"``; the URL is the driver's business), then report
    ``transport_opened()`` or ``transport_closed()``. With a fallback set,
    :meth:`SocketCore.fallback_deadline` bounds the WebSocket attempt.
``("send", data)``
    Write one frame: ``str`` text, ``bytes`` binary.
``("close", code, reason)``
    Close the transport, then report ``transport_closed()``.

What it reproduces from phoenix.js (PROTOCOL.md 6 and 7): refs from one
counter per socket ("1", "2", ...), ``join_ref`` = the join's ref, a fresh
ref per (re)join and per send of a push; heartbeats on ``"phoenix"`` every
``heartbeat_interval`` seconds from the last reply, and a close with 1000
"heartbeat timeout" when a reply is missing at the next tick; reconnection
after any close the client did not ask for, with
:func:`reconnect_after` (10 ms ... 2 s, then 5 s), reset once connected;
channels ``closed -> joining -> joined`` with ``errored`` and ``leaving``;
rejoin with :func:`rejoin_after` (1, 2, 5, then 10 s) after a join error,
a join timeout (which first sends a ``phx_leave`` for that join) or a
``phx_error``; immediate rejoin of errored channels when the socket opens;
``phx_close`` closes a channel for good; pushes buffered (their timeout
running) while the channel is not joined, socket-level frames buffered while
disconnected and flushed on open before channels rejoin; messages with a
stale ``join_ref`` dropped; with ``long_poll_fallback`` (phoenix.js's
``longPollFallbackMs``, here in seconds), the fallback from WebSocket to
long-poll (switched for good, as phoenix.js does); no heartbeats over long-poll.

Callbacks (``channel.on``, ``push.receive``, ``on_open``...) run inside the
core's methods, i.e. in the driver's thread; they may call the core again.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any, cast

from ..options import ConfigurationError, check_seconds
from . import wire
from .channel import CLOSED, ERRORED, JOINED, JOINING, LEAVING, Channel, Push
from .timers import Backoff, Timers, reconnect_after, rejoin_after

__all__ = [
    "Channel",
    "Push",
    "SocketCore",
    "reconnect_after",
    "rejoin_after",
    "CLOSED",
    "ERRORED",
    "JOINED",
    "JOINING",
    "LEAVING",
    "LONGPOLL",
    "WEBSOCKET",
]

WEBSOCKET, LONGPOLL = "websocket", "longpoll"
_FALLBACK = ("fallback",)

log = logging.getLogger(__name__)


class SocketCore:
    """A phoenix.js Socket without I/O (see the module docstring for the driver's contract).

    ``clock``
        A monotonic clock in seconds (``time.monotonic``); every deadline is on it.
    ``heartbeat_interval``, ``timeout``
        Seconds (phoenix.js: 30 and 10). ``timeout`` is the default for joins and pushes.
    ``reconnect_after``, ``rejoin_after``
        ``f(tries) -> seconds``; default phoenix.js's schedules.
    ``transport``
        ``"websocket"`` (default) or ``"longpoll"``: the transport to open.
    ``long_poll_fallback``
        Seconds (phoenix.js's ``longPollFallbackMs``, in milliseconds there):
        when set, each WebSocket attempt that fails to open, or that does not
        answer a first heartbeat within this time, switches the socket to
        long-poll for good. Raises ``ConfigurationError`` (a ``ValueError``)
        unless ``0 < long_poll_fallback <= 60``, or for another ``transport``.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        heartbeat_interval: float = 30.0,
        timeout: float = 10.0,
        reconnect_after: Callable[[int], float] = reconnect_after,
        rejoin_after: Callable[[int], float] = rejoin_after,
        transport: str = WEBSOCKET,
        long_poll_fallback: float | None = None,
    ) -> None:
        if transport not in (WEBSOCKET, LONGPOLL):
            raise ConfigurationError(f"transport is 'websocket' or 'longpoll', got {transport!r}")
        if long_poll_fallback is not None:
            # phoenix.js's longPollFallbackMs counts milliseconds: 2500 here is refused, naming the unit.
            check_seconds("long_poll_fallback", long_poll_fallback, maximum=60.0)
        self.transport = transport
        self.long_poll_fallback = long_poll_fallback
        self.primary_passed_health_check = False  # phoenix.js's primaryPassedHealthCheck
        self._attempt: str | None = None  # a WebSocket attempt that may fall back: "opening", "pinging"
        self._ping_ref: str | None = None
        self.clock = clock
        self.heartbeat_interval = heartbeat_interval
        self.timeout = timeout
        self.rejoin_after = rejoin_after
        self.state = "closed"  # closed, connecting, open, closing
        self.channels: list[Channel] = []
        self._refs = itertools.count(1)
        self.timers = Timers(clock)
        self._actions: list[tuple[Any, ...]] = []
        self._send_buffer: list[tuple[Any, ...]] = []
        self._pending_heartbeat: str | None = None
        self._wanted = False  # the user wants a connection (connect() until disconnect())
        self._close_requested: str | None = None
        self._reconnect = Backoff(self.timers, ("reconnect",), self._reconnect_timer, reconnect_after)
        self._callbacks: dict[str, list[Callable[..., None]]] = {"open": [], "close": [], "error": [], "message": []}

    # -- the user's API -------------------------------------------------------------------

    def connect(self) -> None:
        """Ask for a connection (the driver gets ``("open",)``); reconnects by itself from now on."""
        self._wanted = True
        self._close_requested = None
        if self.state in ("closed",) and not self._reconnect.pending:
            self._open()

    def disconnect(self, code: int = 1000, reason: str = "") -> None:
        """Close for good (no reconnection): channels error locally and wait for the next ``connect()``."""
        self._wanted = False
        self._reconnect.reset()
        self._stop_heartbeat()
        self._end_attempt()
        if self.state in ("open", "connecting"):
            self._close_requested = "disconnect"
            self.state = "closing"
            self._actions.append(("close", code, reason))

    def channel(
        self, topic: str, params: Any | Callable[[], Any] = None, *, recover: bool = False, last: int | None = None
    ) -> Channel:
        """A new :class:`Channel` for ``topic``; ``params`` (or a function returning them) are the join payload.

        ``recover`` and ``last``: history recovery on rejoin, see :class:`Channel` (raises as it does).
        """
        ch = Channel(self, topic, params, recover=recover, last=last)
        self.channels.append(ch)
        return ch

    def make_ref(self) -> str:
        """The next ref: "1", "2", ... (one counter per socket, as phoenix.js)."""
        return str(next(self._refs))

    def on_open(self, callback: Callable[[], None]) -> None:
        """``callback()`` each time the transport opens."""
        self._callbacks["open"].append(callback)

    def on_close(self, callback: Callable[[Any, Any], None]) -> None:
        """``callback(code, reason)`` each time the transport closes."""
        self._callbacks["close"].append(callback)

    def on_message(self, callback: Callable[[wire.Message], None]) -> None:
        """``callback(message)`` for every decoded frame (after channel delivery)."""
        self._callbacks["message"].append(callback)

    @property
    def connected(self) -> bool:
        """True while the transport is open."""
        return self.state == "open"

    # -- the driver's API -----------------------------------------------------------------

    def take_actions(self) -> list[tuple[Any, ...]]:
        """What the driver must do now, in order (and forget)."""
        actions, self._actions = self._actions, []
        return actions

    def next_deadline(self) -> float | None:
        """The clock value at which :meth:`advance` has work, or ``None``."""
        return self.timers.next_deadline()

    def fallback_deadline(self) -> float | None:
        """The clock value at which a WebSocket attempt falls back to long-poll, or ``None``."""
        return self.timers.deadline(_FALLBACK)

    def advance(self) -> None:
        """Run every timer that is due on the clock (heartbeats, timeouts, reconnects, rejoins)."""
        while (callback := self.timers.pop_due()) is not None:
            self.run_callback(callback)

    def transport_opened(self) -> None:
        """The transport is open: flush what waited, start heartbeats, rejoin errored channels."""
        if self.state != "connecting":
            return
        self.state = "open"
        self._reconnect.reset()
        buffered, self._send_buffer = self._send_buffer, []
        for frame in buffered:
            self._write(*frame)
        self._schedule_heartbeat()
        if self._attempt == "opening":
            # phoenix.js: the WebSocket opened; it must answer a ping within a new period, or fall back.
            self._attempt = "pinging"
            self.timers.set(_FALLBACK, cast(float, self.long_poll_fallback), lambda: self._fall_back("no answer"))
            self._ping_ref = self.make_ref()
            self._write(None, self._ping_ref, "phoenix", "heartbeat", {})
        for callback in list(self._callbacks["open"]):
            self.run_callback(callback)
        for ch in list(self.channels):
            ch.socket_opened()

    def transport_closed(self, code: Any = None, reason: Any = None) -> None:
        """The transport closed (or failed to open): channels error, and it reconnects unless asked not to."""
        if self.state == "closed":
            return
        self.state = "closed"
        self._stop_heartbeat()
        self._pending_heartbeat = None
        for ch in list(self.channels):
            ch.socket_lost(reason)  # phoenix.js's triggerChanError: they rejoin on the next open
        for callback in list(self._callbacks["close"]):
            self.run_callback(callback, code, reason)
        requested, self._close_requested = self._close_requested, None
        if requested is None and self._attempt == "opening":
            self._fall_back(reason)  # the WebSocket failed to open: phoenix.js falls back at once
        elif requested == "fallback" and self._wanted:
            self._open()
        elif requested != "disconnect" and self._wanted:
            self._reconnect.schedule_timeout()

    def receive(self, data: str | bytes) -> None:
        """One frame from the server. A frame that cannot be decoded is logged and ignored."""
        try:
            msg = wire.decode(data)
        except wire.DecodeError as exc:
            log.warning("phx_gevent client: ignored an undecodable frame: %s", exc)
            return
        if msg.ref is not None and msg.ref == self._pending_heartbeat and msg.topic == "phoenix":
            self._pending_heartbeat = None
            self.timers.cancel(("hb_timeout",))
            self._schedule_heartbeat()
        if msg.ref is not None and msg.ref == self._ping_ref and msg.topic == "phoenix":
            self.primary_passed_health_check = True
            self._end_attempt()
        for ch in list(self.channels):
            if ch.is_member(msg.topic, msg.join_ref):
                ch.trigger(msg.event, msg.payload, msg.ref, msg.join_ref)
        for callback in list(self._callbacks["message"]):
            self.run_callback(callback, msg)

    # -- internals ------------------------------------------------------------------------

    def run_callback(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run a user's callback; its exception is logged, never raised into the state machine."""
        try:
            callback(*args)
        except Exception:
            log.exception("phx_gevent client: callback %r failed", callback)

    def _open(self) -> None:
        self.state = "connecting"
        self._end_attempt()
        if self.long_poll_fallback is not None and self.transport == WEBSOCKET:
            # phoenix.js's connectWithFallback, on every connect and reconnect over WebSocket.
            self._attempt = "opening"
            self.timers.set(_FALLBACK, self.long_poll_fallback, lambda: self._fall_back("timeout"))
        self._actions.append(("open",))

    def _end_attempt(self) -> None:
        self._attempt = self._ping_ref = None
        self.timers.cancel(_FALLBACK)

    def _fall_back(self, reason: Any) -> None:
        # phoenix.js's fallback(): long-poll from now on; an open or opening WebSocket is closed
        # (its channels rejoin over long-poll), and long-poll opens at once, without backoff.
        self._end_attempt()
        self.transport = LONGPOLL
        log.info("phx_gevent client: falling back to long-poll (%s)", reason)
        if self.state in ("open", "connecting"):
            self._stop_heartbeat()
            self._close_requested = "fallback"
            self.state = "closing"
            self._actions.append(("close", 1000, "falling back to long-poll"))
        elif self.state == "closed" and self._wanted:
            self._reconnect.reset()
            self._open()

    def _reconnect_timer(self) -> None:
        if self._wanted and self.state == "closed":
            self._open()

    def push(self, join_ref: Any, ref: Any, topic: str, event: str, payload: Any) -> None:
        """Send one frame now, or buffer it until the connection opens (phoenix.js's socket.push)."""
        if self.connected:
            self._write(join_ref, ref, topic, event, payload)
        else:
            self._send_buffer.append((join_ref, ref, topic, event, payload))

    def _write(self, join_ref: Any, ref: Any, topic: str, event: str, payload: Any) -> None:
        try:
            data = wire.encode(join_ref, ref, topic, event, payload)
        except (TypeError, ValueError, OverflowError) as exc:
            log.error("phx_gevent client: cannot encode %r on %r: %s", event, topic, exc)
            return
        self._actions.append(("send", data))

    def leave_open_topic(self, joining: Channel) -> None:
        """Before a (re)join, leave any other joined instance of its topic (phoenix.js's leaveOpenTopic)."""
        for ch in self.channels:
            if ch is not joining and ch.topic == joining.topic and ch.state in (JOINED, JOINING):
                ch.leave()

    def remove(self, channel: Channel) -> None:
        """Forget a closed channel and its pending pushes."""
        self.channels = [c for c in self.channels if c is not channel]
        channel.forget_pushes()

    def _schedule_heartbeat(self) -> None:
        # phoenix.js sends no heartbeats over long-poll (its skipHeartbeat).
        if self.heartbeat_interval and self.connected and self.transport == WEBSOCKET:
            self.timers.set(("heartbeat",), self.heartbeat_interval, self._send_heartbeat)

    def _stop_heartbeat(self) -> None:
        self.timers.cancel(("heartbeat",))
        self.timers.cancel(("hb_timeout",))

    def _send_heartbeat(self) -> None:
        if not self.connected:
            return
        self._pending_heartbeat = self.make_ref()
        self._write(None, self._pending_heartbeat, "phoenix", "heartbeat", {})
        self.timers.set(("hb_timeout",), self.heartbeat_interval, self._heartbeat_timeout)

    def _heartbeat_timeout(self) -> None:
        if self._pending_heartbeat is None or not self.connected:
            return
        self._pending_heartbeat = None
        log.info("phx_gevent client: heartbeat timeout; reconnecting")
        self._close_requested = "heartbeat"
        self.state = "closing"
        self._actions.append(("close", 1000, "heartbeat timeout"))
