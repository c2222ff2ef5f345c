"""A gunicorn worker for phx_gevent: ``-k phx_gevent.worker.GeventWebSocketWorker``.

On top of gunicorn's gevent worker (which monkey-patches first thing):

* requests go through phx_gevent's WSGI handler, so Flask views can accept
  WebSockets, and gunicorn's access log shows them (logged when they end);
* on SIGTERM the worker drains its connections with close code 1012 in
  batches (each mount's ``drainer`` options: ``batch_size``,
  ``batch_interval``, ``shutdown``), inside gunicorn's ``--graceful-timeout``,
  so phoenix.js clients reconnect to the other workers without a thundering
  herd;
* a worker started among several siblings with no cross-process PubSub
  adapter logs a warning: broadcasts would stay inside each worker.

Each open WebSocket holds one of gunicorn's ``--worker-connections`` slots
(default 1000); raise it (and the file-descriptor limit, ``ulimit -n``) for
more connections per worker.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler

from .server import WebSocketHandler

__all__ = ["GeventWebSocketWorker", "GunicornWebSocketHandler", "drain_all"]

log = logging.getLogger(__name__)


class GunicornWebSocketHandler(WebSocketHandler, PyWSGIHandler):
    """phx_gevent's handler with gunicorn's access log and environ keys (``gunicorn.sock``, ``RAW_URI``)."""


def drain_all(deadline: float, sleep: Any = gevent.sleep) -> int:
    """Close every connection of every endpoint in this process with 1012, in batches.

    Batches follow each mount's ``drainer`` options; the whole drain stops at
    ``deadline`` (a ``time.monotonic()`` value). Returns how many were drained.
    """
    from .endpoint import endpoints

    drained = 0
    for endpoint in list(endpoints):
        for mount in endpoint.mounts:
            opts = mount.drainer
            if opts is None:
                continue
            size = max(1, int(opts["batch_size"]))
            interval = float(opts["batch_interval"])
            end = min(deadline, time.monotonic() + float(opts["shutdown"]))
            while mount.connections and time.monotonic() < end:
                batch = list(mount.connections)[:size]
                for conn in batch:
                    conn.drain()
                drained += len(batch)
                # Connections leave the set when their reader finishes; wait for
                # this batch (bounded) before the next one.
                pause_end = min(end, time.monotonic() + interval)
                while time.monotonic() < pause_end and any(c in mount.connections for c in batch):
                    sleep(0.05)
                remaining = pause_end - time.monotonic()
                if mount.connections and remaining > 0:
                    sleep(remaining)
    return drained


class GeventWebSocketWorker(GeventPyWSGIWorker):
    """gunicorn's gevent worker with phx_gevent's handler, drain on SIGTERM, and a multi-worker check."""

    wsgi_handler = GunicornWebSocketHandler

    def init_process(self) -> None:
        self._draining = False
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self._check_pubsub()

    def _check_pubsub(self) -> None:
        from .endpoint import endpoints

        if self.cfg.workers <= 1:
            return
        for endpoint in list(endpoints):
            if endpoint.pubsub.adapter is None:
                message = (
                    "phx_gevent: %d workers but endpoint %r has no cross-process PubSub adapter: "
                    "broadcasts, disconnects and long-poll sessions stay inside each worker. "
                    "Pass pubsub='redis://...' to Endpoint()."
                )
                self.log.warning(message, self.cfg.workers, endpoint.name)
                log.warning(message, self.cfg.workers, endpoint.name)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if not getattr(self, "_draining", False):
            self._draining = True
            gevent.spawn(self._drain)

    def _drain(self) -> None:
        # Leave a second of gunicorn's graceful timeout for the close frames to go out.
        deadline = time.monotonic() + max(0.0, float(self.cfg.graceful_timeout) - 1.0)
        try:
            count = drain_all(deadline)
            if count:
                self.log.info("phx_gevent: drained %d connections (close 1012)", count)
        except Exception:
            self.log.exception("phx_gevent: drain failed")
