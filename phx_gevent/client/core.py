"""The Phoenix client protocol as a state machine with no I/O: phoenix.js's semantics, driven from outside.

A driver owns the transport and a clock. It tells the core what happened
(:meth:`SocketCore.transport_opened`, :meth:`~SocketCore.transport_closed`,
:meth:`~SocketCore.receive`, and :meth:`~SocketCore.advance` when
:meth:`~SocketCore.next_deadline` has passed) and carries out what the core
asks for, taken from :meth:`~SocketCore.take_actions`:

``("open",)``
    Open the transport (the URL is the driver's business), then report
    ``transport_opened()`` or ``transport_closed()``.
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
stale ``join_ref`` dropped.

Callbacks (``channel.on``, ``push.receive``, ``on_open``...) run inside the
core's methods, i.e. in the driver's thread; they may call the core again.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable
from typing import Any, cast

from . import wire

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
]

log = logging.getLogger(__name__)

CLOSED, ERRORED, JOINED, JOINING, LEAVING = "closed", "errored", "joined", "joining", "leaving"
_JOIN, _LEAVE, _CLOSE, _ERROR, _REPLY = "phx_join", "phx_leave", "phx_close", "phx_error", "phx_reply"
_RECONNECT = (0.010, 0.050, 0.100, 0.150, 0.200, 0.250, 0.500, 1.0, 2.0)
_REJOIN = (1.0, 2.0, 5.0)


def reconnect_after(tries: int) -> float:
    """phoenix.js's socket reconnection delay in seconds for the ``tries``-th attempt (1-based)."""
    return _RECONNECT[tries - 1] if 1 <= tries <= len(_RECONNECT) else 5.0


def rejoin_after(tries: int) -> float:
    """phoenix.js's channel rejoin delay in seconds for the ``tries``-th attempt (1-based)."""
    return _REJOIN[tries - 1] if 1 <= tries <= len(_REJOIN) else 10.0


class _Backoff:
    """phoenix.js's Timer: a callback after ``schedule(tries)``, the count reset on success."""

    __slots__ = ("core", "key", "callback", "schedule", "tries")

    def __init__(self, core: SocketCore, key: Any, callback: Callable[[], None], schedule: Callable[[int], float]):
        self.core = core
        self.key = key
        self.callback = callback
        self.schedule = schedule
        self.tries = 0

    def reset(self) -> None:
        self.tries = 0
        self.core._cancel(self.key)

    def schedule_timeout(self) -> None:
        self.tries += 1
        self.core._set_timer(self.key, self.schedule(self.tries), self.callback)

    @property
    def pending(self) -> bool:
        return self.key in self.core._timers


class Push:
    """One message to the server awaiting a reply: ``receive(status, callback)`` hooks and a timeout.

    ``callback(response)`` runs once for the matching status: the server's
    ``"ok"``/``"error"``/any other status, or ``"timeout"`` (produced here).
    """

    def __init__(self, channel: Channel, event: str, payload: Any | Callable[[], Any], timeout: float) -> None:
        self.channel = channel
        self.event = event
        self._payload = payload
        self.timeout = timeout
        self.ref: str | None = None
        self.received: dict[str, Any] | None = None
        self.sent = False
        self._hooks: list[tuple[str, Callable[[Any], None]]] = []
        self._any: list[Callable[[str, Any], None]] = []
        self._timer_key = ("push", id(self))

    @property
    def payload(self) -> Any:
        """The payload (evaluated now when it was given as a function, as join params are)."""
        return self._payload() if callable(self._payload) else self._payload

    def receive(self, status: str, callback: Callable[[Any], None]) -> Push:
        """Call ``callback(response)`` when a reply with ``status`` arrives (at once if it already has)."""
        if self.received is not None and self.received.get("status") == status:
            callback(self.received.get("response"))
        self._hooks.append((status, callback))
        return self

    def receive_any(self, callback: Callable[[str, Any], None]) -> Push:
        """Call ``callback(status, response)`` for the outcome, whatever its status (at once if known)."""
        if self.received is not None:
            callback(cast(str, self.received.get("status")), self.received.get("response"))
        self._any.append(callback)
        return self

    def has_received(self, status: str) -> bool:
        """True when the reply (or the timeout) with ``status`` has arrived."""
        return self.received is not None and self.received.get("status") == status

    # -- internals (phoenix.js's Push) ----------------------------------------------------

    def _send(self) -> None:
        if self.has_received("timeout"):
            return
        self._start_timeout()
        self.sent = True
        ch = self.channel
        ch.socket._push(ch.join_ref, self.ref, ch.topic, self.event, self.payload)

    def _resend(self, timeout: float) -> None:
        self.timeout = timeout
        self._reset()
        self._send()

    def _reset(self) -> None:
        self._cancel_ref_event()
        self.ref = None
        self.received = None
        self.sent = False

    def _cancel_ref_event(self) -> None:
        if self.ref is not None:
            self.channel._pending.pop(self.ref, None)

    def _cancel_timeout(self) -> None:
        self.channel.socket._cancel(self._timer_key)

    def _start_timeout(self) -> None:
        self._cancel_timeout()
        self._cancel_ref_event()
        self.ref = self.channel.socket.make_ref()
        self.channel._pending[self.ref] = self
        self.channel.socket._set_timer(self._timer_key, self.timeout, lambda: self._trigger("timeout", {}))

    def _reply(self, payload: Any) -> None:
        self._cancel_ref_event()
        self._cancel_timeout()
        self.received = payload if isinstance(payload, dict) else {"status": None, "response": payload}
        self._outcome()

    def _outcome(self) -> None:
        assert self.received is not None
        status, response = self.received.get("status"), self.received.get("response")
        run = self.channel.socket._run
        for want, callback in list(self._hooks):
            if want == status:
                run(callback, response)
        for any_callback in list(self._any):
            run(any_callback, status, response)

    def _trigger(self, status: str, response: Any) -> None:
        # A local outcome (timeout, or a leave without a connection), delivered as a reply would be.
        if self.ref is not None and self.channel._pending.get(self.ref) is self:
            self._reply({"status": status, "response": response})
        else:
            self._cancel_timeout()
            self.received = {"status": status, "response": response}
            self._outcome()


