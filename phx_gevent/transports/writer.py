"""Per-connection writers and the process-wide overload policy.

A :class:`Writer` owns the sending side of one socket. It never runs a
greenlet of its own: frames are appended to a small list, and everything
queued for a connection goes out in one ``send()``. Writers are flushed by
one hub callback (:class:`~phx_gevent.transports.flusher.Flusher`) that walks the connections with pending
output in chunks, re-arming a zero-second timer between chunks so the server
keeps reading requests while a large fan-out drains. When the kernel buffer
is full the writer parks on an I/O watcher and resumes when the socket is
writable. STACK_NOTES.md ("A fan-out design tried by hand") has the
measurements behind this shape; compared with a greenlet per writer it saves
the greenlet's memory and one switch per wake-up.

The overload policy these writers feed is in :mod:`phx_gevent.flow`.
"""

from __future__ import annotations

import logging
import socket as _pysocket
import struct
import time
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from gevent.event import Event

from .. import telemetry
from ..flow import flow
from ..runtime import runtime
from . import frames
from .flusher import Flusher

__all__ = [
    "WriterState",
    "Writer",
    "Flusher",
    "configure_socket",
    "emit_slow_client_drop",
]

log = logging.getLogger(__name__)

_monotonic = time.monotonic
_join = b"".join


class WriterState(IntEnum):
    """Where a writer is in its life. An IntEnum: the hot path tests ``if self.state:`` (not open)."""

    OPEN = 0
    #: A close frame is queued: nothing more is accepted, the queue drains, then the socket closes.
    CLOSING = 1
    CLOSED = 2


OPEN = WriterState.OPEN
CLOSING = WriterState.CLOSING
CLOSED = WriterState.CLOSED

# Watcher flag for "writable" in gevent's loop.io().
_WRITE = 2


