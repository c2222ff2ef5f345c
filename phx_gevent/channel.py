"""The Channel base class, callback results, stop reasons and the push/reply helpers.

A Channel subclass serves one topic pattern; one instance is created per
join, so ``self`` may hold per-join state. Callbacks run in the channel's
own greenlet, one at a time and in the order their messages arrived::

    class RoomChannel(Channel):
        intercept = ["user_joined"]

        def join(self, topic, payload, socket):
            socket.channel_pid.send("after_join")     # handled after the join reply
            return ok({"user": socket.assigns["user"]})

        def handle_info(self, message, socket):
            if message == "after_join":
                self.push(socket, "welcome", {})

        def handle_in(self, event, payload, socket):
            if event == "ping":
                return ok(payload)                    # phx_reply {"status": "ok", ...}
            return None                               # no reply

What a callback may return:

* ``join``: :func:`ok` or :func:`error` (explicitly; ``None`` is an error);
* ``handle_in``: ``None`` (no reply), a :class:`Reply` (``ok(...)``,
  ``error(...)`` or ``Reply(status, response)``), :func:`noreply`, or :func:`stop`;
* ``handle_out``, ``handle_info`` and ``handle_cast``: ``None``, :func:`noreply` or :func:`stop`;
* ``handle_call``: the reply to the caller (any value), :func:`noreply` to
  answer later with ``from_.reply(value)``, or :func:`stop`.

``noreply(timeout=seconds)`` is Phoenix's ``{:noreply, socket, timeout}``:
if no other message reaches the channel within ``timeout`` seconds,
``handle_info(TIMEOUT, socket)`` runs (``TIMEOUT == "timeout"``).

Anything else ends the channel with a :class:`~phx_gevent.errors.CallbackReturnError`
that names what was expected and what came (the client gets ``phx_error``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

from .errors import ChannelError
from .socket import SocketState

__all__ = [
    "Channel",
    "Reply",
    "Stop",
    "NoReply",
    "SocketRef",
    "ok",
    "error",
    "stop",
    "noreply",
    "TIMEOUT",
    "push",
    "reply",
    "broadcast",
    "broadcast_from",
    "socket_ref",
    "is_graceful",
    "intercepted_events",
    "NORMAL",
    "SHUTDOWN",
    "LEFT",
    "CLOSED",
    "DISCONNECTED",
    "DRAINING",
    "DUPLICATE_JOIN",
    "INACTIVE",
]

log = logging.getLogger(__name__)

# -- stop and terminate reasons (Phoenix's atoms and {:shutdown, _} tuples) -----------------

#: ``stop(NORMAL)``: a graceful stop; the client gets ``phx_close``.
NORMAL = "normal"
#: ``stop(SHUTDOWN)``: a graceful stop; the client gets ``phx_close``.
SHUTDOWN = "shutdown"
#: terminate reason after the client's ``phx_leave``.
LEFT = ("shutdown", "left")
#: terminate reason when the connection closed (client went away, idle timeout, bad frame).
CLOSED = ("shutdown", "closed")
#: terminate reason after ``broadcast(<socket id>, "disconnect", {})``.
DISCONNECTED = ("shutdown", "disconnected")
#: terminate reason when the server drains connections at shutdown (close 1012).
DRAINING = ("shutdown", "draining")
#: terminate reason of a channel replaced by a second join of its topic.
DUPLICATE_JOIN = ("shutdown", "duplicate_join")
#: terminate reason of a long-poll session nobody polled for too long.
INACTIVE = ("shutdown", "inactive")


def is_graceful(reason: Any) -> bool:
    """True for reasons that close a channel cleanly (``phx_close``), False for errors (``phx_error``).

    Graceful: ``"normal"``, ``"shutdown"`` and any ``("shutdown", detail)`` tuple.
    """
    if reason == NORMAL or reason == SHUTDOWN:
        return True
    return isinstance(reason, tuple) and len(reason) == 2 and reason[0] == SHUTDOWN


# -- callback results -----------------------------------------------------------------------


class Reply(NamedTuple):
    """A reply: ``{"status": status, "response": response}`` on the wire.

    ``response`` may be any JSON value, or ``bytes`` for a binary reply;
    ``None`` (a bare status such as ``Reply("noop")``) is sent as ``{}``, as
    Phoenix sends ``{:reply, :noop, socket}``.
    """

    status: str
    response: Any = None


class Stop(NamedTuple):
    """Stop the channel with ``reason``, after sending ``reply`` if given."""

    reason: Any
    reply: Reply | None = None


class NoReply(NamedTuple):
    """No reply now (Phoenix's ``{:noreply, socket}``), optionally with an idle ``timeout`` in seconds."""

    timeout: float | None = None


#: The message ``handle_info`` gets when a :func:`noreply` timeout expires (Phoenix's ``:timeout``).
TIMEOUT = "timeout"


def noreply(timeout: float | None = None) -> NoReply:
    """Return from a callback to send nothing (as ``None``), with an optional idle timeout.

    With ``timeout`` (seconds), ``handle_info(TIMEOUT, socket)`` runs unless
    another message reaches the channel first (Phoenix's
    ``{:noreply, socket, timeout}``). From ``handle_call`` it means "no reply
    yet": answer later with ``from_.reply(value)``. Raises ``ValueError`` for
    a negative timeout.
    """
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"noreply timeout must be >= 0 seconds, got {timeout!r}")
    return NoReply(timeout)


