"""The Redis adapter's publisher greenlet, and the state its connection loops share.

Mixins of :class:`~phx_gevent.pubsub.redis.RedisAdapter`, which holds the
state they share (declared below for the type checker) and decides when they
run; the outbox rules they apply are :mod:`phx_gevent.pubsub.outbox`. The
receiving side is :mod:`phx_gevent.pubsub.redis_receive`.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import Event
from gevent.lock import BoundedSemaphore

from .. import supervise, telemetry
from .outbox import HistoryCmd, Item, Outbox
from .subscriptions import Batch, SubscriptionManager

try:
    import redis
    from redis.exceptions import RedisError, ResponseError
except ImportError:  # pragma: no cover - redis-py is a requirement, but fail clearly without it
    redis = None  # type: ignore[assignment]
    RedisError = ResponseError = Exception  # type: ignore[assignment,misc]

__all__ = ["CONN_ERRORS", "AdapterState", "Backoff", "PublishLoop"]

log = logging.getLogger(__name__)

_monotonic = time.monotonic

# Errors that mean "the connection is unusable": reconnect.
CONN_ERRORS = (RedisError, OSError, ValueError, IndexError, TypeError)


#: Seconds a node count is remembered for the replay after an outage (see ``_saw_nodes``).
NODES_MEMORY = 30.0
#: Seconds the node count must stay unchanged before a replay when no earlier count is known.
REPLAY_SETTLE = 0.3


class Backoff:
    """Exponential backoff with jitter between ``low`` and ``high`` seconds."""

    __slots__ = ("low", "high", "current")

    def __init__(self, low: float, high: float) -> None:
        self.low = low
        self.high = high
        self.current = low

    def next(self) -> float:
        """The next delay, in seconds (doubling up to ``high``, with jitter)."""
        delay = self.current
        self.current = min(self.high, self.current * 2)
        # Jitter: nodes that lost Redis together do not reconnect in lockstep.
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        """Start again from ``low`` (after a success)."""
        self.current = self.low


class AdapterState:
    """What the loops share with the adapter (set by ``RedisAdapter.__init__`` and ``_reset_state``)."""

    if TYPE_CHECKING:  # pragma: no cover - declarations for the type checker only
        node_name: str
        backoff: tuple[float, float]
        batch_size: int
        direct_ttl: float
        health_check_interval: float
        max_pending: int
        max_inbox: int
        max_inbox_bytes: int
        flow_control: bool
        publish_timeout: float
        replay_wait: float
        replay_window: float
        socket_timeout: float
        _where: str
        _stop: Event
        _greenlets: list[Any]
        _pub_conn: Any
        _sub_conn: Any
        _receive: Callable[[dict[str, Any]], None] | None
        _counters: dict[str, int]
        _last_error: str | None
        routing: str
        subscribe_timeout: float
        _running: bool
        _bchan: bytes
        _dchan: bytes
        _dprefix: bytes
        _subs: SubscriptionManager
        _restore: Batch
        _bus_event: Event
        _bus_lock: BoundedSemaphore
        _bus_up: bool
        _echo: bytes
        _echo_history: bytes
        _out: Outbox
        _out_event: Event
        _space: Event
        _inbox: deque[bytes]
        _inbox_bytes: int
        _in_event: Event
        _pub_ok: bool
        _sub_ok: bool
        _pub_down_since: float | None
        _sub_down_since: float | None
        _sub_ready: Event
        _in_outage: bool
        _outage_began: float
        _subscribers_seen: int
        _nodes_high: int
        _nodes_high_at: float
        _probed: float
        _gaps: dict[str, Any]
        _append_sha: bytes | None
        _reload_scripts: bool
        _expired_unlogged: int
        _log_drop_out: supervise.LogLimiter
        _log_expired: supervise.LogLimiter
        _log_pub_retry: supervise.LogLimiter
        _log_sub_retry: supervise.LogLimiter
        _log_drop_in: supervise.LogLimiter
        _log_overload: supervise.LogLimiter
        _log_invalid: supervise.LogLimiter
        _log_delivery: supervise.LogLimiter

        def _alive(self, gen: int) -> bool: ...
        def _history_fallback(self, item: Item) -> Item: ...
        def _convert_history(self) -> None: ...
        def _reset_gaps(self, conn: Any) -> None: ...
        def _load_scripts(self, conn: Any) -> None: ...
        def _channel(self, topic: str) -> bytes: ...


class PublishLoop(AdapterState):
    """The publisher greenlet: writes the outbox to Redis in pipelined batches, replays after an outage."""

    #: The command a broadcast or direct message is written with (a Redis Cluster shard: SPUBLISH).
    _publish_cmd = b"PUBLISH"
    #: Whether nodes are counted (PUBSUB NUMSUB) for the replay after an outage.
    _count_nodes = True
    #: How they are counted: ``PUBSUB NUMSUB`` (a cluster shard: ``SHARDNUMSUB`` of its own counting channel).
    _numsub = b"NUMSUB"

    def _refused(self, item: Item, exc: BaseException) -> bool:
        """Redis refused ``item``: True when it was taken care of (a cluster shard re-routes a moved slot)."""
        return False

    def _make_room(self, size: int) -> bool:
        current = gevent.getcurrent()
        if self._pub_down_since is None and self.publish_timeout > 0 and current not in self._greenlets:
            # Redis is there but slower than we publish: slow the caller down a little.
            deadline = _monotonic() + self.publish_timeout
            while self._out.full(size) and self._pub_down_since is None:
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    break
                self._space.clear()
                self._space.wait(remaining)
        dropped, accepted = self._out.drop_oldest(size, self._history_fallback)
        if not accepted:
            dropped += 1  # everything left is being written: the new envelope is the one dropped
        if dropped:
            self._counters["publish_dropped"] += dropped
            suppressed = self._log_drop_out.ready()
            if suppressed is not None:
                log.warning(
                    "phx_gevent: Redis publish queue full (%d envelopes, %d bytes; Redis %s): dropped %d "
                    "envelope(s) not forwarded to other nodes (%d total)",
                    len(self._out),
                    self._out.pending_bytes,
                    "connected" if self._pub_ok else "unreachable",
                    dropped + suppressed,
                    self._counters["publish_dropped"],
                )
        return accepted

    def _expire(self) -> None:
        expired = self._out.expire(_monotonic(), self.replay_window, self.direct_ttl, self._history_fallback)
        if expired:
            self._counters["publish_expired"] += expired
            self._expired_unlogged += expired
            if self._log_expired.ready() is not None:
                log.warning(
                    "phx_gevent: %d envelopes waited too long for Redis (broadcasts: %.1fs, direct messages: "
                    "%.1fs) and were dropped (not forwarded; %d in total)",
                    self._expired_unlogged,
                    self.replay_window,
                    self.direct_ttl,
                    self._counters["publish_expired"],
                )
                self._expired_unlogged = 0
            self._space.set()

    def _pub_failed(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._convert_history()
        now = _monotonic()
        if self._pub_ok or self._pub_down_since is None:
            self._pub_ok = False
            self._pub_down_since = now
            self._outage_started()
            log.warning(
                "phx_gevent: Redis %s unreachable for publishing (%s); broadcasts reach this process only, "
                "the last %.0fs (at most %d envelopes) are kept for replay",
                self._where,
                self._last_error,
                self.replay_window,
                self.max_pending,
            )
            self._log_pub_retry.ready()
        elif self._log_pub_retry.ready() is not None:
            log.warning(
                "phx_gevent: Redis %s still unreachable after %.0fs (%s); %d envelopes waiting",
                self._where,
                now - self._pub_down_since,
                self._last_error,
                len(self._out),
            )
        self._space.set()  # publishers waiting for room stop waiting: the queue is now the replay buffer

    def _outage_started(self) -> None:
        # One outage = from the first side that loses Redis until both are back.
        if not self._in_outage:
            self._in_outage = True
            self._outage_began = _monotonic()
            self._counters["outages"] += 1
            if telemetry.pubsub_down.receivers:
                meta = {"node": self.node_name, "adapter": repr(self), "reason": self._last_error}
                telemetry.emit(telemetry.pubsub_down, self, {}, meta)

    def _outage_over(self) -> None:
        if self._in_outage and self._pub_down_since is None and self._sub_down_since is None:
            self._in_outage = False
            if telemetry.pubsub_up.receivers:
                took = {"duration": _monotonic() - self._outage_began}
                telemetry.emit(telemetry.pubsub_up, self, took, {"node": self.node_name, "adapter": repr(self)})

    def _run_publisher(self, gen: int) -> None:
        conn = self._pub_conn
        backoff = Backoff(*self.backoff)
        last_io = _monotonic()
        while self._alive(gen):
            try:
                if not conn.is_connected:
                    if self._pub_down_since is not None:
                        self._expire()
                    conn.connect()
                    last_io = _monotonic()
                    self._load_scripts(conn)
                    if self._pub_down_since is None:
                        self._probe(conn)
                if self._pub_down_since is not None:
                    self._recovered(conn, gen)
                    backoff.reset()
                    if not self._alive(gen):
                        return
                self._pub_ok = True
                if not self._out:
                    self._out_event.clear()
                    if not self._out.queue and not self._out_event.wait(self.health_check_interval):
                        if self._alive(gen):
                            # Idle: check the connection, and count the nodes for the next replay.
                            self._probe(conn)
                            last_io = _monotonic()
                    continue
                if _monotonic() - last_io > 1.0 and conn.can_read(0):
                    # Idle connection became readable: the server closed it (restart).
                    raise redis.ConnectionError("connection closed by the server while idle")
                self._send_batch(conn)
                last_io = _monotonic()
            except CONN_ERRORS as exc:
                conn.disconnect()
                self._out.requeue()
                if not self._alive(gen):
                    return
                self._pub_failed(exc)
                self._stop.wait(backoff.next())
            except Exception:
                # A bug must not end the only publish path: log, pause, go on.
                supervise.failed("Redis publisher")
                conn.disconnect()
                self._out.requeue()
                self._stop.wait(backoff.next())

    def _probe(self, conn: Any) -> None:
        conn.send_command(b"PUBSUB", self._numsub, self._bchan, check_health=False)
        self._saw_nodes(int(conn.read_response()[1]))

    def _saw_nodes(self, count: int) -> None:
        # The replay after an outage waits for as many nodes as were subscribed before it. One
        # count can be low for a moment (a node's listener reconnecting, or counted just as the
        # outage began), which would replay to nobody: remember the highest count of the last
        # NODES_MEMORY seconds, and wait for that (a node that really left costs one replay_wait).
        self._subscribers_seen = count
        now = _monotonic()
        if count >= self._nodes_high or now - self._nodes_high_at > NODES_MEMORY:
            self._nodes_high = count
            self._nodes_high_at = now

    def _recovered(self, conn: Any, gen: int) -> None:
        # Back after an outage: drop what is too old, wait (bounded) for the
        # other nodes to resubscribe, so the replay is not published to nobody.
        self._expire()
        self._reset_gaps(conn)
        pending = len(self._out)
        waited = 0.0
        expected = max(self._subscribers_seen, self._nodes_high)
        if pending and self._count_nodes:
            # With a count from before the outage (more than this node), wait until that many are
            # back. Without one (the outage came before any count saw the other nodes, as right
            # after a start), wait until this node is counted and the count has not grown for REPLAY_SETTLE seconds.
            start = steady_since = _monotonic()
            deadline = start + self.replay_wait
            last = -1
            while self._alive(gen):
                conn.send_command(b"PUBSUB", self._numsub, self._bchan, check_health=False)
                count = int(conn.read_response()[1])
                now = _monotonic()
                if count != last:
                    last, steady_since = count, now
                known = expected > 1 and count >= expected
                settled = expected <= 1 and count >= 1 and now - steady_since >= REPLAY_SETTLE
                if known or settled or now >= deadline:
                    self._subscribers_seen = self._nodes_high = count
                    self._nodes_high_at = now
                    break
                self._stop.wait(0.05)
            waited = _monotonic() - start
            self._expire()
            pending = len(self._out)
        down_since = self._pub_down_since if self._pub_down_since is not None else _monotonic()
        log.warning(
            "phx_gevent: Redis %s reachable again for publishing after %.1fs; replaying %d envelopes%s",
            self._where,
            _monotonic() - down_since,
            pending,
            f" (waited {waited:.1f}s for other nodes to resubscribe)" if waited >= 0.05 else "",
        )
        self._counters["replayed"] += pending
        self._counters["reconnects"] += 1
        self._pub_down_since = None
        self._pub_ok = True
        self._outage_over()

    def _send_batch(self, conn: Any) -> None:
        out = self._out
        if not out.inflight:
            queue = out.queue
            if queue and queue[0][0] < _monotonic() - self.direct_ttl:
                self._expire()  # a backlog: stale direct messages are not worth sending
        inflight = out.take(self.batch_size)
        if not inflight:
            return
        bchan = self._bchan
        dprefix = self._dprefix
        counters = self._counters
        try:
            if self._reload_scripts:
                self._reload_scripts = False
                self._load_scripts(conn)
            if self._gaps:
                self._reset_gaps(conn)
            sha = self._append_sha
            commands: list[tuple[Any, ...]] = [
                (self._publish_cmd, channel, data)
                if isinstance(channel, bytes)
                else (b"EVALSHA", sha, 2, *channel.args)
                for _, channel, data in inflight
            ]
            # Topic routing: a PUBLISH answers how many nodes hold that topic, not how many nodes
            # there are; count them with the batch (at most ten times a second) for the next replay.
            probe = self._count_nodes and self.routing == "topic" and _monotonic() - self._probed > 0.1
            if probe:
                commands.append((b"PUBSUB", self._numsub, bchan))
            conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        except CONN_ERRORS:
            # Possibly partly written: what Redis did not acknowledge is sent again.
            counters["resent"] += len(inflight)
            raise
        while inflight:
            try:
                receivers = conn.read_response()
            except ResponseError as exc:
                # Refused by Redis (ACL, ...): this one is lost, the connection is fine.
                receivers = None
                if self._refused(inflight[0], exc):
                    pass  # sent elsewhere (a Redis Cluster slot that moved)
                elif type(inflight[0][1]) is HistoryCmd:
                    counters["publish_errors"] += 1
                    log.error("phx_gevent: Redis refused a history append on %r: %s", inflight[0][1].topic, exc)
                    self._history_fallback(inflight[0])
                    if b"NOSCRIPT" in str(exc).encode():
                        self._reload_scripts = True
                else:
                    counters["publish_errors"] += 1
                    log.error("phx_gevent: Redis refused to publish on %r: %s", inflight[0][1], exc)
            except CONN_ERRORS:
                counters["resent"] += len(inflight)
                raise
            _, channel, _data = out.acknowledged()
            counters["published"] += 1
            if receivers is not None:
                if channel == bchan:
                    self._saw_nodes(int(receivers))
                elif not receivers and isinstance(channel, bytes) and channel.startswith(dprefix):
                    counters["direct_unrouted"] += 1
        if probe:
            self._saw_nodes(int(conn.read_response()[1]))
            self._probed = _monotonic()
        self._space.set()