class Channel:
    """One topic on a socket (phoenix.js's Channel): ``join``, ``push``, ``leave``, ``on(event)``."""

    def __init__(self, socket: SocketCore, topic: str, params: Any | Callable[[], Any] = None) -> None:
        self.socket = socket
        self.topic = topic
        self.params = params if params is not None else {}
        self.state = CLOSED
        self.timeout = socket.timeout
        self.joined_once = False
        self._bindings: list[tuple[int, str, Callable[..., None]]] = []
        self._binding_ids = itertools.count(1)
        self._pending: dict[str, Push] = {}
        self._buffer: list[Push] = []
        self.join_push = Push(self, _JOIN, self._join_params, self.timeout)
        self._rejoin = _Backoff(socket, ("rejoin", id(self)), self._rejoin_timer, socket.rejoin_after)
        self.join_push.receive("ok", self._on_join_ok)
        self.join_push.receive("error", self._on_join_error)
        self.join_push.receive("timeout", self._on_join_timeout)

    def __repr__(self) -> str:
        return f"<Channel {self.topic!r} {self.state} join_ref={self.join_ref!r}>"

    def _join_params(self) -> Any:
        # Evaluated on every (re)join, like phoenix.js's params closure.
        return self.params() if callable(self.params) else self.params

    @property
    def join_ref(self) -> str | None:
        """The ref of the current join (its ``join_ref``), or ``None`` before the first."""
        return self.join_push.ref

    # -- the API --------------------------------------------------------------------------

    def join(self, timeout: float | None = None) -> Push:
        """Join (once per Channel object; rejoins are automatic). Returns the join's :class:`Push`.

        Raises ``RuntimeError`` when called twice.
        """
        if self.joined_once:
            raise RuntimeError(f"tried to join {self.topic!r} more than once; make a new channel to join again")
        if timeout is not None:
            self.timeout = timeout
        self.joined_once = True
        self._do_rejoin()
        return self.join_push

    def push(self, event: str, payload: Any = None, timeout: float | None = None) -> Push:
        """Send ``event`` (buffered until joined); returns the :class:`Push` to hook replies on.

        ``payload`` is any JSON value, or bytes (a binary frame). Raises
        ``RuntimeError`` before :meth:`join`.
        """
        if not self.joined_once:
            raise RuntimeError(f"tried to push {event!r} to {self.topic!r} before joining it")
        push = Push(self, event, {} if payload is None else payload, self.timeout if timeout is None else timeout)
        if self.can_push:
            push._send()
        else:
            push._start_timeout()
            self._buffer.append(push)
        return push

    def leave(self, timeout: float | None = None) -> Push:
        """Leave: ``phx_leave``, then closed on its reply or timeout (at once when disconnected)."""
        self._rejoin.reset()
        self.join_push._cancel_timeout()
        self.state = LEAVING
        push = Push(self, _LEAVE, {}, self.timeout if timeout is None else timeout)

        def on_close(_: Any) -> None:
            self._trigger(_CLOSE, "leave")

        push.receive("ok", on_close).receive("timeout", on_close)
        push._send()
        if not self.can_push:
            push._trigger("ok", {})
        return push

    def on(self, event: str, callback: Callable[..., None]) -> int:
        """Call ``callback(payload, ref, join_ref)`` for every ``event`` on this topic; returns a binding id."""
        ref = next(self._binding_ids)
        self._bindings.append((ref, event, callback))
        return ref

    def off(self, event: str, ref: int | None = None) -> None:
        """Remove the bindings of ``event`` (only binding ``ref`` when given)."""
        self._bindings = [b for b in self._bindings if not (b[1] == event and (ref is None or b[0] == ref))]

    def on_close(self, callback: Callable[..., None]) -> int:
        """``on("phx_close", callback)``: the channel closed (left, or stopped by the server)."""
        return self.on(_CLOSE, callback)

    def on_error(self, callback: Callable[..., None]) -> int:
        """``on("phx_error", callback)``: the channel crashed on the server, or the connection was lost."""
        return self.on(_ERROR, callback)

    @property
    def can_push(self) -> bool:
        """True when a push would go out now (socket open and channel joined)."""
        return self.socket.connected and self.state == JOINED

    # -- internals (phoenix.js's Channel) -------------------------------------------------

    def _do_rejoin(self, timeout: float | None = None) -> None:
        if self.state == LEAVING:
            return
        self.socket._leave_open_topic(self)
        self.state = JOINING
        self.join_push._resend(self.timeout if timeout is None else timeout)

    def _rejoin_timer(self) -> None:
        if self.socket.connected:
            self._do_rejoin()

    def _on_join_ok(self, _: Any) -> None:
        self.state = JOINED
        self._rejoin.reset()
        buffered, self._buffer = self._buffer, []
        for push in buffered:
            push._send()

    def _on_join_error(self, _: Any) -> None:
        self.state = ERRORED
        if self.socket.connected:
            self._rejoin.schedule_timeout()

    def _on_join_timeout(self, _: Any) -> None:
        # Tell the server to drop the join it may still complete, then retry with backoff.
        leave = Push(self, _LEAVE, {}, self.timeout)
        leave._send()
        self.state = ERRORED
        self.join_push._reset()
        if self.socket.connected:
            self._rejoin.schedule_timeout()

    def _on_close(self) -> None:
        self._rejoin.reset()
        self.state = CLOSED
        self.socket._remove(self)

    def _on_error(self) -> None:
        if self.state == JOINING:
            self.join_push._reset()
        self.state = ERRORED
        if self.socket.connected:
            self._rejoin.schedule_timeout()

    def _is_member(self, topic: str, join_ref: Any) -> bool:
        # Messages of an earlier join of this topic are stale (PROTOCOL.md 7, isMember).
        if topic != self.topic:
            return False
        return not join_ref or join_ref == self.join_ref

    def _trigger(self, event: str, payload: Any, ref: Any = None, join_ref: Any = None) -> None:
        if event == _REPLY:
            push = self._pending.get(ref) if ref is not None else None
            if push is not None:
                push._reply(payload)
        elif event == _CLOSE:
            self._on_close()
        elif event == _ERROR:
            self._on_error()
        for _, want, callback in list(self._bindings):
            if want == event:
                self.socket._run(callback, payload, ref, join_ref or self.join_ref)


