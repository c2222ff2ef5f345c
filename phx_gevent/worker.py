"""A gunicorn worker for phx_gevent: ``-k phx_gevent.worker.GeventWebSocketWorker``.

On top of gunicorn's gevent worker (which monkey-patches first thing):

* requests go through phx_gevent's WSGI handler, so Flask views can accept
  WebSockets, and gunicorn's access log shows them (a WebSocket's line is
  written when the connection ends, with status 101);
* once the app is loaded, every endpoint's PubSub starts in the worker (so a
  Redis adapter subscribes before the first request, with a node name of
  its own even under ``--preload``), and the worker logs
  ``phx_gevent: worker <pid> ready (node <name>, gc ...)``;
* a worker started among several siblings with no cross-process PubSub
  adapter logs a warning: broadcasts would stay inside each worker;
* on SIGTERM the worker stops accepting, then drains its connections that
  hold channels (as Phoenix does) with close code 1012 in batches (each mount's ``drainer`` options:
  ``batch_size``, ``batch_interval``, ``shutdown``) inside gunicorn's
  ``--graceful-timeout``, so phoenix.js clients reconnect to the other
  workers without a thundering herd; last, the PubSub adapter forwards what
  it still holds (at most a second) and disconnects.

A request head (and an idle keep-alive connection) gets ``PHX_HEADER_TIMEOUT``
seconds (default 20; ``off`` for no limit), as ``make_server(header_timeout=...)``.
Once the app is loaded, the garbage collector is set up for a server process
(:mod:`phx_gevent.collector`; ``PHX_GC_THRESHOLD``, default 10000, ``off`` to leave it).

Each open WebSocket (and each waiting long-poll request) holds one of
gunicorn's ``--worker-connections`` slots (default 1000); past it, new
connections wait in the listen backlog. Raise it, and the file-descriptor
limit (``ulimit -n``) with it, for more connections per worker.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler, PyWSGIServer

from . import metrics
from .collector import describe, threshold_from_env, tune_collector
from .pubsub.base import make_node_name
from .server import PacedAccept, WebSocketHandler, drain_all, header_timeout_from_env

__all__ = ["GeventWebSocketWorker", "GunicornWebSocketHandler", "drain_all"]

log = logging.getLogger(__name__)


class GunicornWebSocketHandler(WebSocketHandler, PyWSGIHandler):
    """phx_gevent's handler with gunicorn's access log and environ keys (``gunicorn.sock``, ``RAW_URI``)."""


#: The listening servers of this worker process that have started (closed first when draining).
_servers: weakref.WeakSet[Any] = weakref.WeakSet()
#: Set once the drain began: a server that finishes starting afterwards closes at once.
_stopping = False


class _Server(PacedAccept, PyWSGIServer):
    """gunicorn's pywsgi server, remembered once started so the drain can stop accepting first.

    It accepts in paced batches (:class:`~phx_gevent.accepting.PacedAccept`).
    """

    def start(self) -> None:
        # Registered only once start() is over: gevent's start() can switch
        # greenlets half-way, and a drain (SIGTERM during boot) that closed
        # the server then made start() fail ("no attribute 'socket'").
        super().start()
        _servers.add(self)
        if _stopping:
            self.close()


class GeventWebSocketWorker(GeventPyWSGIWorker):
    """gunicorn's gevent worker with phx_gevent's handler, drain on SIGTERM, and a multi-worker check."""

    wsgi_handler = GunicornWebSocketHandler
    server_class = _Server

    def init_process(self) -> None:
        self._draining = False
        # PHX_HEADER_TIMEOUT: gunicorn has no setting of ours; a bad value stops the boot with its reason.
        timeout = header_timeout_from_env()
        self._gc_threshold = threshold_from_env()  # PHX_GC_THRESHOLD, checked before the app loads

        class _ThisWorkersServer(_Server):
            phx_header_timeout = timeout

        self.server_class = _ThisWorkersServer
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        nodes = self._start_pubsub()
        self._check_pubsub()
        # The app is loaded: freeze start-up's objects, fewer collections (phx_gevent.collector).
        frozen = tune_collector(self._gc_threshold)
        gc_note = describe(self._gc_threshold, frozen)
        self.log.info("phx_gevent: worker %d ready (node %s, %s)", os.getpid(), ", ".join(nodes) or "-", gc_note)

    def _start_pubsub(self) -> list[str]:
        # Start each PubSub here, after the fork: the Redis adapter subscribes
        # before the first request, and every worker has its own node name.
        from .endpoint import endpoints

        names = []
        for endpoint in list(endpoints):
            pubsub = endpoint.pubsub
            try:
                if pubsub.adapter is None and self.cfg.preload_app:
                    pubsub.node_name = make_node_name()  # created in the master: shared by every worker
                pubsub.start()
                ensure = getattr(pubsub.adapter, "ensure_started", None)
                if ensure is not None:
                    ensure()  # started in the master (a broadcast at import): restart it here
                    pubsub.start()
                if endpoint.observer is not None:
                    endpoint.observer.ensure_started()  # metrics and dashboard sample from the start
            except Exception:
                self.log.exception("phx_gevent: could not start the PubSub of endpoint %r", endpoint.name)
            names.append(pubsub.node_name)
        return names

    def _check_pubsub(self) -> None:
        from .endpoint import endpoints

        if self.cfg.workers <= 1:
            return
        for endpoint in list(endpoints):
            if endpoint.pubsub.adapter is None:
                self.log.warning(
                    "phx_gevent: %d workers but endpoint %r has no cross-process PubSub adapter: "
                    "broadcasts, disconnects and long-poll sessions stay inside each worker. "
                    "Pass pubsub='redis://...' to Endpoint() (the example reads REDIS_URL).",
                    self.cfg.workers,
                    endpoint.name,
                )

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if not getattr(self, "_draining", False):
            self._draining = True
            drainer = gevent.Greenlet(self._drain)
            # gunicorn waits (up to its graceful timeout) while a server's pool
            # holds greenlets. WebSocket connections hold none (their reads
            # are served by watchers), so the drain itself holds a place.
            for server in list(_servers):
                try:
                    server.pool.add(drainer, blocking=False)
                except Exception:  # a full pool is busy anyway: gunicorn waits for it
                    pass
            drainer.start()

    def _drain(self) -> None:
        global _stopping
        _stopping = True
        # Stop accepting first, so drained clients reconnect to the other workers, not here.
        for server in list(_servers):
            try:
                server.close()
            except Exception:
                self.log.debug("phx_gevent: closing a listener failed", exc_info=True)
        # Leave a second of gunicorn's graceful timeout for the close frames to go out.
        deadline = time.monotonic() + max(0.0, float(self.cfg.graceful_timeout) - 1.0)
        try:
            count = drain_all(deadline)
            if count:
                self.log.info("phx_gevent: worker %d drained %d connections (close 1012)", os.getpid(), count)
        except Exception:
            self.log.exception("phx_gevent: drain failed")

    def run(self) -> None:
        try:
            super().run()
        finally:
            self._stop_pubsub()
            metrics.mark_process_dead()

    def _stop_pubsub(self) -> None:
        from .endpoint import endpoints
        from .presence import trackers

        # Tell the other nodes at once that this worker's presences are gone
        # (otherwise they wait out down_period).
        for presence in list(trackers):
            try:
                presence.close()
            except Exception:
                self.log.exception("phx_gevent: closing presence %r failed", presence.name)
        for endpoint in list(endpoints):
            try:
                endpoint.pubsub.stop(1.0)
            except Exception:
                self.log.exception("phx_gevent: stopping the PubSub of endpoint %r failed", endpoint.name)