def ok(response: Any = None) -> Reply:
    """An ``"ok"`` result (``response`` defaults to ``{}``)."""
    return Reply("ok", {} if response is None else response)


def error(response: Any = None) -> Reply:
    """An ``"error"`` result (``response`` defaults to ``{}``)."""
    return Reply("error", {} if response is None else response)


def stop(reason: Any = NORMAL, reply: Reply | None = None) -> Stop:
    """Stop the channel: graceful reasons send ``phx_close``, others ``phx_error``.

    Graceful reasons are :data:`NORMAL`, :data:`SHUTDOWN` and ``("shutdown", x)``.
    ``reply`` (from ``handle_in`` only) is sent first.
    """
    if reply is not None and not isinstance(reply, Reply):
        raise TypeError(f"stop(reply=...) expects ok(...)/error(...)/Reply, got {reply!r}")
    return Stop(reason, reply)


# -- async replies ---------------------------------------------------------------------------


class SocketRef(NamedTuple):
    """What :func:`reply` needs to answer a message later, from any greenlet."""

    connection: Any
    topic: str
    join_ref: Any
    ref: Any


def socket_ref(socket: SocketState) -> SocketRef:
    """Capture the message being handled, to :func:`reply` to it later.

    Only valid inside ``handle_in`` for a message with a ref; raises
    :class:`~phx_gevent.errors.ChannelError` elsewhere.
    """
    if not socket.joined:
        raise ChannelError("socket_ref is only available after the join")
    if socket.ref is None:
        raise ChannelError("socket_ref needs a message with a ref (use it inside handle_in)")
    assert socket.topic is not None  # joined
    return SocketRef(socket.private, socket.topic, socket.join_ref, socket.ref)


def reply(ref: SocketRef, result: Reply | str) -> None:
    """Send a ``phx_reply`` for the message captured by :func:`socket_ref`.

    ``result`` is ``ok(...)``, ``error(...)``, a :class:`Reply`, or a bare
    status string (response ``{}``). Safe from any greenlet. Raises
    ``TypeError`` for any other ``result`` or a response JSON cannot hold
    (bytes inside it), :class:`~phx_gevent.serializers.EncodeError` when the
    binary layout cannot carry it (a field over 255 bytes); nothing is sent then.
    """
    if isinstance(result, str):
        result = Reply(result, {})
    elif not isinstance(result, Reply):
        raise TypeError(f"reply expects ok(...)/error(...)/Reply or a status string, got {result!r}")
    ref.connection.send_reply(ref.join_ref, ref.ref, ref.topic, result.status, result.response)


# -- pushing and broadcasting ---------------------------------------------------------------


def _require_joined(socket: SocketState, what: str) -> None:
    if not socket.joined:
        raise ChannelError(
            f"{what} is not allowed before the join reply; send yourself a message "
            f"(socket.channel_pid.send(...)) and {what} from handle_info"
        )


def push(socket: SocketState, event: str, payload: Any) -> None:
    """Send ``event`` with ``payload`` (a dict, or bytes for a binary frame) to this client.

    Raises :class:`~phx_gevent.errors.ChannelError` inside ``join``,
    ``TypeError`` for an event that is not a string,
    :class:`~phx_gevent.serializers.EncodeError` (a ``ValueError``) for a
    payload that is neither a dict nor bytes, and ``TypeError``/``OverflowError``
    for values inside it that JSON cannot hold (bytes, NaN); nothing is sent then.
    """
    _require_joined(socket, "push")
    if not isinstance(event, str):
        raise TypeError(f"event must be a string, got {type(event).__name__}")
    socket.private.send_push(socket.join_ref, socket.topic, event, payload)


def broadcast(socket: SocketState, event: str, payload: Any) -> None:
    """Broadcast on the channel's topic to every subscriber on every node."""
    _require_joined(socket, "broadcast")
    socket.endpoint.broadcast(socket.topic, event, payload)


def broadcast_from(socket: SocketState, event: str, payload: Any) -> None:
    """Broadcast on the channel's topic to everyone but this channel's own client."""
    _require_joined(socket, "broadcast_from")
    socket.endpoint.broadcast_from(socket, socket.topic, event, payload)


# -- the base class --------------------------------------------------------------------------


