"""Ending connections when a server stops: the 1012 drain (SIGTERM) and the 1001 close of a plain stop.

:func:`drain_all` closes the connections that hold channels in batches, as
Phoenix's drainer does, before the gunicorn worker or :class:`~phx_gevent.server.Server`
stops; :func:`close_websockets` closes every WebSocket a server accepted
when it stops (``Server.stop()``), so no client is left on a socket that
nobody reads.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent

from . import telemetry
from .transports.writer import CLOSED as WRITER_CLOSED

__all__ = ["close_websockets", "drain_all"]

log = logging.getLogger(__name__)


def drain_all(deadline: float, sleep: Any = gevent.sleep) -> int:
    """Close every connection holding channels, of every endpoint in this process, with 1012, in batches.

    As Phoenix drains channel processes at shutdown, connections without a
    joined channel are left alone (they end with the server). Batches follow
    each mount's ``drainer`` options; the whole drain stops at ``deadline``
    (a ``time.monotonic()`` value). Returns how many were drained. Used by
    the gunicorn worker on SIGTERM and by :class:`Server` (``serve()``).
    """
    from .endpoint import endpoints

    drained = 0
    for endpoint in list(endpoints):
        endpoint.draining = True  # readiness probes answer 503 from now on
        for mount in endpoint.mounts:
            opts = mount.drainer
            if opts is None:
                continue
            size = max(1, int(opts.batch_size))
            interval = float(opts.batch_interval)
            end = min(deadline, time.monotonic() + float(opts.shutdown))
            done: set[int] = set()
            total, index = sum(1 for c in mount.connections if c.channels), 0
            while time.monotonic() < end:
                # Connections already told to close may linger for their close
                # handshake: never count them twice.
                batch = [c for c in list(mount.connections) if c.channels and id(c) not in done][:size]
                if not batch:
                    break
                for conn in batch:
                    done.add(id(conn))
                    conn.drain()
                drained += len(batch)
                _drain_event(endpoint, mount, len(batch), total, index, size, interval)
                index += 1
                # Wait for this batch to go (bounded), then for the rest of the interval.
                pause_end = min(end, time.monotonic() + interval)
                while time.monotonic() < pause_end and any(c in mount.connections for c in batch):
                    sleep(0.05)
                remaining = pause_end - time.monotonic()
                if remaining > 0 and any(c.channels and id(c) not in done for c in mount.connections):
                    sleep(remaining)
    return drained


def _drain_event(endpoint: Any, mount: Any, count: int, total: int, index: int, size: int, interval: float) -> None:
    # phoenix.socket_drain, once per batch, and Phoenix's log line at the mount's level.
    rounds = max(1, -(-total // size))
    if telemetry.socket_drain.receivers:
        telemetry.emit(
            telemetry.socket_drain,
            endpoint,
            {"count": count, "total": total, "index": index, "rounds": rounds},
            {"mount": mount.path, "interval": interval},
        )
    if mount.log_level is not None:
        log.log(
            mount.log_level,
            "%s shutting down, disconnecting %d of %d connections (round %d of %d)",
            type(mount.handler).__name__,
            count,
            total,
            index + 1,
            rounds,
        )


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
