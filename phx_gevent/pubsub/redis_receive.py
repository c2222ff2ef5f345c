"""The Redis adapter's receiving side: the listener, the subscription writer and the delivery greenlets.

Mixin of :class:`~phx_gevent.pubsub.redis.RedisAdapter` (its shared state is
declared in :class:`~phx_gevent.pubsub.redis_loops.AdapterState`). One
subscriber connection carries every subscription of the node; which channels
it holds is decided by a pure :class:`~phx_gevent.pubsub.subscriptions.SubscriptionManager`:

listener
    Reads the connection: messages go to the inbox (never waiting for local
    delivery), ``subscribe``/``unsubscribe`` replies go to the manager, whose
    completed batches wake the joins waiting on them. On a new connection the
    manager is reset: every held channel is subscribed again in one restore
    batch, and the node counts as subscribed once that batch is confirmed.
subscription writer
    Writes what the manager says (UNSUBSCRIBEs due, then the pending channels
    in multi-channel SUBSCRIBEs, one pipelined write per round) whenever a
    channel becomes pending, a round is confirmed, or a linger is due. Writes on
    the connection (its own, and the listener's PING) are serialized by a lock.
delivery
    Takes envelopes from the inbox in order, applies flow control and hands
    them to the local layer.

The seam for other connection kinds (Redis Cluster shards, SSUBSCRIBE):
:data:`SUBSCRIBE`/:data:`UNSUBSCRIBE` are the commands written and
:meth:`ReceiveLoop._on_reply` the reply kinds read; one manager and one lock
belong to one connection.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import Event

from .. import supervise
from ..errors import BroadcastTimeout
from ..flow import flow
from . import codec
from .redis_loops import CONN_ERRORS, AdapterState, Backoff
from .routing import is_marked, topic_channel
from .subscriptions import Batch

try:
    import redis
    from redis.exceptions import ResponseError
except ImportError:  # pragma: no cover - redis-py is a requirement, but fail clearly without it
    redis = None  # type: ignore[assignment]
    ResponseError = Exception  # type: ignore[assignment,misc]

__all__ = ["ReceiveLoop", "SUBSCRIBE", "UNSUBSCRIBE"]

log = logging.getLogger(__name__)

_monotonic = time.monotonic

#: The commands the subscription writer sends (a sharded connection would send SSUBSCRIBE/SUNSUBSCRIBE).
SUBSCRIBE = b"SUBSCRIBE"
UNSUBSCRIBE = b"UNSUBSCRIBE"
# Reply kinds that carry a message (``smessage``: sharded pub/sub of a Redis Cluster shard).
_MESSAGES = (b"message", b"smessage")


class ReceiveLoop(AdapterState):
    """The listener, the subscription writer and the delivery greenlets (see the module docstring)."""

    if TYPE_CHECKING:  # pragma: no cover
        prefix: str
        _dual: bool

        def _outage_started(self) -> None: ...
        def _outage_over(self) -> None: ...

    # -- routing: what the local layer holds ----------------------------------------------

    def _channel(self, topic: str) -> bytes:
        """The channel broadcasts on ``topic`` are published to (:mod:`phx_gevent.pubsub.routing`)."""
        return self._bchan if self.routing == "broadcast" else topic_channel(self.prefix, topic)

    def interest(self, topic: str) -> None:
        """One more local holder of ``topic``: with topic routing, its channel is subscribed (batched)."""
        if self.routing != "broadcast" and self._subs.acquire(topic_channel(self.prefix, topic)) is not None:
            self._bus_event.set()

    def release(self, topic: str) -> None:
        """One local holder of ``topic`` fewer: the last one unsubscribes its channel after ``linger`` seconds."""
        if self.routing != "broadcast":
            self._subs.release(topic_channel(self.prefix, topic), _monotonic())
            self._bus_event.set()

    def wait_routed(self, topic: str, timeout: float | None = None) -> bool:
        """Wait until Redis confirmed this node's subscription to ``topic``'s channel (see :meth:`Adapter.wait_routed`).

        Returns True at once with broadcast routing or when it is in place;
        False after ``timeout`` (default ``subscribe_timeout``) seconds, or at
        once while the listener cannot reach Redis. Never raises.
        """
        if self.routing == "broadcast":
            return True
        channel = topic_channel(self.prefix, topic)
        subs = self._subs
        batch = subs.acquire(channel)
        try:
            if batch is None:
                return True
            if not self._running or self._sub_down_since is not None:
                return False  # an outage: the join succeeds locally, the subscription follows the reconnection
            return self._wait_batch(batch, self.subscribe_timeout if timeout is None else timeout)
        finally:
            # The caller subscribes right after (no greenlet switch): the linger this starts is cancelled.
            subs.release(channel, _monotonic())

    # -- the listener ---------------------------------------------------------------------

    def _run_listener(self, gen: int) -> None:
        conn = self._sub_conn
        backoff = Backoff(*self.backoff)
        hc = self.health_check_interval
        while self._alive(gen):
            try:
                conn.connect()
                # A new connection holds nothing: every held channel goes out again in one batch.
                self._restore, abandoned = self._subs.reset()
                self._wake(abandoned)
                self._bus_up = True
                self._bus_event.set()
                if not self._restore.remaining:
                    # Nothing to hold on this connection (a cluster shard without channels yet): subscribed.
                    self._sub_recovered()
                while self._alive(gen):
                    if not conn.can_read(timeout=hc):
                        with self._bus_lock:
                            conn.send_command("PING", check_health=False)
                        if not conn.can_read(timeout=self.socket_timeout):
                            raise redis.TimeoutError(f"no answer to PING within {self.socket_timeout}s")
                        continue
                    try:
                        msg = conn.read_response()
                    except ResponseError as exc:
                        self._subscribe_refused(exc)
                        continue
                    if msg[0] in _MESSAGES:
                        self._on_message(msg[1], msg[2])
                    elif self._on_reply(msg[0], msg[1]):
                        self._sub_recovered()
                        backoff.reset()
            except CONN_ERRORS as exc:
                self._bus_lost(conn)
                if not self._alive(gen):
                    return
                self._sub_failed(exc)
                self._stop.wait(backoff.next())
            except Exception:
                supervise.failed("Redis listener")
                self._bus_lost(conn)
                self._stop.wait(backoff.next())

    def _on_reply(self, kind: bytes, channel: bytes) -> bool:
        # A subscription reply; True when it completes the restore batch of this connection.
        if kind == b"subscribe":
            batch = self._subs.confirm(channel)
            if batch is not None:
                self._wake((batch,))
                self._bus_event.set()  # the next round may go now
                return batch is self._restore
        elif kind == b"unsubscribe":
            self._subs.unsubscribed(channel)
        return False

    def _subscribe_refused(self, exc: BaseException) -> None:
        # An error reply on the subscriber connection answers a SUBSCRIBE (or UNSUBSCRIBE): the
        # connection is fine, reconnecting would only repeat it. The rounds in flight give up.
        self._counters["subscribe_errors"] += 1
        batches = self._subs.refused()
        self._wake(batches)
        self._bus_event.set()
        if any(batch is self._restore for batch in batches):
            self._sub_recovered()  # the other channels of the restore round are in place
        log.error(
            "phx_gevent: Redis %s refused a subscription (%s): some topics' broadcasts from other nodes will not "
            "reach this node; an ACL user needs the channels of the prefix (e.g. `&%s:*`)",
            self._where,
            exc,
            self.prefix,
        )

    def _bus_lost(self, conn: Any) -> None:
        self._bus_up = False
        conn.disconnect()
        # Joins waiting for a confirmation stop waiting: they succeed locally.
        self._restore, abandoned = self._subs.reset()
        self._wake(abandoned)

    @staticmethod
    def _wake(batches: Any) -> None:
        for batch in batches:
            waiter = batch.waiter
            if waiter is not None:
                waiter.set()

    def _sub_failed(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        now = _monotonic()
        if self._sub_ok or self._sub_down_since is None:
            self._sub_ok = False
            self._sub_down_since = now
            self._outage_started()
            log.warning(
                "phx_gevent: Redis %s unreachable for receiving (%s); until it is back this process "
                "misses what other nodes publish",
                self._where,
                self._last_error,
            )
            self._log_sub_retry.ready()
        elif self._log_sub_retry.ready() is not None:
            log.warning(
                "phx_gevent: Redis %s still unreachable for receiving after %.0fs (%s)",
                self._where,
                now - self._sub_down_since,
                self._last_error,
            )

    def _sub_recovered(self) -> None:
        if self._sub_down_since is not None:
            log.warning(
                "phx_gevent: Redis %s reachable again for receiving after %.1fs; resubscribed %d channel(s)",
                self._where,
                _monotonic() - self._sub_down_since,
                self._subs.stats()["channels"],
            )
            self._counters["reconnects"] += 1
            self._sub_down_since = None
            # Tell the local layer (in order, through the inbox) to catch up on history topics.
            self._inbox.append(b"")
            self._in_event.set()
        self._sub_ok = True
        self._sub_ready.set()
        self._outage_over()

    # -- the subscription writer ----------------------------------------------------------

    def _run_subscriber(self, gen: int) -> None:
        subs = self._subs
        event = self._bus_event
        while self._alive(gen):
            event.clear()
            now = _monotonic()
            if self._bus_up and subs.has_work(now):
                self._write_subscriptions(subs.take(now))
                continue
            due = subs.next_due()
            wait = self.health_check_interval if due is None else min(self.health_check_interval, due - now)
            event.wait(max(0.0, wait))

    def _write_subscriptions(self, commands: Any) -> None:
        conn = self._sub_conn
        packed = self._subscription_commands(commands)
        try:
            with self._bus_lock:
                if not self._bus_up:
                    return  # lost while waiting for the lock: the listener's reset sends these again
                # One write per round, whatever the number of channels: one round trip.
                conn.send_packed_command(conn.pack_commands(packed), check_health=False)
        except CONN_ERRORS as exc:
            # The listener sees the broken connection too; it resets the manager and reconnects.
            log.debug("phx_gevent: writing subscriptions to Redis failed: %s", exc)
            self._bus_up = False
            conn.disconnect()

    def _subscription_commands(self, commands: Any) -> list[tuple[bytes, ...]]:
        # What a round writes (a Redis Cluster shard writes SSUBSCRIBEs, one per hash slot).
        packed = [(UNSUBSCRIBE, *chs) for chs in commands.unsubscribe]
        packed += [(SUBSCRIBE, *chs) for chs in commands.subscribe]
        return packed

    def _wait_batch(self, batch: Batch, timeout: float) -> bool:
        # Called by a join (wait_routed): wait for the batch's confirmation, bounded.
        if batch.waiter is None:
            batch.waiter = Event()
        self._bus_event.set()
        batch.waiter.wait(timeout)
        return batch.ok

    # -- incoming messages ----------------------------------------------------------------

    def _on_message(self, channel: bytes, data: bytes) -> None:
        # The listener's only work: drop our echo, queue the rest; never wait.
        self._counters["messages"] += 1
        if self._dual and channel == self._bchan and is_marked(data):
            self._counters["dual_dropped"] += 1  # a dual node's copy: this node has it from the topic's channel
            return
        if channel != self._dchan and data.startswith(self._echo) and not data.startswith(self._echo_history):
            self._counters["echo_dropped"] += 1
            return
        if len(self._inbox) >= self.max_inbox or self._inbox_bytes + len(data) > self.max_inbox_bytes:
            self._counters["receive_dropped"] += 1
            suppressed = self._log_drop_in.ready()
            if suppressed is not None:
                log.warning(
                    "phx_gevent: Redis inbox full (%d envelopes, %d bytes): dropped %d envelope(s) from "
                    "other nodes (%d total); local delivery is slower than what arrives",
                    len(self._inbox),
                    self._inbox_bytes,
                    suppressed + 1,
                    self._counters["receive_dropped"],
                )
            return
        self._inbox.append(data)
        self._inbox_bytes += len(data)
        self._in_event.set()

    def _run_delivery(self, gen: int) -> None:
        inbox = self._inbox
        counters = self._counters
        node = self.node_name
        since_yield = 0
        while self._alive(gen):
            if not inbox:
                self._in_event.clear()
                if not inbox:
                    self._in_event.wait(self.health_check_interval)
                since_yield = 0
                continue
            data = inbox.popleft()
            self._inbox_bytes -= len(data)
            if not data:
                receive = self._receive
                if receive is not None:
                    try:
                        receive({"k": "sync", "n": node, "t": "", "e": "", "p": None, "x": None})
                    except Exception:
                        log.exception("phx_gevent: catching up on history topics failed")
                continue
            try:
                envelope = codec.decode(data)
            except Exception as exc:
                # Whatever the data does to the decoder, the next envelope is delivered.
                counters["invalid"] += 1
                if self._log_invalid.ready() is not None:
                    log.warning("phx_gevent: ignored an invalid message from Redis: %s", exc)
                continue
            if envelope["k"] == "b":
                if self.flow_control:
                    try:
                        flow.wait()
                    except BroadcastTimeout:
                        counters["overload_dropped"] += 1
                        suppressed = self._log_overload.ready()
                        if suppressed is not None:
                            log.warning(
                                "phx_gevent: dropped %d broadcast(s) from other nodes: this process stayed "
                                "above its high-water mark (%d total)",
                                suppressed + 1,
                                counters["overload_dropped"],
                            )
                        continue
                    if not self._alive(gen):
                        return
            elif envelope.get("to") != node:
                continue
            counters["received"] += 1
            receive = self._receive
            if receive is not None:
                try:
                    receive(envelope)
                except Exception:
                    counters["delivery_errors"] += 1
                    self._log_delivery.log(
                        log,
                        logging.ERROR,
                        "phx_gevent: delivering an envelope from node %r failed",
                        envelope["n"],
                        exc_info=True,
                    )
            since_yield += 1
            if since_yield >= 64:
                # A burst from Redis must not starve requests and writers.
                since_yield = 0
                gevent.sleep(0)