class Channel:
    """Base class of channels. Override ``join`` and ``handle_in``; the rest is optional.

    ``intercept`` lists the broadcast events routed through :meth:`handle_out`
    for each subscriber instead of the fastlane.
    """

    intercept: Iterable[str] = ()
    _intercept_set: frozenset[str] = frozenset()
    #: Keep history of this channel's topics for recovery on rejoin, e.g.
    #: ``{"size": 1000, "ttl": 300, "events": ["new_msg"]}`` (docs/recovery.md).
    #: A join payload with ``since`` (an offset or null) then recovers what was
    #: missed; ``last: N`` asks for a backlog.
    history: dict[str, Any] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        events = cls.intercept
        if isinstance(events, str):
            raise TypeError(f"{cls.__name__}.intercept must be a list of event names, not a string")
        cls._intercept_set = frozenset(events)
        for event in cls._intercept_set:
            if not isinstance(event, str):
                raise TypeError(f"{cls.__name__}.intercept: event names must be strings, got {event!r}")

    def join(self, topic: str, payload: Any, socket: SocketState) -> Reply:
        """Authorize a join: return ``ok(reply)`` or ``error(reply)``.

        ``push``/``broadcast`` are not allowed here (the client has not seen
        the join reply yet); send yourself a message and push from
        ``handle_info``. The default refuses with ``{"reason": "join not implemented"}``.
        """
        return error({"reason": "join not implemented"})

    def handle_in(self, event: str, payload: Any, socket: SocketState) -> Reply | Stop | None:
        """Handle a client push. Return ``None``, a :class:`Reply`, or :func:`stop`.

        The default raises, which crashes the channel (as in Phoenix, where a
        missing clause is an error).
        """
        raise NotImplementedError(f"{type(self).__name__} has no handle_in for {event!r}")

    def handle_out(self, event: str, payload: Any, socket: SocketState) -> Stop | None:
        """Handle an intercepted broadcast for this client; the default pushes it unchanged."""
        push(socket, event, payload)
        return None

    def handle_info(self, message: Any, socket: SocketState) -> Stop | NoReply | None:
        """Handle a message sent with ``socket.channel_pid.send(message)``; the default logs it.

        Also receives :data:`TIMEOUT` after ``noreply(timeout=...)``, and
        :class:`~phx_gevent.Broadcast` for topics subscribed with ``endpoint.subscribe``.
        """
        log.warning("%s received an unexpected message in handle_info: %r", type(self).__name__, message)
        return None

    def handle_call(self, message: Any, from_: Any, socket: SocketState) -> Any:
        """Answer ``socket.channel_pid.call(message)`` (GenServer's ``handle_call``).

        Return the reply (any value, ``None`` included), :func:`noreply` to
        answer later with ``from_.reply(value)`` (from any greenlet), or
        :func:`stop` (the caller gets :class:`~phx_gevent.errors.ChannelExited`
        unless ``from_.reply`` was called first). The default raises, which
        crashes the channel, as a missing clause does in Phoenix.
        """
        raise NotImplementedError(f"{type(self).__name__} has no handle_call for {message!r}")

    def handle_cast(self, message: Any, socket: SocketState) -> Stop | NoReply | None:
        """Handle ``socket.channel_pid.cast(message)`` (GenServer's ``handle_cast``); like ``handle_info``.

        The default raises, which crashes the channel, as in Phoenix.
        """
        raise NotImplementedError(f"{type(self).__name__} has no handle_cast for {message!r}")

    def terminate(self, reason: Any, socket: SocketState) -> None:
        """Called once when a channel ends, with one of the reason constants or the exception.

        Also after a refused join (``join`` returned ``error(...)``) with
        :data:`SHUTDOWN`, and after a crashed join with the exception, as
        Phoenix does; not after a join that timed out (its greenlet was killed).
        """

    # Convenience wrappers, so callbacks can write ``self.push(socket, ...)``.

    def push(self, socket: SocketState, event: str, payload: Any) -> None:
        """See :func:`push`."""
        push(socket, event, payload)

    def broadcast(self, socket: SocketState, event: str, payload: Any) -> None:
        """See :func:`broadcast`."""
        broadcast(socket, event, payload)

    def broadcast_from(self, socket: SocketState, event: str, payload: Any) -> None:
        """See :func:`broadcast_from`."""
        broadcast_from(socket, event, payload)

    def reply(self, ref: SocketRef, result: Reply | str) -> None:
        """See :func:`reply`."""
        reply(ref, result)

    def socket_ref(self, socket: SocketState) -> SocketRef:
        """See :func:`socket_ref`."""
        return socket_ref(socket)


def intercepted_events(channel_cls: type[Channel]) -> frozenset[str]:
    """The events of ``channel_cls.intercept``, checked and frozen when the class was defined (for the runtime)."""
    return channel_cls._intercept_set
