"""The timer of the process's WebSocket connections: idle timeout, drain timeout, slow input.

One :class:`IdleSweeper` per hub, owned by :data:`phx_gevent.runtime.runtime`
(``runtime.sweeper()``); each WebSocket transport adds itself while it runs.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .. import supervise
from ..flow import flow
from . import frames

if TYPE_CHECKING:  # pragma: no cover
    from .websocket import WebSocketTransport

__all__ = ["IdleSweeper"]

log = logging.getLogger(__name__)

_monotonic = time.monotonic


class IdleSweeper:
    """The timer of this process's WebSocket connections: idle timeout and drain timeout.

    Closes (1001) the connections that received nothing for their
    ``timeout``, and drops (1008, or a reset) those whose writer drained
    nothing for ``slow_client_timeout`` while over its soft cap, or while the
    process is over its high-water mark (:meth:`Writer.stalled`): a client
    that never reads is dropped even when nothing more is written to it and
    whatever it sends (unsolicited PONGs included).

    One repeating timer checks every connection, instead of a timeout on each
    blocking ``recv()`` (which costs a gevent ``Timeout`` per read: ~7% of
    the server's time in the push/reply benchmark). The timer runs only
    while there are connections, every quarter of the shortest timeout (at
    most every second).
    """

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.transports: set[WebSocketTransport] = set()
        self.period = 1.0
        self.timer: Any = None

    def add(self, transport: WebSocketTransport) -> None:
        self.transports.add(transport)
        period = min(1.0, flow.slow_timeout / 4)
        if transport.opts.timeout is not None:
            period = min(period, transport.opts.timeout / 4)
        period = max(period, 0.01)
        if self.timer is None or period < self.period:
            self.period = period
            self._restart()

    def discard(self, transport: WebSocketTransport) -> None:
        self.transports.discard(transport)
        if not self.transports and self.timer is not None:
            self.timer.stop()
            self.timer.close()
            self.timer = None
            self.period = 1.0

    def _restart(self) -> None:
        if self.timer is not None:
            self.timer.stop()
            self.timer.close()
        self.timer = self.loop.timer(self.period, self.period)
        self.timer.start(self._sweep)

    def _sweep(self) -> None:
        # A hub callback: it only queues close frames, never blocks, never raises.
        try:
            now = _monotonic()
            idle = []
            stalled = []
            slow = []
            for t in self.transports:
                writer = t.writer
                # Nothing queued is never stalled (FlowControl.stalled): skip two calls per connection.
                if writer.qbytes and writer.stalled(now):
                    stalled.append(t)
                elif t.input_deadline and now > t.input_deadline:
                    slow.append(t)
                elif t.opts.timeout is not None and now - t.last_recv > t.opts.timeout:
                    idle.append(t)
            for transport in stalled:
                log.warning(
                    "phx_gevent: dropping a connection that drained nothing for %.1fs with %d bytes queued",
                    flow.slow_timeout,
                    transport.writer.qbytes,
                )
                transport.writer.abort(frames.CLOSE_POLICY, "slow client")
            for transport in slow:
                log.info("phx_gevent: dropping a WebSocket whose message took over %.1fs to arrive", flow.input_timeout)
                # The reader is blocked in recv(): shutting the socket down wakes it (EOF).
                transport.writer.abort(frames.CLOSE_POLICY, "message too slow")
            for transport in idle:
                self.transports.discard(transport)
                transport.close(frames.CLOSE_GOING_AWAY, "idle timeout")
        except Exception:
            supervise.failed("websocket sweeper")
