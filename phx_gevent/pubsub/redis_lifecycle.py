"""The Redis adapter's connections and process lifecycle: patching check, fork, exit flush, ping.

Mixin of :class:`~phx_gevent.pubsub.redis.RedisAdapter` (its shared state is
declared in :class:`~phx_gevent.pubsub.redis_loops.AdapterState`).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import time
import weakref
from typing import TYPE_CHECKING, Any

import gevent

from ..errors import NotMonkeyPatchedError
from .base import make_node_name
from .redis_loops import CONN_ERRORS, AdapterState

if TYPE_CHECKING:  # pragma: no cover
    from .redis import RedisAdapter

__all__ = ["NOT_PATCHED_MESSAGE", "Lifecycle", "after_fork", "register_exit_flush"]

log = logging.getLogger(__name__)

_monotonic = time.monotonic

#: Why the adapter refuses to start in an unpatched process, and the two fixes.
NOT_PATCHED_MESSAGE = (
    "phx_gevent: the Redis adapter needs gevent's monkey-patching, and this process is not patched: "
    "its greenlets would wait for Redis on blocking sockets and stall every connection (clients would "
    "never get their joins). Fix: make `from gevent import monkey; monkey.patch_all()` the first lines "
    "of the program that serves the app, before any other import (gunicorn -k "
    "phx_gevent.worker.GeventWebSocketWorker patches by itself). To broadcast from a process that does "
    "not serve requests (a script, a cron job, a Celery task), use phx_gevent.Emitter(redis_url) instead "
    "of an Endpoint (docs/background-jobs.md)."
)


#: Adapters started in this process (flushed at interpreter exit).
_started: weakref.WeakSet[RedisAdapter] = weakref.WeakSet()
_exit_hook = False


def register_exit_flush(adapter: RedisAdapter) -> None:
    """Have ``adapter`` send what it queued at interpreter exit (once registered, for its life)."""
    global _exit_hook
    _started.add(adapter)
    if not _exit_hook:
        _exit_hook = True
        atexit.register(_flush_at_exit)


def _flush_at_exit() -> None:
    # A script that broadcast and exits: what is queued goes to Redis before the
    # interpreter ends (bounded by each adapter's close_timeout), or is logged as dropped.
    for adapter in list(_started):
        if adapter._running and adapter._owner_pid == os.getpid():
            try:
                adapter.stop()
            except Exception:
                log.exception("phx_gevent: flushing %r at exit failed", adapter)


def after_fork(ref: weakref.ref[RedisAdapter]) -> None:
    """In a forked child: tell the adapter behind ``ref`` (if still alive) that it was forked."""
    adapter = ref()
    if adapter is not None:
        adapter._forked()


class Lifecycle(AdapterState):
    """Connections, fork and patching rules of the Redis adapter (see the module docstring)."""

    if TYPE_CHECKING:  # pragma: no cover
        prefix: str
        _pool: Any
        _gen: int
        _running: bool
        _stale: list[Any]
        _node_auto: bool
        _ping_conn: Any
        _ping_pid: int

        close_timeout: float

        def _reset_state(self) -> None: ...

    def _describe(self) -> str:
        # Where Redis is, for logs: never the password.
        kw = self._pool.connection_kwargs
        if "path" in kw:
            return f"unix:{kw['path']}"
        return f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"

    def _connection(self, role: str) -> Any:
        kwargs = dict(self._pool.connection_kwargs)
        # RESP2: pub/sub messages are plain arrays and every Redis version speaks it.
        kwargs["protocol"] = 2
        for key in list(kwargs):
            if key.startswith(("maint_notifications", "oss_cluster_maint")):
                del kwargs[key]  # RESP3-only machinery (redis-py 8 enables it by default)
        kwargs["client_name"] = re.sub(r"[^!-~]", "_", f"{self.prefix}:{role}:{self.node_name}")
        kwargs.setdefault("driver_info", None)
        return self._pool.connection_class(**kwargs)

    def ping(self) -> float | None:
        """Seconds one ``PING`` takes to Redis on a connection of its own; ``None`` when it fails.

        Blocks the calling greenlet up to ``socket_timeout`` (the dashboard
        runs it in a greenlet of its own). Never raises for a Redis problem.
        """
        if self._ping_conn is None or self._ping_pid != os.getpid():
            self._ping_conn, self._ping_pid = self._connection("ping"), os.getpid()
        conn = self._ping_conn
        try:
            start = _monotonic()
            conn.send_command("PING", check_health=False)
            conn.read_response()
            return _monotonic() - start
        except CONN_ERRORS:
            conn.disconnect()
            return None

    def _check_patched(self) -> None:
        # Refuse rather than log and go on: unpatched, the listener's blocking
        # read holds the whole process and clients never get their joins.
        from gevent import monkey

        if not monkey.is_module_patched("socket"):
            raise NotMonkeyPatchedError(NOT_PATCHED_MESSAGE)

    def _forked(self) -> None:
        # In a child right after fork(): nothing here may switch greenlets.
        # The parent's greenlets and connections are left for _cleanup_stale.
        self._gen += 1
        self._stale.extend(c for c in (self._pub_conn, self._sub_conn) if c is not None)
        self._stale.extend(self._greenlets)
        self._greenlets = []
        self._pub_conn = self._sub_conn = None
        self._running = False
        if self._node_auto:
            self.node_name = make_node_name()
        self._reset_state()

    def _cleanup_stale(self) -> None:
        stale, self._stale = self._stale, []
        for item in stale:
            if isinstance(item, gevent.Greenlet):
                item.kill(block=False)
            else:
                # redis-py only shuts a socket down in the process that opened it:
                # this closes our copy and leaves the parent's connection alone.
                try:
                    item.disconnect()
                except Exception:
                    log.debug("phx_gevent: closing an inherited Redis connection failed", exc_info=True)

    def stop(self, timeout: float | None = None) -> int:
        """Send what is queued, for at most ``timeout`` seconds, then disconnect; returns how many were dropped.

        ``timeout`` defaults to ``close_timeout``. It stops waiting early
        once the publisher found Redis unreachable (no point waiting for a
        reconnection at exit). What is still queued then is dropped, counted
        (``publish_dropped``) and logged as a warning. Called by
        ``Endpoint.close()``, by the gunicorn worker at shutdown, and at
        interpreter exit for an adapter still running.
        """
        if not self._running:
            return 0
        if timeout is None:
            timeout = self.close_timeout
        deadline = _monotonic() + timeout
        current = gevent.getcurrent()
        if current not in self._greenlets:
            while self._out and self._pub_down_since is None and _monotonic() < deadline:
                # Waiting on a gevent event lets the publisher run, even in a process that never
                # yields otherwise (a script at exit).
                self._space.clear()
                self._space.wait(max(0.0, min(0.1, deadline - _monotonic())))
        self._running = False
        self._bus_up = False
        self._gen += 1
        self._stop.set()
        self._out_event.set()
        self._in_event.set()
        others = [g for g in self._greenlets if g is not current]
        gevent.killall(others, block=True, timeout=max(0.1, deadline - _monotonic()))
        self._greenlets = []
        for conn in (self._pub_conn, self._sub_conn):
            if conn is not None:
                conn.disconnect()
        self._pub_ok = self._sub_ok = False
        lost = self._out.clear()
        if lost:
            self._counters["publish_dropped"] += lost
            log.warning(
                "phx_gevent: Redis adapter stopped with %d envelope(s) not forwarded to other nodes "
                "(Redis %s %s within %.1fs)",
                lost,
                self._where,
                "unreachable" if self._pub_down_since is not None else "too slow",
                timeout,
            )
        self._inbox.clear()
        self._inbox_bytes = 0
        return lost
