"""Draining at shutdown: close the connections holding channels with 1012, in batches, as Phoenix does.

Used by the gunicorn worker on SIGTERM and by :class:`phx_gevent.server.Server`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent

from . import telemetry

__all__ = ["drain_all"]

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
