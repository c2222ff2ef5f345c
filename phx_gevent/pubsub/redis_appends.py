"""The Redis adapter's history appends: queued script runs, gaps, and what happens when they cannot run.

Mixin of :class:`~phx_gevent.pubsub.redis.RedisAdapter`. A broadcast of a
kept event is not PUBLISHed but queued as an ``EVALSHA`` of
:data:`~phx_gevent.pubsub.history_redis.APPEND_SCRIPT`, which numbers, stores
and publishes it (on the topic's channel) in one step; this node delivers it
when its echo comes back, with the offset. The scripts and keys are
:mod:`phx_gevent.pubsub.history_redis`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from . import history_redis as _history
from .outbox import HistoryCmd
from .redis_loops import AdapterState

try:
    import redis
except ImportError:  # pragma: no cover - redis-py is a requirement, but fail clearly without it
    redis = None  # type: ignore[assignment]

__all__ = ["HistoryAppends"]

log = logging.getLogger(__name__)

_monotonic = time.monotonic


class HistoryAppends(AdapterState):
    """History appends of the Redis adapter (see the module docstring)."""

    if TYPE_CHECKING:  # pragma: no cover
        prefix: str
        routing: str
        _pool: Any
        _running: bool
        _owner_pid: int
        on_history_fallback: Any

        def ensure_started(self) -> None: ...
        def _make_room(self, size: int) -> bool: ...
        def wait_routed(self, topic: str, timeout: float | None = None) -> bool: ...

    def publish_history(self, envelope: dict[str, Any], config: Any) -> bool:
        """Queue the history append of a broadcast (see :meth:`Adapter.publish_history`).

        Returns False while Redis is known to be unreachable: the caller then
        delivers locally without an offset (:meth:`history_gap` is recorded).
        Raises ``TypeError``/``OverflowError`` when the payload cannot be encoded.
        """
        if self._owner_pid != os.getpid():
            self.ensure_started()
        topic = envelope["t"]
        if not self._sub_ready.is_set() and self._running and self._pub_down_since is None:
            # Just started: our own echo would be lost before the listener subscribed.
            self._sub_ready.wait(self.socket_timeout)
        if self._pub_down_since is not None or not self._running or not self._sub_ready.is_set():
            self.history_gap(topic, config)
            return False
        if self.routing != "broadcast" and self._subs.refs(self._channel(topic)) and not self.wait_routed(topic):
            # This node's subscribers get the message through its echo, on the topic's
            # channel: not subscribed there (yet), they would miss it.
            self.history_gap(topic, config)
            return False
        # A gap recorded earlier is marked (_reset_gaps) before this append is sent.
        args, plain = _history.append_args(self.prefix, self.node_name, envelope, config, False, self.routing)
        size = len(plain)
        if self._out.full(size) and not self._make_room(size):
            self.history_gap(topic, config)
            return False
        self._out.add((_monotonic(), HistoryCmd(args, topic, config), plain))
        self._out_event.set()
        return True

    def history_pool(self, max_connections: int = 8, timeout: float = 5.0) -> Any:
        """A blocking connection pool to the same Redis (same options), for history reads."""
        kwargs = dict(self._pool.connection_kwargs)
        for key in list(kwargs):
            if key.startswith(("maint_notifications", "oss_cluster_maint")):
                del kwargs[key]
        return redis.BlockingConnectionPool(
            connection_class=self._pool.connection_class, max_connections=max_connections, timeout=timeout, **kwargs
        )

    def history_gap(self, topic: str, config: Any) -> None:
        """Record that ``topic``'s history missed a message: its epoch changes before the next append."""
        self._gaps[topic] = config

    def _history_fallback(self, item: tuple[Any, Any, bytes]) -> tuple[Any, Any, bytes]:
        # A history append that will not run: deliver here without offset, mark the
        # gap, and forward it to the other nodes as a plain broadcast instead.
        cmd = item[1]
        self.history_gap(cmd.topic, cmd.config)
        callback = self.on_history_fallback
        if callback is not None:
            try:
                callback(item[2])
            except Exception:
                log.exception("phx_gevent: local delivery of a history broadcast failed")
        return (item[0], self._channel(cmd.topic), item[2])

    def _convert_history(self) -> None:
        # Redis is unreachable: queued history appends become plain broadcasts
        # (kept for replay like any other), delivered here at once without offset.
        self._out.convert_history(self._history_fallback)

    def _reset_gaps(self, conn: Any) -> None:
        # Back after an outage: mark a gap in the history of every topic that had
        # messages delivered without offsets, before anything else is published.
        for topic, config in list(self._gaps.items()):
            args = _history.gap_args(self.prefix, self.node_name, topic, config, self.routing)
            conn.send_command("EVAL", _history.GAP_SCRIPT, 2, *args)
            conn.read_response()
            self._gaps.pop(topic, None)

    def _load_scripts(self, conn: Any) -> None:
        conn.send_command("SCRIPT", "LOAD", _history.APPEND_SCRIPT, check_health=False)
        sha = conn.read_response()
        self._append_sha = sha if isinstance(sha, bytes) else str(sha).encode()
