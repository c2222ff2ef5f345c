"""A channel of the client's protocol core (phoenix.js's Channel and Push), no I/O.

The socket (:class:`~phx_gevent.client.core.SocketCore`) routes frames to
:meth:`Channel.trigger` and tells each channel when the connection opens
(:meth:`Channel.socket_opened`) or is lost (:meth:`Channel.socket_lost`);
a channel talks to the socket through its public methods (``push``,
``timers``, ``run_callback``, ``make_ref``, ``leave_open_topic``, ``remove``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from .timers import Backoff

if TYPE_CHECKING:
    from .core import SocketCore

__all__ = ["CLOSED", "ERRORED", "JOINED", "JOINING", "LEAVING", "Channel", "Push"]

CLOSED, ERRORED, JOINED, JOINING, LEAVING = "closed", "errored", "joined", "joining", "leaving"
JOIN, LEAVE, CLOSE, ERROR, REPLY = "phx_join", "phx_leave", "phx_close", "phx_error", "phx_reply"


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
        ch.socket.push(ch.join_ref, self.ref, ch.topic, self.event, self.payload)

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
        self.channel.socket.timers.cancel(self._timer_key)

    def _start_timeout(self) -> None:
        self._cancel_timeout()
        self._cancel_ref_event()
        self.ref = self.channel.socket.make_ref()
        self.channel._pending[self.ref] = self
        self.channel.socket.timers.set(self._timer_key, self.timeout, lambda: self._trigger("timeout", {}))

    def _reply(self, payload: Any) -> None:
        self._cancel_ref_event()
        self._cancel_timeout()
        self.received = payload if isinstance(payload, dict) else {"status": None, "response": payload}
        self._outcome()

    def _outcome(self) -> None:
        assert self.received is not None
        status, response = self.received.get("status"), self.received.get("response")
        run = self.channel.socket.run_callback
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
    """One topic on a socket (phoenix.js's Channel): ``join``, ``push``, ``leave``, ``on(event)``.

    ``recover=True`` follows docs/recovery.md the way its phoenix.js snippet
    does, for channels with history: the join payload gets ``since`` (the
    offset of the last message received, ``None`` before any) and, while no
    offset is known, ``last`` (when given); every message carrying an
    offset in its ref slot updates :attr:`offset`; :attr:`recovered` is the
    last join reply's ``recovered`` (``False``: the gap is older than the
    history, refetch). Raises ``TypeError`` when ``recover`` is set and the
    params are not a dict (or a function returning one), ``ValueError`` for
    a ``last`` that is not a positive int.
    """

    def __init__(
        self,
        socket: SocketCore,
        topic: str,
        params: Any | Callable[[], Any] = None,
        *,
        recover: bool = False,
        last: int | None = None,
    ) -> None:
        if recover and params is not None and not callable(params) and not isinstance(params, Mapping):
            raise TypeError(f"recover=True adds 'since' to the join params: they must be a dict, got {params!r}")
        if last is not None and (not isinstance(last, int) or isinstance(last, bool) or last < 1):
            raise ValueError(f"last is a number of messages (1 to 100), got {last!r}")
        self.socket = socket
        self.topic = topic
        self.params = params if params is not None else {}
        self.recover = recover
        self.last = last
        self.offset: str | None = None
        self.recovered: bool | None = None
        self.state = CLOSED
        self.timeout = socket.timeout
        self.joined_once = False
        self._bindings: list[tuple[int, str, Callable[..., None]]] = []
        self._binding_ids = itertools.count(1)
        self._pending: dict[str, Push] = {}
        self._buffer: list[Push] = []
        self.join_push = Push(self, JOIN, self._join_params, self.timeout)
        self._rejoin = Backoff(socket.timers, ("rejoin", id(self)), self._rejoin_timer, socket.rejoin_after)
        self.join_push.receive("ok", self._on_join_ok)
        self.join_push.receive("error", self._on_join_error)
        self.join_push.receive("timeout", self._on_join_timeout)

    def __repr__(self) -> str:
        return f"<Channel {self.topic!r} {self.state} join_ref={self.join_ref!r}>"

    def _join_params(self) -> Any:
        # Evaluated on every (re)join, like phoenix.js's params closure.
        params = self.params() if callable(self.params) else self.params
        if not self.recover:
            return params
        if not isinstance(params, Mapping):
            raise TypeError(f"recover=True needs dict join params, the function returned {params!r}")
        params = {**params, "since": self.offset}
        if self.offset is None and self.last is not None:
            params["last"] = self.last
        return params

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
        push = Push(self, LEAVE, {}, self.timeout if timeout is None else timeout)

        def on_close(_: Any) -> None:
            self.trigger(CLOSE, "leave")

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
        return self.on(CLOSE, callback)

    def on_error(self, callback: Callable[..., None]) -> int:
        """``on("phx_error", callback)``: the channel crashed on the server, or the connection was lost."""
        return self.on(ERROR, callback)

    @property
    def can_push(self) -> bool:
        """True when a push would go out now (socket open and channel joined)."""
        return self.socket.connected and self.state == JOINED

    # -- internals (phoenix.js's Channel) -------------------------------------------------

    def _do_rejoin(self, timeout: float | None = None) -> None:
        if self.state == LEAVING:
            return
        self.socket.leave_open_topic(self)
        self.state = JOINING
        self.join_push._resend(self.timeout if timeout is None else timeout)

    def _rejoin_timer(self) -> None:
        if self.socket.connected:
            self._do_rejoin()

    def _on_join_ok(self, response: Any) -> None:
        if self.recover:
            recovered = response.get("recovered") if isinstance(response, dict) else None
            self.recovered = recovered if isinstance(recovered, bool) else None
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
        leave = Push(self, LEAVE, {}, self.timeout)
        leave._send()
        self.state = ERRORED
        self.join_push._reset()
        if self.socket.connected:
            self._rejoin.schedule_timeout()

    def _on_close(self) -> None:
        self._rejoin.reset()
        self.state = CLOSED
        self.socket.remove(self)

    def _on_error(self) -> None:
        if self.state == JOINING:
            self.join_push._reset()
        self.state = ERRORED
        if self.socket.connected:
            self._rejoin.schedule_timeout()

    # -- called by the socket ------------------------------------------------------------

    def is_member(self, topic: str, join_ref: Any) -> bool:
        """True when a message of ``topic`` with ``join_ref`` is for this join (PROTOCOL.md 7, isMember).

        Messages of an earlier join of this topic are stale.
        """
        if topic != self.topic:
            return False
        return not join_ref or join_ref == self.join_ref

    def trigger(self, event: str, payload: Any, ref: Any = None, join_ref: Any = None) -> None:
        """Deliver one message of this channel: replies to their push, then the ``on(event)`` bindings."""
        if event == REPLY:
            push = self._pending.get(ref) if ref is not None else None
            if push is not None:
                push._reply(payload)
        elif event == CLOSE:
            self._on_close()
        elif event == ERROR:
            self._on_error()
        elif self.recover and ref and isinstance(ref, str) and not event.startswith("phx_"):
            # A kept broadcast carries its offset in the ref slot (docs/recovery.md); replies and
            # phx_* frames use the slot for refs.
            self.offset = ref
        for _, want, callback in list(self._bindings):
            if want == event:
                self.socket.run_callback(callback, payload, ref, join_ref or self.join_ref)

    def socket_opened(self) -> None:
        """The connection opened (phoenix.js's onOpen hook of a channel): an errored channel rejoins now."""
        self._rejoin.reset()
        if self.state == ERRORED:
            self._do_rejoin()

    def socket_lost(self, reason: Any) -> None:
        """The connection was lost (phoenix.js's triggerChanError): a live channel errors, to rejoin on open."""
        self._rejoin.reset()
        if self.state not in (ERRORED, LEAVING, CLOSED):
            self.trigger(ERROR, {"source": "transport", "reason": reason})

    def forget_pushes(self) -> None:
        """Drop every push awaiting a reply, and their timeouts (the channel is gone)."""
        for push in list(self._pending.values()):
            push._cancel_timeout()
        self._pending.clear()
