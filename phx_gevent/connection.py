"""The per-connection multiplexer: PROTOCOL.md 5.1, with no I/O of its own.

A :class:`Connection` receives decoded :class:`~phx_gevent.serializers.Message`
objects in order and applies Phoenix's socket rules: heartbeat, synchronous
join, unmatched topic, duplicate join, leave, stale join_ref. It writes
through a *transport* object, so it runs the same over WebSocket, long-poll,
or a fake transport in tests. A transport provides:

``send(data)``
    Queue one encoded message (``str`` text, ``bytes`` binary).
``close(code, reason)``
    End the connection (a WebSocket close code; long-poll ignores it).
``writer``
    The fastlane target of the connection's channels (``.encoder`` and
    ``.write(frame)``, see :mod:`phx_gevent.pubsub.local`).
``name``
    ``"websocket"`` or ``"longpoll"``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

import gevent

from . import memory, supervise, telemetry
from .channel import CLOSED, DISCONNECTED, DRAINING, DUPLICATE_JOIN
from .channels.process import ChannelProcess
from .contracts import Transport
from .flow import flow
from .pubsub.local import ALL_EVENTS
from .serializers import Message, Serializer
from .socket import SocketState
from .transports.frames import CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART  # close codes live in one place

if TYPE_CHECKING:  # pragma: no cover
    from .endpoint import Endpoint
    from .mount import SocketMount
    from .pubsub.local import PubSub

__all__ = ["Connection"]

log = logging.getLogger(__name__)

#: Seconds between two tracebacks caused by one connection (see :meth:`Connection.log_error`).
ERROR_LOG_INTERVAL = 10.0


class _IdSubscription:
    """Subscribes a connection to its socket id topic, for ``"disconnect"``."""

    __slots__ = ("owner", "intercept", "writer")

    def __init__(self, conn: Connection) -> None:
        self.owner = conn
        self.intercept = ALL_EVENTS
        self.writer = None

    def deliver(self, topic: str, event: str, payload: Any) -> None:
        # Other broadcasts to the id topic are ignored, as in Phoenix.
        if event == "disconnect":
            self.owner.disconnect()


class Connection:
    """One client connection: its channels, its serializer, and the socket rules.

    Also the connection's ``transport_pid``: ``send("garbage_collect")``
    forces a (rate-limited) garbage collection.
    """

    __slots__ = (
        "mount",
        "handler",
        "socket",
        "serializer",
        "transport",
        "writer",
        "channels",
        "partition",
        "closed",
        "close_reason",
        "_id_sub",
        "log_level",
        "max_mailbox",
        "mailbox_timeout",
        "_errlog",
        "__weakref__",
    )

    def __init__(self, mount: SocketMount, socket: SocketState, serializer: Serializer, transport: Transport) -> None:
        self.mount = mount
        self.handler = mount.handler
        self.socket = socket
        self.serializer = serializer
        self.transport = transport
        self.writer = transport.writer
        self.channels: dict[str, ChannelProcess] = {}
        self.partition = mount.partitions.pick(self)
        self.closed = False
        #: The terminate reason channels get when the connection ends.
        self.close_reason: Any = CLOSED
        self._id_sub: _IdSubscription | None = None
        self.log_level = mount.log_level
        #: The socket handler's mailbox limits, for this connection's channels (read once).
        self.max_mailbox = self.handler.max_mailbox
        self.mailbox_timeout = self.handler.mailbox_timeout
        self._errlog: supervise.LogLimiter | None = None
        socket.private = self
        socket.transport_pid = self

    def __repr__(self) -> str:
        return f"<Connection id={self.socket.id!r} transport={self.transport.name} channels={len(self.channels)}>"

    # -- what the channel runtime uses ------------------------------------------------------

    @property
    def pubsub(self) -> PubSub:
        """The PubSub this connection's channels subscribe through (its mount's)."""
        return self.mount.pubsub

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint this connection came through."""
        return self.mount.endpoint

    def send_encoded(self, data: str | bytes) -> None:
        """Queue one message the serializer already encoded."""
        self.transport.send(data)

    def hold_output(self) -> Callable[[], None] | None:
        """Hold what is sent from now on until the returned callable runs (one ``send()`` for a burst).

        ``None`` when the transport cannot (long-poll, TLS, output already
        pending); see :meth:`~phx_gevent.transports.writer.Writer.hold`.
        """
        hold = getattr(self.transport, "hold", None)
        return hold() if hold is not None else None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Register with the mount and subscribe to the socket id topic (for ``"disconnect"``)."""
        self.mount.connections.add(self)
        if self.socket.id is not None:
            self._id_sub = _IdSubscription(self)
            self.mount.pubsub.subscribe(self.socket.id, self._id_sub)

    def terminate(self, reason: Any = None) -> None:
        """The transport is gone: every channel finishes its mailbox and terminates. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if reason is None:
            reason = self.close_reason
        self.mount.connections.discard(self)
        if self._id_sub is not None and self.socket.id is not None:
            self.mount.pubsub.unsubscribe(self.socket.id, self._id_sub)
            self._id_sub = None
        channels = list(self.channels.values())
        self.channels.clear()
        for proc in channels:
            proc.transport_down(reason)

    def disconnect(self) -> None:
        """Close the connection because of ``broadcast(id, "disconnect", {})``: 1001, no channel frames."""
        if self.closed:
            return
        self.close_reason = DISCONNECTED
        if self.log_level is not None:
            log.log(self.log_level, "disconnecting socket %r", self.socket.id)
        self.transport.close(CLOSE_GOING_AWAY, "disconnected")

    def shutdown(self) -> None:
        """Close because the server stops (1001, going away): phoenix.js reconnects."""
        if self.closed:
            return
        self.transport.close(CLOSE_GOING_AWAY, "server stopping")

    def drain(self) -> None:
        """Close for a server restart (1012): the client reconnects elsewhere."""
        if self.closed:
            return
        self.close_reason = DRAINING
        self.transport.close(CLOSE_SERVICE_RESTART, "service restart")

    # -- transport_pid API ------------------------------------------------------------------

    def send(self, message: Any) -> None:
        """Elixir's ``send(transport_pid, message)``: understands ``"garbage_collect"``."""
        if message == "garbage_collect":
            memory.collect()
        else:
            log.warning("phx_gevent: connection received an unexpected message: %r", message)

    # -- writing ----------------------------------------------------------------------------

    def send_reply(self, join_ref: Any, ref: Any, topic: str, status: str, response: Any) -> None:
        """Encode and queue a ``phx_reply``; raises when the response cannot be encoded.

        A ``None`` response (a bare status, ``Reply("noop")``) goes out as ``{}``, as in Phoenix.
        Waits (see :meth:`wait_room`) while the connection's output is above its soft cap.
        """
        if response is None:
            response = {}
        data = self.serializer.encode_reply(join_ref, ref, topic, status, response)
        if getattr(self.writer, "qbytes", 0) > flow.connection_limit or flow.queued > flow.high_water:
            self.wait_room()
        self.transport.send(data)

    def send_push(self, join_ref: Any, topic: str, event: str, payload: Any) -> None:
        """Encode and queue a push; raises when the payload cannot be encoded.

        Waits (see :meth:`wait_room`) while the connection's output is above its soft cap.
        """
        data = self.serializer.encode_push(join_ref, topic, event, payload)
        if getattr(self.writer, "qbytes", 0) > flow.connection_limit or flow.queued > flow.high_water:
            self.wait_room()
        self.transport.send(data)

    def log_error(self, msg: str, *args: Any) -> None:
        """Log an error with its traceback (call inside ``except``), at most one per 10 s for this connection.

        What a client can trigger at will (a channel crashing on its input)
        must not become one traceback per message: the rest are counted and
        the count is logged with the next line.
        """
        if self._errlog is None:
            self._errlog = supervise.LogLimiter(ERROR_LOG_INTERVAL)
        self._errlog.log(log, logging.ERROR, msg, *args, exc_info=True)

    def wait_room(self) -> None:
        """Wait until this connection's queued output is back under ``max_connection_queue_bytes``
        and the process's under ``max_queued_bytes``.

        Replies and pushes obey the limits broadcasts do: the channel that
        produces them waits (its mailbox fills, then the reader stops reading
        and TCP pushes back on the client) instead of queueing up to the hard
        cap. Gives up (and the message is queued) after ``slow_client_timeout``
        plus a second for the connection's own limit (the drain timer has
        dropped a connection that drained nothing by then), after
        ``broadcast_timeout`` for the process's. Never raises; returns at once
        in a hub callback, where nothing may wait.
        """
        writer = self.writer
        if gevent.getcurrent() is gevent.get_hub():
            return
        now = time.monotonic()
        own_deadline = now + flow.slow_timeout + 1.0
        process_deadline = now + flow.timeout
        while True:
            if getattr(writer, "state", 0) or getattr(writer, "closed", False):
                return
            now = time.monotonic()
            if getattr(writer, "qbytes", 0) > flow.connection_limit and now < own_deadline:
                gevent.sleep(0.02)
            elif flow.queued > flow.high_water and now < process_deadline:
                gevent.sleep(0.02)
            else:
                return

    def send_control(self, join_ref: Any, topic: str, event: str) -> None:
        """Queue ``phx_close`` or ``phx_error`` for a channel."""
        self.transport.send(self.serializer.encode_control(join_ref, topic, event))

    # -- the channel table ------------------------------------------------------------------

    def channel_joined(self, proc: ChannelProcess) -> None:
        """Record a channel whose join succeeded (called from its greenlet)."""
        self.channels[proc.topic] = proc

    def channel_exited(self, proc: ChannelProcess) -> None:
        """Forget a channel that stopped (only if it is still the current one for its topic)."""
        if self.channels.get(proc.topic) is proc:
            del self.channels[proc.topic]

    # -- dispatch (PROTOCOL.md 5.1) ---------------------------------------------------------

    def handle(self, msg: Message) -> None:
        """Apply one client message. Joins block until answered (or ``join_timeout``)."""
        topic = msg.topic
        event = msg.event
        if topic == "phoenix" and event == "heartbeat":
            data = self.serializer.encode_reply(None, msg.ref, "phoenix", "ok", {})
            # Not behind a busy flusher (a reconnect storm): a late reply makes phoenix.js reconnect.
            send_now = getattr(self.transport, "send_now", None)
            if send_now is not None:
                send_now(data)
            else:
                self.transport.send(data)
            return
        proc = self.channels.get(topic)
        if event == "phx_join":
            if proc is None:
                self._join(msg)
            else:
                self._duplicate_join(proc, msg)
            return
        if proc is None:
            if event == "phx_leave":
                self.send_reply(msg.join_ref, msg.ref, topic, "ok", {})
            else:
                self.send_reply(None, msg.ref, topic, "error", {"reason": "unmatched topic"})
            return
        join_ref = msg.join_ref
        if join_ref is not None and join_ref != proc.join_ref:
            return  # stale: the client raced a server close; never answered
        if event == "phx_leave":
            proc.leave(msg)
        else:
            proc.handle_in(msg)

    def _join(self, msg: Message) -> ChannelProcess | None:
        topic = msg.topic
        route = self.handler.route(topic)
        if route is None:
            log.warning("phx_gevent: ignoring join of unmatched topic %r", topic)
            self.send_reply(None, msg.ref, topic, "error", {"reason": "unmatched topic"})
            return None
        if len(self.channels) >= self.handler.max_channels:
            log.error(
                "phx_gevent: refusing join of %r: %d channels already joined on this connection",
                topic,
                len(self.channels),
            )
            self.send_reply(msg.join_ref, msg.ref, topic, "error", {"reason": "too many channels joined"})
            return None
        join_ref = msg.join_ref if msg.join_ref is not None else msg.ref
        proc = ChannelProcess(self, route, topic, join_ref)
        started = perf_counter()
        joined = proc.join(msg.payload, msg.ref, self.mount.join_timeout)
        if self.log_level is not None or telemetry.channel_joined.receivers:
            self._joined(proc, route, joined, perf_counter() - started)
        return proc if joined else None

    def _joined(self, proc: ChannelProcess, route: Any, joined: bool, duration: float) -> None:
        # Phoenix's log lines (``JOINED room:lobby in 45µs``) and the phoenix.channel_joined event.
        if telemetry.channel_joined.receivers:
            telemetry.emit(
                telemetry.channel_joined,
                self.mount.endpoint,
                {"duration": duration},
                {
                    "topic": proc.topic,
                    "route": route.pattern,
                    "channel": route.channel.__name__,
                    "result": "ok" if joined else "error",
                    "socket": proc.socket,
                },
            )
        if self.log_level is not None and log.isEnabledFor(self.log_level):
            took = telemetry.format_duration(duration)
            if joined:
                log.log(self.log_level, "JOINED %s in %s (%s)", proc.topic, took, route.channel.__name__)
            else:
                log.log(
                    self.log_level,
                    "REFUSED JOIN %s in %s (%s): %r",
                    proc.topic,
                    took,
                    route.channel.__name__,
                    proc.refusal,
                )

    def _duplicate_join(self, old: ChannelProcess, msg: Message) -> None:
        if not old.leaving:
            log.debug(
                "phx_gevent: duplicate channel join for topic %r; closing existing channel for new join",
                msg.topic,
            )
        old.kill(DUPLICATE_JOIN)
        self._join(msg)
        # After the new join's reply, so the client drops it by its stale join_ref.
        self.send_control(old.join_ref, old.topic, "phx_close")
