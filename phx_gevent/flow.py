"""The process-wide overload policy: a high-water mark on queued output.

Every writer adds what it queues to :attr:`FlowControl.queued` and subtracts
what it sends or drops. Broadcasters call :meth:`FlowControl.wait` first, so
a producer faster than delivery slows down instead of growing memory.

Settings (``Endpoint(...)`` keyword arguments, process-wide; owned by
:data:`phx_gevent.runtime.runtime`: a second endpoint cannot change a value
another living endpoint set):

``max_queued_bytes``
    While more bytes than this wait in writers' queues, broadcasts block until
    the total falls to half of it.
``broadcast_timeout``
    The longest a broadcast waits before raising
    :class:`~phx_gevent.errors.BroadcastTimeout` (nothing of it was delivered).
``max_connection_queue_bytes``
    A connection above this that has sent nothing for ``slow_client_timeout``
    seconds is dropped with 1008 (or reset when even the close frame cannot
    get out); one above four times this is dropped at once. A connection that
    reads is never dropped because another one is slow.
    A connection's bytes above ``max_connection_queue_bytes`` do not count
    towards ``max_queued_bytes``: one connection holds at most its soft cap
    of the process's budget, so a few clients that never read cannot make
    every broadcast wait. The drain timer (every quarter of
    ``slow_client_timeout``, at most every second) drops a connection that
    drained nothing for ``slow_client_timeout`` while above its soft cap, or
    while holding anything when the process is above ``max_queued_bytes``,
    whatever the client sends meanwhile. Replies and pushes wait for room
    like broadcasts: while a connection is above its soft cap, its channels
    wait before queueing more and its reader stops reading.
``max_incomplete_input_bytes``
    Bytes the whole process may hold in inputs that have started but not
    finished arriving (WebSocket messages of 16 KiB or more, long-poll POST
    bodies). Each such input reserves its announced size first; when the
    budget is spent, a new one is refused (WebSocket close 1013 "try again
    later", long-poll HTTP 503). Default 64 MiB.
``input_timeout``
    Seconds a started input (a WebSocket message, fragments included, or a
    long-poll POST body) may take to arrive in full; past it the WebSocket is
    dropped (1008) and the POST answered 408. Default 30.
``sndbuf``
    ``SO_SNDBUF`` of each connection, so the kernel cannot hide megabytes of
    backlog from the high-water mark (``None``: the OS default).
``direct_send`` (``flow.configure(direct_send=...)``)
    ``True`` (default): while the flusher is idle, a connection's first frame
    is sent at once from the fan-out (or the reply), up to
    ``runtime.direct_max`` frames per ``runtime.direct_period`` for the whole
    process; under load everything goes through the flusher, which writes all
    that is queued for a connection in one ``send()``. ``False``: always the
    flusher. Measured with reused channel greenlets (benchmarks/README.md):
    the budgeted direct path lowers latency (p50 0.88x at 1,000 subscribers,
    p99 0.8x at 5,000, push/reply p99 0.82x) for the same throughput within
    the run-to-run spread. Sending every frame at once with no budget
    delivered 9x fewer messages per second in a saturated fan-out: one
    ``send()`` per frame on both ends.
"""

from __future__ import annotations

import time
from typing import Any

from gevent.event import Event

from . import telemetry
from .errors import BroadcastTimeout

__all__ = ["FlowControl", "flow"]

_monotonic = time.monotonic