class SocketCore:
    """A phoenix.js Socket without I/O (see the module docstring for the driver's contract).

    ``clock``
        A monotonic clock in seconds (``time.monotonic``); every deadline is on it.
    ``heartbeat_interval``, ``timeout``
        Seconds (phoenix.js: 30 and 10). ``timeout`` is the default for joins and pushes.
    ``reconnect_after``, ``rejoin_after``
        ``f(tries) -> seconds``; default phoenix.js's schedules.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        heartbeat_interval: float = 30.0,
        timeout: float = 10.0,
        reconnect_after: Callable[[int], float] = reconnect_after,
        rejoin_after: Callable[[int], float] = rejoin_after,
    ) -> None:
        self.clock = clock
        self.heartbeat_interval = heartbeat_interval
        self.timeout = timeout
        self.rejoin_after = rejoin_after
        self.state = "closed"  # closed, connecting, open, closing
        self.channels: list[Channel] = []
        self._refs = itertools.count(1)
        # key -> (deadline, sequence, callback); the heap holds (deadline, sequence, key), stale entries skipped.
        self._timers: dict[Any, tuple[float, int, Callable[[], None]]] = {}
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()
        self._actions: list[tuple[Any, ...]] = []
        self._send_buffer: list[tuple[Any, ...]] = []
        self._pending_heartbeat: str | None = None
        self._wanted = False  # the user wants a connection (connect() until disconnect())
        self._close_requested: str | None = None
        self._reconnect = _Backoff(self, ("reconnect",), self._reconnect_timer, reconnect_after)
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
        if self.state in ("open", "connecting"):
            self._close_requested = "disconnect"
            self.state = "closing"
            self._actions.append(("close", code, reason))

    def channel(self, topic: str, params: Any | Callable[[], Any] = None) -> Channel:
        """A new :class:`Channel` for ``topic``; ``params`` (or a function returning them) are the join payload."""
        ch = Channel(self, topic, params)
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
        heap = self._heap
        while heap:
            when, seq, key = heap[0]
            entry = self._timers.get(key)
            if entry is not None and entry[1] == seq:
                return when
            heapq.heappop(heap)  # cancelled or rescheduled
        return None

    def advance(self) -> None:
        """Run every timer that is due on the clock (heartbeats, timeouts, reconnects, rejoins)."""
        while True:
            when = self.next_deadline()
            if when is None or when > self.clock():
                return
            _, _, key = heapq.heappop(self._heap)
            _, _, callback = self._timers.pop(key)
            self._run(callback)

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
        for callback in list(self._callbacks["open"]):
            self._run(callback)
        for ch in list(self.channels):
            # phoenix.js: each channel's socket.onOpen hook.
            ch._rejoin.reset()
            if ch.state == ERRORED:
                ch._do_rejoin()

    def transport_closed(self, code: Any = None, reason: Any = None) -> None:
        """The transport closed (or failed to open): channels error, and it reconnects unless asked not to."""
        if self.state == "closed":
            return
        self.state = "closed"
        self._stop_heartbeat()
        self._pending_heartbeat = None
        for ch in list(self.channels):
            # phoenix.js's triggerChanError: the socket lost them; they rejoin on the next open.
            ch._rejoin.reset()
            if ch.state not in (ERRORED, LEAVING, CLOSED):
                ch._trigger(_ERROR, {"source": "transport", "reason": reason})
        for callback in list(self._callbacks["close"]):
            self._run(callback, code, reason)
        requested, self._close_requested = self._close_requested, None
        if requested != "disconnect" and self._wanted:
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
            self._cancel(("hb_timeout",))
            self._schedule_heartbeat()
        for ch in list(self.channels):
            if ch._is_member(msg.topic, msg.join_ref):
                ch._trigger(msg.event, msg.payload, msg.ref, msg.join_ref)
        for callback in list(self._callbacks["message"]):
            self._run(callback, msg)

    # -- internals ------------------------------------------------------------------------

    def _run(self, callback: Callable[..., Any], *args: Any) -> None:
        # A callback's exception must not corrupt the state machine.
        try:
            callback(*args)
        except Exception:
            log.exception("phx_gevent client: callback %r failed", callback)

    def _set_timer(self, key: Any, delay: float, callback: Callable[[], None]) -> None:
        when = self.clock() + delay
        seq = next(self._seq)
        self._timers[key] = (when, seq, callback)
        heapq.heappush(self._heap, (when, seq, key))

    def _cancel(self, key: Any) -> None:
        self._timers.pop(key, None)

    def _open(self) -> None:
        self.state = "connecting"
        self._actions.append(("open",))

    def _reconnect_timer(self) -> None:
        if self._wanted and self.state == "closed":
            self._open()

    def _push(self, join_ref: Any, ref: Any, topic: str, event: str, payload: Any) -> None:
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

    def _leave_open_topic(self, joining: Channel) -> None:
        # Before a (re)join, leave any other instance of the topic (phoenix.js's leaveOpenTopic).
        for ch in self.channels:
            if ch is not joining and ch.topic == joining.topic and ch.state in (JOINED, JOINING):
                ch.leave()

    def _remove(self, channel: Channel) -> None:
        self.channels = [c for c in self.channels if c is not channel]
        for push in list(channel._pending.values()):
            push._cancel_timeout()
        channel._pending.clear()

    def _schedule_heartbeat(self) -> None:
        if self.heartbeat_interval and self.connected:
            self._set_timer(("heartbeat",), self.heartbeat_interval, self._send_heartbeat)

    def _stop_heartbeat(self) -> None:
        self._cancel(("heartbeat",))
        self._cancel(("hb_timeout",))

    def _send_heartbeat(self) -> None:
        if not self.connected:
            return
        self._pending_heartbeat = self.make_ref()
        self._write(None, self._pending_heartbeat, "phoenix", "heartbeat", {})
        self._set_timer(("hb_timeout",), self.heartbeat_interval, self._heartbeat_timeout)

    def _heartbeat_timeout(self) -> None:
        if self._pending_heartbeat is None or not self.connected:
            return
        self._pending_heartbeat = None
        log.info("phx_gevent client: heartbeat timeout; reconnecting")
        self._close_requested = "heartbeat"
        self.state = "closing"
        self._actions.append(("close", 1000, "heartbeat timeout"))
