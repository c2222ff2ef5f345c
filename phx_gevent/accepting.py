"""Accepting connections in a reconnect storm without starving the connected ones.

:class:`PacedAccept` is mixed into :class:`phx_gevent.server.Server` and the
gunicorn worker's server (benchmarks/README.md, the connect storm).
"""

from __future__ import annotations

from collections import deque
from typing import Any

__all__ = ["ACCEPT_BATCH", "PacedAccept"]


#: Handler greenlets started per turn of the hub's callback queue while accepted connections wait.
ACCEPT_BATCH = 32


class PacedAccept:
    """Accept at once, but start the accepted connections' handlers a batch per turn of the hub's queue.

    gevent starts a handler greenlet per accepted connection through the
    hub's callback queue (up to 100 per readiness of the listener). In a
    reconnect storm that queue grew faster than the handshakes were served,
    and everything else that goes through it (replies the flusher
    coalesces, worker greenlets woken for connected clients' heartbeats,
    channel runs) waited behind thousands of handshakes: heartbeats were
    missed. Here accepted connections wait in a queue of their own; a
    callback starts up to :data:`ACCEPT_BATCH` of them and queues itself
    behind what they queued, so other work waits for at most one batch.
    Accepting is not slowed, so the kernel's listen backlog stays empty (a
    full backlog drops SYNs, and clients retry only after a second).
    Mixed into :class:`Server` and the gunicorn worker's server.
    """

    _phx_pending: deque[tuple[Any, ...]] | None = None
    _phx_armed = False
    _phx_timer: Any = None
    #: Sockets whose handler has ended but whose connection lives on (see :meth:`phx_keep`).
    _phx_kept: set[Any] | None = None

    def phx_keep(self, sock: Any) -> None:
        """Leave ``sock`` open when its handler returns: an upgraded connection now served elsewhere.

        gevent closes a connection's socket once its handler greenlet is
        done; a WebSocket served by a read watcher (``transports.websocket``)
        outlives that greenlet and closes the socket itself. Without this, the
        socket had to be detached and wrapped anew (five system calls and a
        gevent socket per connection).
        """
        if self._phx_kept is None:
            self._phx_kept = set()
        self._phx_kept.add(sock)

    def do_close(self, sock: Any, *args: Any) -> None:
        kept = self._phx_kept
        if kept and sock in kept:
            kept.discard(sock)  # the handler is done; the connection's end closes the socket
            return
        super().do_close(sock, *args)  # type: ignore[misc]

    def do_handle(self, *args: Any) -> None:
        pending = self._phx_pending
        if pending is None:
            pending = self._phx_pending = deque()
        pending.append(args)
        if not self._phx_armed:
            self._phx_armed = True
            self.loop.run_callback(self._phx_start)  # type: ignore[attr-defined]

    def _phx_start(self) -> None:
        # Hub callback: start a batch, then come back behind what it queued.
        self._phx_armed = False
        pending = self._phx_pending
        if not pending:
            return
        server: Any = self
        handle = super().do_handle  # type: ignore[misc]
        for _ in range(ACCEPT_BATCH):
            if not pending:
                return
            if server.full():
                # A bounded pool (gunicorn's worker_connections) is full: look again shortly.
                self._phx_armed = True
                if self._phx_timer is None:
                    self._phx_timer = server.loop.timer(0.01)
                self._phx_timer.start(self._phx_start)
                return
            handle(*pending.popleft())
        self._phx_armed = True
        server.loop.run_callback(self._phx_start)

    def close(self) -> None:
        super().close()  # type: ignore[misc]
        if self._phx_timer is not None:
            self._phx_timer.close()
            self._phx_timer = None
        pending, self._phx_pending = self._phx_pending, None
        while pending:
            args = pending.popleft()
            try:
                self.do_close(*args)
            except OSError:
                pass
