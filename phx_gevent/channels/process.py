"""The runtime of a joined channel: its mailbox, its greenlet, its end.

Each joined channel is a :class:`ChannelProcess` with a mailbox. Its
callbacks run in a greenlet of its own, one message at a time and in order:
when a message arrives for an idle channel, a worker greenlet of the
connection's :class:`Partition` (a parked one if any, else a new one in the
partition's pool) runs the mailbox until it is empty, then goes back to the
partition. An idle channel costs no greenlet (~4 KB saved per channel), a
busy one never waits for another, and no greenlet is created per message.

The join protocol (PROTOCOL.md 5.2) is in :mod:`.joining`, running one
mailbox item through the callbacks in :mod:`.callbacks`, and what else
reaches a channel (``Broadcast``, ``CallFrom``) in :mod:`.messages`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import Event

from ..channel import DUPLICATE_JOIN, Channel, intercepted_events
from ..errors import CallTimeout, ChannelError, ChannelExited, ConnectionOverloaded
from .callbacks import dispatch
from .joining import join
from .messages import Broadcast, CallFrom, InfoSubscription
from .pool import Partition, Partitions, default_partitions
from .states import _CALL, _CAST, _DOWN, _IN, _INFO, _LEAVE, _OUT, _OVERFLOW, _TIMEOUT, JOINED, JOINING, STOPPED
from .states import ChannelState as ChannelState

if TYPE_CHECKING:  # pragma: no cover
    from ..connection import Connection
    from ..socket import Route

__all__ = ["Broadcast", "CallFrom", "ChannelProcess", "Partition", "Partitions", "default_partitions"]

log = logging.getLogger(__name__)


#: How long a replaced channel may take to die before it is abandoned (Phoenix: 5 s).
KILL_TIMEOUT = 5.0


class ChannelProcess:
    """A joined channel (Phoenix's channel process): ``socket.channel_pid``.

    :meth:`send` delivers a message to the channel's ``handle_info``, like
    Elixir's ``send/2``; :meth:`call` and :meth:`cast` reach ``handle_call``
    and ``handle_cast``, like ``GenServer.call/3`` and ``GenServer.cast/2``.
    All three share the mailbox and its ``Socket.max_mailbox`` bound.
    """

    __slots__ = (
        "conn",
        "instance",
        "socket",
        "topic",
        "join_ref",
        "intercept",
        "writer",
        "owner",
        "mailbox",
        "greenlet",
        "state",
        "partition",
        "leaving",
        "extra",
        "monitors",
        "exit_reason",
        "offsets",
        "history",
        "replayed",
        "_drained",
        "_idle",
        "refusal",
        "__weakref__",
    )

    def __init__(self, conn: Connection, route: Route, topic: str, join_ref: Any) -> None:
        self.conn = conn
        self.topic = topic
        self.join_ref = join_ref
        self.instance: Channel = route.channel()
        self.socket = conn.socket.copy_for_channel(topic, route.channel, join_ref, route.assigns)
        self.socket.channel_pid = self
        self.intercept = intercepted_events(route.channel)
        # Fastlane target: broadcasts go straight to the connection's writer.
        self.writer = conn.writer
        self.owner = self
        self.mailbox: deque[tuple[Any, ...]] = deque()
        self.greenlet: Any = None
        self.state = JOINING
        self.partition = conn.partition
        self.leaving = False
        self.extra: list[InfoSubscription] | None = None
        self.monitors: list[Callable[[ChannelProcess], None]] | None = None
        #: Why the channel ended (its terminate reason), once it has.
        self.exit_reason: Any = None
        #: True when the client joined with ``since``: history broadcasts carry their offset in the ref.
        self.offsets = False
        #: The route's history config (None: the topic keeps no history).
        self.history = route.history
        #: (epoch, seq) of the last message a recovery replayed: later live copies of it are dropped.
        self.replayed: tuple[str, int] | None = None
        self._drained: Event | None = None
        # The pending idle timer of noreply(timeout=...), if any.
        self._idle: Any = None
        #: The error response of a refused (or failed) join, for logs and telemetry.
        self.refusal: Any = None

    def __repr__(self) -> str:
        return f"<ChannelProcess {self.topic!r} join_ref={self.join_ref!r} state={self.state}>"

    @property
    def alive(self) -> bool:
        """True until the channel has stopped."""
        return self.state != STOPPED

    # -- the mailbox ------------------------------------------------------------------------

    def send(self, message: Any) -> None:
        """Deliver ``message`` to ``handle_info`` (after the messages already queued)."""
        if self.state != STOPPED:
            if len(self.mailbox) >= self.conn.max_mailbox:
                self._overflow()
                return
            self.mailbox.append((_INFO, message))
            self._activate()

    def cast(self, message: Any) -> None:
        """Deliver ``message`` to ``handle_cast`` (``GenServer.cast``): returns at once, like :meth:`send`.

        Ignored once the channel has stopped; a full mailbox ends the channel
        (``phx_error``), as for :meth:`send`.
        """
        if self.state != STOPPED:
            if len(self.mailbox) >= self.conn.handler.max_mailbox:
                self._overflow()
                return
            self.mailbox.append((_CAST, message))
            self._activate()

    def call(self, message: Any, timeout: float | None = 5.0) -> Any:
        """Ask the channel's ``handle_call`` and wait for its reply (``GenServer.call``); from any greenlet.

        Returns what ``handle_call`` returned (or gave ``from_.reply``).
        Raises :class:`~phx_gevent.errors.CallTimeout` after ``timeout``
        seconds without a reply (``None`` waits forever),
        :class:`~phx_gevent.errors.ChannelExited` when the channel is gone or
        ends before replying (a full mailbox ends it, as for :meth:`send`), and
        :class:`~phx_gevent.errors.ChannelError` when called from the channel's
        own callbacks (it would wait for itself).
        """
        if self.greenlet is not None and self.greenlet is gevent.getcurrent():
            raise ChannelError(f"channel {self.topic!r} cannot call itself; send yourself a message instead")
        if self.state == STOPPED:
            raise ChannelExited(f"channel {self.topic!r} has already ended", self.exit_reason)
        from_ = CallFrom()

        def down(proc: ChannelProcess) -> None:
            from_._fail(ChannelExited(f"channel {proc.topic!r} ended before replying", proc.exit_reason))

        self.monitor(down)
        try:
            if len(self.mailbox) >= self.conn.handler.max_mailbox:
                self._overflow()
            else:
                self.mailbox.append((_CALL, message, from_))
                self._activate()
            try:
                return from_.result.get(timeout=timeout)
            except gevent.Timeout:
                raise CallTimeout(f"channel {self.topic!r} did not answer {message!r} within {timeout}s") from None
        finally:
            self.demonitor(down)

    def deliver(self, topic: str, event: str, payload: Any) -> None:
        """An intercepted broadcast: queued for ``handle_out``."""
        if self.state == JOINED:
            if len(self.mailbox) >= self.conn.max_mailbox:
                self._overflow()
                return
            self.mailbox.append((_OUT, event, payload))
            self._activate()

    def handle_in(self, msg: Any) -> None:
        """A client message for ``handle_in``; called by the connection's reader.

        When the mailbox is full the reader stops reading (TCP pushes back on
        the client) until the channel has worked through half of it; if it
        makes no room within ``mailbox_timeout`` seconds, raises
        :class:`~phx_gevent.errors.ConnectionOverloaded` (the transport closes
        the connection with 1008).
        """
        if self.state == STOPPED:
            return
        mailbox = self.mailbox
        mailbox.append((_IN, msg))
        self._activate()
        limit = self.conn.max_mailbox
        if len(mailbox) >= limit:
            drained = self._drained = Event()
            try:
                if not drained.wait(self.conn.mailbox_timeout) and len(mailbox) >= limit // 2:
                    raise ConnectionOverloaded(
                        f"channel {self.topic!r} has {len(mailbox)} messages waiting; the client sends too fast"
                    )
            finally:
                self._drained = None

    def _overflow(self) -> None:
        # Server-side messages (intercepted broadcasts, handle_info) pile up
        # faster than the channel handles them: end the channel with
        # phx_error (the client rejoins and starts fresh) rather than drop
        # messages silently or grow without bound.
        log.error(
            "phx_gevent: mailbox of %r is full (%d messages); stopping the channel", self.topic, len(self.mailbox)
        )
        self.mailbox.clear()
        self.mailbox.append((_OVERFLOW,))
        self._activate()

    def leave(self, msg: Any) -> None:
        """The client's ``phx_leave``: reply ok, then ``phx_close``, in mailbox order."""
        if self.state != STOPPED:
            self.leaving = True
            self.mailbox.append((_LEAVE, msg.ref))
            self._activate()

    def transport_down(self, reason: Any) -> None:
        """The connection is gone: finish what is queued, then terminate with ``reason``."""
        if self.state == JOINED:
            # Nothing more can reach the client: stop receiving broadcasts now.
            self._unsubscribe()
            self.mailbox.append((_DOWN, reason))
            self._activate()
        elif self.state == JOINING:
            self.kill(reason)

    def _activate(self) -> None:
        if self.greenlet is None and self.state == JOINED:
            self.greenlet = self.partition.run(self._run)

    def _run(self) -> None:
        mailbox = self.mailbox
        try:
            while mailbox and self.state == JOINED:
                dispatch(self, mailbox.popleft())
                drained = self._drained
                if drained is not None and len(mailbox) <= self.conn.max_mailbox // 2:
                    drained.set()
        finally:
            self.greenlet = None
            if mailbox and self.state == JOINED:
                self._activate()

    # -- idle timeout (noreply(timeout=...)) ------------------------------------------------

    def _arm_idle(self, timeout: float) -> None:
        timer = gevent.get_hub().loop.timer(timeout)
        self._idle = timer
        timer.start(self._idle_expired, timer)

    def _cancel_idle(self) -> None:
        timer, self._idle = self._idle, None
        if timer is not None:
            timer.stop()
            timer.close()

    def _idle_expired(self, timer: Any) -> None:
        # Hub callback: nothing arrived in time. The message carries its timer,
        # so a message that arrives before it is handled cancels it.
        if self._idle is timer and self.state == JOINED:
            self.mailbox.append((_TIMEOUT, timer))
            self._activate()

    def join(self, payload: Any, ref: Any, timeout: float | None) -> bool:
        """Run ``join`` (in the calling reader's greenlet) and answer it; True when joined (see :mod:`.joining`).

        Past ``timeout`` seconds the join is interrupted and answered with
        ``{"reason": "join timeout"}``.
        """
        return join(self, payload, ref, timeout)

    def history_lost(self) -> None:
        """This node missed history messages it cannot fetch: end the channel with ``phx_error``.

        phoenix.js rejoins with the offset it last saw, and that recovery
        answers ``recovered: false``: the client knows it must refetch.
        """
        if self.state != JOINED:
            return
        conn, join_ref, topic = self.conn, self.join_ref, self.topic
        self.kill(("shutdown", "history_gap"))
        conn.send_control(join_ref, topic, "phx_error")

    # -- ending -----------------------------------------------------------------------------

    def _detach(self, reason: Any) -> bool:
        """Stop receiving anything; False when already stopped."""
        if self.state == STOPPED:
            return False
        was_joined = self.state == JOINED
        self.state = STOPPED
        self.exit_reason = reason
        self.mailbox.clear()
        if self._idle is not None:
            self._cancel_idle()
        if self._drained is not None:
            self._drained.set()
        self._unsubscribe()
        self._notify_down()
        self.conn.channel_exited(self)
        if was_joined:
            self.partition.joined -= 1
        return True

    # -- monitors ---------------------------------------------------------------------------

    def monitor(self, callback: Callable[[ChannelProcess], None]) -> None:
        """Call ``callback(self)`` once when this channel ends, or its join fails.

        Called at once if the channel has already ended. Callbacks run in
        whatever greenlet ends the channel (its own, the reader's, a kill):
        they must not block. :class:`~phx_gevent.presence.Presence` uses this
        to untrack a channel's presences, as Phoenix's tracker monitors pids.
        """
        if self.state == STOPPED:
            self._call_monitor(callback)
            return
        if self.monitors is None:
            self.monitors = []
        self.monitors.append(callback)

    def demonitor(self, callback: Callable[[ChannelProcess], None]) -> None:
        """Undo :meth:`monitor` (no error if ``callback`` was not registered)."""
        if self.monitors and callback in self.monitors:
            self.monitors.remove(callback)

    def _notify_down(self) -> None:
        monitors, self.monitors = self.monitors, None
        if monitors:
            for callback in monitors:
                self._call_monitor(callback)

    def _call_monitor(self, callback: Callable[[ChannelProcess], None]) -> None:
        try:
            callback(self)
        except Exception:
            log.exception("phx_gevent: monitor %r of %r raised", callback, self)

    def _unsubscribe(self) -> None:
        pubsub = self.conn.pubsub
        pubsub.unsubscribe(self.topic, self)
        if self.extra:
            for sub in self.extra:
                pubsub.unsubscribe(sub.topic, sub)
            self.extra = None

    def _exit(self, reason: Any, frame: str | None) -> None:
        if not self._detach(reason):
            return
        if frame is not None:
            self.conn.send_control(self.join_ref, self.topic, frame)
        self._terminate(reason)

    def _terminate(self, reason: Any) -> None:
        try:
            self.instance.terminate(reason, self.socket)
        except Exception:
            log.exception("phx_gevent: %s.terminate raised", type(self.instance).__name__)

    def kill(self, reason: Any = DUPLICATE_JOIN) -> None:
        """End the channel from outside (duplicate join, drain): no frame to the client.

        A callback still running is interrupted (``GreenletExit``), waiting up
        to 5 s, as Phoenix kills a replaced channel. ``terminate`` then runs
        in a fresh greenlet of the channel's partition. A join still running
        is not interrupted (it runs in the caller's greenlet, which is not the
        channel's to kill): it finds the channel stopped when it returns.
        """
        was_joined = self.state == JOINED
        if not self._detach(reason):
            return
        greenlet, self.greenlet = self.greenlet, None
        if was_joined and greenlet is not None and greenlet is not gevent.getcurrent():
            greenlet.kill(block=True, timeout=KILL_TIMEOUT)
        if was_joined:
            self.partition.run(self._terminate, reason)

    # -- extra subscriptions ----------------------------------------------------------------

    def subscribe(self, topic: str) -> None:
        """Receive broadcasts on ``topic`` as :class:`Broadcast` messages in ``handle_info``."""
        if self.state == STOPPED or self.conn.closed:
            return
        if self.extra is None:
            self.extra = []
        elif any(sub.topic == topic for sub in self.extra):
            return
        sub = InfoSubscription(self, topic)
        self.extra.append(sub)
        self.conn.pubsub.subscribe(topic, sub)

    def unsubscribe(self, topic: str) -> None:
        """Undo :meth:`subscribe` for ``topic``."""
        if not self.extra:
            return
        for sub in [s for s in self.extra if s.topic == topic]:
            self.conn.pubsub.unsubscribe(topic, sub)
            self.extra.remove(sub)