class FlowControl:
    """Process-wide accounting of bytes waiting in writers' queues.

    Every writer adds what it queues to :attr:`queued` and subtracts what it
    sends or drops. Broadcasters call :meth:`wait` first.
    """

    __slots__ = (
        "queued",
        "high_water",
        "low_water",
        "timeout",
        "connection_limit",
        "slow_timeout",
        "sndbuf",
        "direct_send",
        "_event",
        "_waiting",
        "timeouts",
        "incomplete",
        "max_incomplete",
        "input_timeout",
        "input_refused",
    )

    def __init__(self) -> None:
        #: Bytes currently queued in user space, all connections together.
        self.queued = 0
        #: Broadcasts wait while ``queued`` is above this (``max_queued_bytes``).
        self.high_water = 32 * 1024 * 1024
        #: Waiting broadcasters resume once ``queued`` is at or below this.
        self.low_water = self.high_water // 2
        #: Longest a broadcast waits before :class:`BroadcastTimeout` (``broadcast_timeout``).
        self.timeout = 5.0
        #: Per-connection soft cap (``max_connection_queue_bytes``).
        self.connection_limit = 1024 * 1024
        #: Seconds a connection over its cap may go without draining (``slow_client_timeout``).
        self.slow_timeout = 5.0
        #: ``SO_SNDBUF`` for new connections, or ``None`` to leave the OS default.
        self.sndbuf: int | None = 128 * 1024
        #: Try one non-blocking send from the fan-out when a connection is idle (off:
        #: always coalesce in the flusher; benchmarks/README.md has the numbers).
        self.direct_send = True
        self._event: Event | None = None
        self._waiting = 0
        #: How many broadcasts gave up with BroadcastTimeout.
        self.timeouts = 0
        #: Bytes reserved by inputs that started but did not finish arriving.
        self.incomplete = 0
        #: Budget for :attr:`incomplete` (``max_incomplete_input_bytes``).
        self.max_incomplete = 64 * 1024 * 1024
        #: Seconds a started input may take (``input_timeout``).
        self.input_timeout = 30.0
        #: How many inputs were refused because the budget was spent.
        self.input_refused = 0

    def configure(
        self,
        *,
        max_queued_bytes: int | None = None,
        broadcast_timeout: float | None = None,
        max_connection_queue_bytes: int | None = None,
        slow_client_timeout: float | None = None,
        sndbuf: int | None | bool = False,
        direct_send: bool | None = None,
        max_incomplete_input_bytes: int | None = None,
        input_timeout: float | None = None,
    ) -> None:
        """Change the overload settings for the whole process (``None`` keeps a value).

        Raises ``ValueError`` for a size or a time that is not positive.
        """
        if max_queued_bytes is not None:
            if max_queued_bytes <= 0:
                raise ValueError("max_queued_bytes must be positive")
            self.high_water = int(max_queued_bytes)
            self.low_water = self.high_water // 2
        if broadcast_timeout is not None:
            self.timeout = float(broadcast_timeout)
        if max_connection_queue_bytes is not None:
            if max_connection_queue_bytes <= 0:
                raise ValueError("max_connection_queue_bytes must be positive")
            self.connection_limit = int(max_connection_queue_bytes)
        if slow_client_timeout is not None:
            if slow_client_timeout <= 0:
                raise ValueError("slow_client_timeout must be positive")
            self.slow_timeout = float(slow_client_timeout)
        if max_incomplete_input_bytes is not None:
            if max_incomplete_input_bytes <= 0:
                raise ValueError("max_incomplete_input_bytes must be positive")
            self.max_incomplete = int(max_incomplete_input_bytes)
        if input_timeout is not None:
            if input_timeout <= 0:
                raise ValueError("input_timeout must be positive")
            self.input_timeout = float(input_timeout)
        if sndbuf is not False:
            self.sndbuf = None if sndbuf is None else int(sndbuf)
        if direct_send is not None:
            self.direct_send = bool(direct_send)

    def wait(self, timeout: float | None = None) -> None:
        """Return at once below the high-water mark, else wait for the queues to drain.

        Raises :class:`BroadcastTimeout` after ``timeout`` (default: the
        configured ``broadcast_timeout``) seconds above the mark.
        """
        if self.queued <= self.high_water:
            return
        if timeout is None:
            timeout = self.timeout
        began, queued = _monotonic(), self.queued
        deadline = began + timeout
        while self.queued > self.low_water:
            remaining = deadline - _monotonic()
            if remaining <= 0:
                self.timeouts += 1
                if telemetry.overload_timeout.receivers:
                    self._emit(telemetry.overload_timeout, began, queued)
                raise BroadcastTimeout(
                    f"{self.queued} bytes queued for delivery (high-water mark {self.high_water}); "
                    f"waited {timeout:.1f}s"
                )
            if self._event is None:
                self._event = Event()
            self._event.clear()
            self._waiting += 1
            try:
                self._event.wait(remaining)
            finally:
                self._waiting -= 1
        if telemetry.overload_wait.receivers:
            self._emit(telemetry.overload_wait, began, queued)

    def _emit(self, signal: Any, began: float, queued: int) -> None:
        telemetry.emit(
            signal, self, {"duration": _monotonic() - began, "queued": queued}, {"high_water": self.high_water}
        )

    def reserve_input(self, n: int) -> bool:
        """Reserve ``n`` bytes for an input that is arriving; False (nothing reserved) when the budget is spent."""
        if self.incomplete + n > self.max_incomplete:
            self.input_refused += 1
            return False
        self.incomplete += n
        return True

    def release_input(self, n: int) -> None:
        """Give back what :meth:`reserve_input` reserved."""
        self.incomplete -= n

    # -- the slow-client policy, one place for every transport ------------------------------

    def exclude_excess(self, qbytes: int, excess: int) -> int:
        """A connection holds ``qbytes``, ``excess`` of them already left out of :attr:`queued`.

        Bytes above the per-connection soft cap do not count towards the
        process's budget (a few clients that never read cannot make every
        broadcast wait): what newly went above it is released here. Returns
        the connection's new excess.
        """
        over = qbytes - self.connection_limit
        if over > excess:
            self.release(over - excess)
            return over
        return excess

    def slow_reason(self, qbytes: int, last_drain: float, hard_cap: int) -> str | None:
        """Why a connection above its soft cap must be dropped now, or ``None``.

        ``"hard_cap"``: it holds more than ``hard_cap`` bytes (the writer's is
        four soft caps, a long-poll session's its ``max_buffer_bytes``).
        ``"stalled"``: it drained nothing for ``slow_client_timeout`` seconds.
        """
        if qbytes > hard_cap:
            return "hard_cap"
        if _monotonic() - last_drain > self.slow_timeout:
            return "stalled"
        return None

    def stalled(self, qbytes: int, last_drain: float, now: float) -> bool:
        """The drain timer's rule: drained nothing for ``slow_client_timeout`` while above the soft cap,
        or while holding anything at all when the process is above its high-water mark."""
        if not qbytes or now - last_drain <= self.slow_timeout:
            return False
        return qbytes > self.connection_limit or self.queued > self.high_water

    def release(self, n: int) -> None:
        """Give back ``n`` bytes that were sent or dropped, waking broadcasters below the low-water mark."""
        self.queued -= n
        if self._waiting and self.queued <= self.low_water:
            self._wake()

    def _wake(self) -> None:
        # Called by writers when the total fell to the low-water mark.
        if self._event is not None:
            self._event.set()


#: The process-wide flow control shared by every writer and broadcaster.
flow = FlowControl()