def configure_socket(sock: Any, nodelay: bool = True) -> None:
    """Set TCP_NODELAY (pitfall 7 of STACK_NOTES.md; ``nodelay=False``: already set) and the capped send buffer."""
    if nodelay:
        try:
            sock.setsockopt(_pysocket.IPPROTO_TCP, _pysocket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (unix socket): nothing to do
    if flow.sndbuf:
        try:
            sock.setsockopt(_pysocket.SOL_SOCKET, _pysocket.SO_SNDBUF, flow.sndbuf)
        except OSError:
            pass


def emit_slow_client_drop(sender: Any, reason: str, queued: int, transport: str = "websocket") -> None:
    """Emit ``phx_gevent.slow_client_drop`` (when observed) for a connection dropped by the overload policy."""
    if telemetry.slow_client_drop.receivers:
        telemetry.emit(
            telemetry.slow_client_drop, sender, {"queued_bytes": queued}, {"reason": reason, "transport": transport}
        )


class Writer:
    """The sending side of one connection: a queue, one ``send()`` per flush."""

    __slots__ = (
        "sock",
        "raw",
        "queue",
        "qbytes",
        "scheduled",
        "watcher",
        "state",
        "encoder",
        "last_drain",
        "excess",
        "flusher",
        "sent_bytes",
        "close_code",
        "_closed_event",
        "held",
        "__weakref__",
    )

    def __init__(self, sock: Any, encoder: Any) -> None:
        self.sock = sock
        # gevent's socket wraps a non-blocking OS socket; writing to that one
        # directly never switches greenlets, so it is safe from hub callbacks.
        self.raw = getattr(sock, "_sock", sock)
        self.queue: list[Any] = []
        self.qbytes = 0
        self.scheduled = False
        self.watcher: Any = None
        self.state = OPEN
        #: Fastlane key: broadcasts are encoded once per distinct encoder.
        self.encoder = encoder
        self.last_drain = _monotonic()
        #: Queued bytes above ``flow.connection_limit``: not counted in ``flow.queued``, so a
        #: connection holds at most its soft cap of the process-wide budget.
        self.excess = 0
        self.flusher = runtime.flusher()
        self.sent_bytes = 0
        self.close_code: int | None = None
        self._closed_event: Any = None
        #: Output is held back by :meth:`hold` until :meth:`release`.
        self.held = False

    # -- queueing -------------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        """Queue one ready frame; it goes out with whatever else is queued, in order.

        Never blocks and never switches greenlets. Frames written after
        :meth:`close` or an abort are dropped.
        """
        # The fan-out calls this once per subscriber: the common paths are
        # inlined (one Python call per delivery; profile in benchmarks/README.md).
        if self.state:
            return
        queue = self.queue
        if queue or self.scheduled:
            # A burst in progress: join it; the flusher or the I/O watcher sends it.
            if not queue:
                self.last_drain = _monotonic()
            n = len(data)
            queue.append(data)
            self.qbytes += n
            flow.queued += n
            if self.qbytes > flow.connection_limit:
                self._over_limit()
            if not self.scheduled and not self.state:
                self.scheduled = True
                self.flusher.schedule(self)
            return
        # The first frame of a burst.
        now = _monotonic()
        self.last_drain = now
        if flow.direct_send and not self.flusher.armed and runtime.direct_budget(now):
            # Idle server: one non-blocking send now (lowest latency); only what
            # the kernel does not take is queued. Under load (flusher busy, or
            # the budget of immediate sends spent) frames go to the flusher,
            # which coalesces whatever arrives before it runs into one send():
            # ~10x cheaper per frame for both ends than a send() per frame.
            sent = self._send(data)
            if sent is None:
                return
            self.sent_bytes += sent
            if sent == len(data):
                return
            if sent:
                data = memoryview(data)[sent:]
            self._append(data)
            if not self.state:
                self._wait_writable()
            return
        n = len(data)
        queue.append(data)
        self.qbytes += n
        flow.queued += n
        if self.qbytes > flow.connection_limit:
            self._over_limit()
            if self.state:
                return
        self.scheduled = True
        flusher = self.flusher
        flusher.dirty.append(self)
        if not flusher.armed:
            flusher.armed = True
            flusher.loop.run_callback(flusher._run)

    def write_now(self, data: bytes) -> None:
        """As :meth:`write`, but a frame with nothing queued before it goes out now, flusher busy or not.

        For heartbeat replies: tiny, one per client every 30 s, and late ones
        make phoenix.js reconnect; in a storm of handshakes and joins the
        flusher and the send budget are busy for seconds.
        """
        if self.state or self.queue or self.scheduled:
            self.write(data)
            return
        self.last_drain = _monotonic()
        sent = self._send(data)
        if sent is None:
            return
        self.sent_bytes += sent
        if sent == len(data):
            return
        self._append(memoryview(data)[sent:])
        if not self.state:
            self._wait_writable()

    def hold(self) -> Callable[[], None] | None:
        """Keep what is written from now on until the returned ``release`` runs; ``None``: cannot hold now.

        For a burst known to come from other greenlets within a hub turn (a
        join reply and the ``after_join`` pushes of its channel): it then
        leaves in one ``send()`` instead of one each. Writes are queued in
        order as usual, nothing is flushed meanwhile; ``release`` sends them
        (or hands them to the flusher under load). Only an idle, open writer
        holds: with output already pending, the flusher or the I/O watcher
        is about to send anyway.
        """
        if self.state or self.queue or self.scheduled:
            return None
        self.scheduled = True  # write() then queues and schedules nothing (see write)
        self.held = True
        return self.release

    def release(self) -> None:
        """End a :meth:`hold`: send what was queued meanwhile. Idempotent; never blocks."""
        if not self.held:
            return
        self.held = False
        self.scheduled = False
        if self.state == CLOSED or not self.queue:
            return
        if flow.direct_send and not self.flusher.armed and runtime.direct_budget(_monotonic()):
            self.flush()  # as write()'s first frame of a burst: one send now, the rest on the watcher
        else:
            self.scheduled = True
            self.flusher.schedule(self)

    def _append(self, data: Any) -> None:
        n = len(data)
        self.queue.append(data)
        self.qbytes += n
        flow.queued += n
        if self.qbytes > flow.connection_limit:
            self._over_limit()

    def _over_limit(self) -> None:
        # Above the soft cap: the excess leaves the process total (one connection
        # must not be able to hold the budget of every broadcast hostage), then
        # the usual checks.
        self.excess = flow.exclude_excess(self.qbytes, self.excess)
        reason = flow.slow_reason(self.qbytes, self.last_drain, 4 * flow.connection_limit)
        if reason is None:
            return
        if reason == "hard_cap":
            log.warning("phx_gevent: dropping a connection with %d bytes queued (hard cap)", self.qbytes)
        else:
            log.warning(
                "phx_gevent: dropping a connection that drained nothing for %.1fs with %d bytes queued",
                flow.slow_timeout,
                self.qbytes,
            )
        emit_slow_client_drop(self, reason, self.qbytes)
        self.abort(frames.CLOSE_POLICY, "slow client")

    # -- flushing -------------------------------------------------------------------------

    def flush(self) -> None:
        """Send what is queued in one ``send()``; park on the I/O watcher for the rest."""
        queue = self.queue
        if self.state == CLOSED or not queue:
            return
        data = queue[0] if len(queue) == 1 else _join(queue)
        sent = self._send(data)
        if sent is None:
            return
        if sent != len(data):
            self.sent_partly(data, sent)
            return
        queue.clear()
        self.sent_bytes += sent
        self._account_sent(sent)
        self.last_drain = _monotonic()
        if self.watcher is not None and self.watcher.active:
            self.watcher.stop()
        if self.state == CLOSING:
            self._finish_close()

    def sent_partly(self, data: Any, sent: int) -> None:
        """``data`` (all that was queued) went out only up to ``sent``: keep the rest, wait for writability."""
        if sent:
            self.sent_bytes += sent
            self._account_sent(sent)
            self.last_drain = _monotonic()
            data = memoryview(data)[sent:]
        self.queue[:] = [data]
        self._wait_writable()

    def _account_sent(self, n: int) -> None:
        """``n`` queued bytes went out: give back what of them was counted in the process total."""
        self.qbytes -= n
        excess = self.excess
        if excess:
            keep = self.qbytes - flow.connection_limit
            keep = min(excess, keep) if keep > 0 else 0
            self.excess = keep
            n -= excess - keep
        if n:
            flow.release(n)

    def stalled(self, now: float) -> bool:
        """Whether the drain timer should drop this connection now (see :class:`~phx_gevent.flow.FlowControl`).

        True when it has drained nothing for ``slow_client_timeout`` seconds
        while above its soft cap, or while holding anything at all when the
        process is above its high-water mark.
        """
        return self.state != CLOSED and flow.stalled(self.qbytes, self.last_drain, now)

    def _send(self, data: Any) -> int | None:
        """One non-blocking ``send()``: the bytes the kernel took, or None when the socket is dead (aborted)."""
        try:
            return self.raw.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            self.abort()
            return None

    def _wait_writable(self) -> None:
        # ``scheduled`` covers both "in the flusher's list" and "parked on the watcher".
        self.scheduled = True
        watcher = self.watcher
        if watcher is None:
            watcher = self.watcher = self.flusher.loop.io(self.raw.fileno(), _WRITE)
        if not watcher.active:
            watcher.start(self._on_writable)

    def _on_writable(self) -> None:
        self.scheduled = False
        try:
            self.flush()
        except Exception:  # pragma: no cover - defensive: never let the hub die
            log.exception("phx_gevent: writer flush failed")
            self.abort()

    # -- closing --------------------------------------------------------------------------

    def close(self, code: int | None = None, reason: str = "") -> None:
        """Queue a close frame behind what is queued; shut the sending side once it is out."""
        if self.state:
            return
        self.close_code = code
        data = frames.close_frame(code, reason)
        self.state = CLOSING
        n = len(data)
        self.queue.append(data)
        self.qbytes += n
        flow.queued += n
        if not self.scheduled:
            self.scheduled = True
            self.flusher.schedule(self)

    def _finish_close(self) -> None:
        self._stop_watcher()
        self._closed(self.raw, _pysocket.SHUT_WR)

    def _closed(self, sock: Any, how: int) -> None:
        # The end of every path to CLOSED: shut the socket down (``how``), wake wait_closed().
        self.state = CLOSED
        try:
            sock.shutdown(how)
        except OSError:
            pass
        self._notify_closed()

    def _notify_closed(self) -> None:
        if self._closed_event is not None:
            self._closed_event.set()

    def wait_closed(self, timeout: float) -> bool:
        """Wait until the close frame is out (or the writer gave up); False on timeout."""
        if self.state == CLOSED:
            return True
        if self._closed_event is None:
            self._closed_event = Event()
        return self._closed_event.wait(timeout)

    def abort(self, code: int | None = None, reason: str = "") -> None:
        """Give up on the connection: drop the queue, try one close frame, else reset TCP."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self._release()
        self._stop_watcher()
        sent_close = False
        if code is not None:
            data = frames.close_frame(code, reason)
            try:
                sent_close = self.raw.send(data) == len(data)
            except OSError:
                sent_close = False
            if sent_close:
                self.close_code = code
        try:
            if not sent_close:
                # Discard what the kernel still holds instead of waiting on a peer that does not read.
                self.raw.setsockopt(_pysocket.SOL_SOCKET, _pysocket.SO_LINGER, struct.pack("ii", 1, 0))
            self.raw.shutdown(_pysocket.SHUT_RDWR)
        except OSError:
            pass
        self._notify_closed()

    def discard(self) -> None:
        """Forget everything queued (the connection is over); idempotent."""
        self.state = CLOSED
        self._release()
        self._stop_watcher()
        self._notify_closed()

    def _release(self) -> None:
        if self.qbytes:
            counted = self.qbytes - self.excess
            self.qbytes = self.excess = 0
            if counted:
                flow.release(counted)
        self.queue.clear()

    def _stop_watcher(self) -> None:
        watcher = self.watcher
        if watcher is not None:
            self.watcher = None
            watcher.stop()
            watcher.close()
