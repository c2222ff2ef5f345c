"""Ending a server's WebSockets when it stops: the 1001 close of ``Server.stop()``.

:func:`close_websockets` closes every WebSocket a server accepted when it
stops, so no client is left on a socket that nobody reads. The 1012 drain of
SIGTERM and the gunicorn worker is :mod:`phx_gevent.drain`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent

from .transports.writer import CLOSED as WRITER_CLOSED

__all__ = ["StopClosesWebSockets", "close_websockets"]

log = logging.getLogger(__name__)


def close_websockets(server: Any, timeout: float, sleep: Any = gevent.sleep) -> int:
    """Close the WebSocket connections ``server`` accepted with 1001 (going away); returns how many.

    Each gets its close frame after what is queued for it; once the frames
    are out (at most ``timeout`` seconds) the connections are shut down, so
    their channels terminate and no reader is left waiting on a client.
    Called by :meth:`Server.stop <phx_gevent.server.Server.stop>`.
    """
    from .endpoint import endpoints

    conns = [
        conn
        for endpoint in list(endpoints)
        for mount in endpoint.mounts
        for conn in list(mount.connections)
        if getattr(conn.transport, "server", None) is server
    ]
    for conn in conns:
        conn.shutdown()
    # A hub callback cannot wait: there the connections are shut down at once.
    in_hub = gevent.getcurrent() is gevent.get_hub()
    deadline = time.monotonic() + (0.0 if in_hub else max(0.0, timeout))
    # The close frames go out from the hub (the flusher): wait for them, never past the deadline.
    while time.monotonic() < deadline and any(
        not c.closed and c.transport.writer.state != WRITER_CLOSED for c in conns
    ):
        sleep(0.01)
    for conn in conns:
        if not conn.closed:
            conn.transport.shut()
    # Their readers see the end now and terminate the channels (bounded: a callback may be stuck).
    end = time.monotonic() + (0.0 if in_hub else 1.0)
    while time.monotonic() < end and any(not c.closed for c in conns):
        sleep(0.01)
    if conns:
        log.info("phx_gevent: closed %d WebSocket connections (close 1001) as the server stopped", len(conns))
    return len(conns)


class StopClosesWebSockets:
    """Mixed into :class:`phx_gevent.server.Server`: its ``stop()`` closes the WebSockets it accepted first."""

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, close this server's WebSockets with 1001, then stop as gevent's server does.

        The close frames get up to ``timeout`` seconds (default
        ``stop_timeout``) to go out; then the connections are shut down and
        their channels terminate. Handlers still running after that are
        killed (gevent's rule).
        """
        server: Any = self
        server.close()
        close_websockets(server, server.stop_timeout if timeout is None else timeout)
        super().stop(timeout=timeout)  # type: ignore[misc]
