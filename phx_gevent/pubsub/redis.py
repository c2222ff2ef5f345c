"""The Redis adapter: broadcasts between gunicorn workers and machines over Redis pub/sub.

``Endpoint(app, pubsub="redis://host:6379/0")`` (or ``unix:///path/redis.sock``,
``rediss://...``) builds one. Each process is a node with its own name and
runs four greenlets, started lazily in the process that serves requests:

publisher
    The only path to Redis for outgoing envelopes. :meth:`RedisAdapter.publish`
    encodes the envelope in the caller (so later changes to the payload do not
    leak) and appends it to a bounded queue; the publisher sends what is
    queued in pipelined batches on one connection, in order, each broadcast
    on its topic's channel (:mod:`phx_gevent.pubsub.routing`). Envelopes leave
    the queue only once Redis acknowledged them, so the queue is also the
    replay buffer of an outage. (:mod:`phx_gevent.pubsub.redis_loops`)
listener and subscription writer
    One subscribed connection: this node's direct channel, and the channels
    of the topics with local subscribers (topic routing, reference-counted
    and batched by :mod:`phx_gevent.pubsub.subscriptions`) or the one
    broadcast channel (broadcast routing). The listener drops this node's own
    echo by the sender name at the front of each message and appends the rest
    to a bounded inbox; it never waits for local delivery, so Redis never
    disconnects it for a full output buffer. (:mod:`phx_gevent.pubsub.redis_receive`)
delivery
    Takes envelopes from the inbox in order, waits while the process is above
    its high-water mark (:mod:`phx_gevent.flow`; a broadcast still blocked
    after ``broadcast_timeout`` is dropped and counted) and hands them to the
    local PubSub layer.

Redis outages: local delivery is not affected (the local layer delivers
before the adapter sees the envelope). Publishing never waits for Redis: it
queues. The publisher and the listener reconnect with exponential backoff and
jitter; the listener resubscribes every held channel in one round. After a reconnection the publisher waits
(at most ``replay_wait`` seconds) until as many nodes are subscribed as before
the outage, then sends what was queued during the outage, dropping what is
older than ``replay_window`` seconds (direct node-to-node messages: older
than ``direct_ttl``, as they answer requests that time out). Envelopes that could not be kept
(queue full) or that expired are counted and logged. Envelopes other nodes
published while *this* node's listener was disconnected are lost: Redis
pub/sub keeps nothing. An envelope whose PUBLISH was written but not
acknowledged when the connection broke is sent again: rarely (Redis had
processed it), subscribers see it twice.

A process that ends does not lose what is queued in silence:
:meth:`RedisAdapter.stop` (``Endpoint.close()``, the gunicorn worker at
shutdown, and interpreter exit for an adapter still running) sends it first,
for at most ``close_timeout`` seconds, and logs how many it had to drop.
Processes that do not serve use :class:`phx_gevent.Emitter` instead, whose
calls return only once Redis accepted the message.

The adapter needs gevent's monkey-patching (the app's first line, or the
gunicorn worker); the library never patches. Protect Redis itself (network,
password, ACL): a client that can publish on the prefix's channels can make
every node deliver messages to its clients (never run code: the format is
JSON, see :mod:`phx_gevent.pubsub.codec`).
"""

from __future__ import annotations

import functools
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from gevent.event import Event
from gevent.lock import BoundedSemaphore

from .. import supervise
from . import codec, redis_connect
from .base import Adapter, make_node_name
from .outbox import Outbox
from .redis_appends import HistoryAppends
from .redis_lifecycle import NOT_PATCHED_MESSAGE, Lifecycle, after_fork, register_exit_flush
from .redis_loops import PublishLoop
from .redis_receive import ReceiveLoop
from .routing import broadcast_channel, check_routing, direct_channel, direct_prefix, mark, nodes_channel, split_routing
from .subscriptions import SubscriptionManager

try:
    import redis
except ImportError:  # pragma: no cover - redis-py is a requirement, but fail clearly without it
    redis = None  # type: ignore[assignment]

__all__ = ["NOT_PATCHED_MESSAGE", "RedisAdapter"]

log = logging.getLogger(__name__)

_monotonic = time.monotonic


class RedisAdapter(Lifecycle, HistoryAppends, PublishLoop, ReceiveLoop, Adapter):
    """Carries envelopes between nodes over Redis pub/sub (see the module docstring).

    ``url``
        ``redis://[user:password@]host:port/db``, ``rediss://...`` or
        ``unix:///path/to/redis.sock?db=0``. Raises ``ValueError`` when it
        cannot be parsed; nothing connects before :meth:`start`.
    ``prefix``
        Channel prefix (``<prefix>:t:{<topic>}`` or ``<prefix>:b`` for
        broadcasts, ``<prefix>:d:<node>`` for direct messages), so several
        apps can share one Redis.
    ``routing``
        ``"topic"`` (default): a node subscribes to the channels of the topics
        it has local subscribers for and receives only their broadcasts;
        ``"broadcast"``: every node receives every broadcast on one channel;
        ``"dual"``: both, to switch a running cluster with rolling restarts
        (broadcast -> dual -> topic; :mod:`phx_gevent.pubsub.routing`).
        Nodes hear each other within one step of that order
        (docs/redis-envelope.md). Also read from the URL's ``routing=``
        query parameter. Raises ``ValueError`` for another value.
    ``subscribe_timeout``
        Seconds a join waits for Redis to confirm the subscription to its
        topic's channel (topic routing), so that a broadcast published after
        the join reply reaches it; the join goes on without it after that,
        and at once while Redis is unreachable.
    ``linger``
        Seconds a topic's channel stays subscribed after its last local
        subscriber left (a quick rejoin costs no UNSUBSCRIBE/SUBSCRIBE).
    ``subscribe_chunk``
        Channels per SUBSCRIBE command; the channels of one round are all
        written at once.
    ``node_name``
        Default: :func:`~phx_gevent.pubsub.base.make_node_name`, renewed in a
        forked child.
    ``max_pending``, ``max_pending_bytes``
        Bounds of the outgoing queue (messages, encoded bytes). When it is
        full, :meth:`publish` waits up to ``publish_timeout`` seconds while
        Redis is connected, then drops the oldest queued envelope (counted).
    ``replay_window``, ``replay_wait``
        After an outage, queued envelopes older than ``replay_window``
        seconds are dropped (counted); the rest are sent once as many nodes
        are subscribed as before (waiting at most ``replay_wait`` seconds).
    ``direct_ttl``
        Direct (node-to-node) messages are requests with short timeouts of
        their own: one not written to Redis within this many seconds is
        dropped (counted in ``publish_expired``), never replayed late.
    ``max_inbox``, ``max_inbox_bytes``
        Bounds of the incoming queue; beyond them received envelopes are
        dropped (counted, logged).
    ``flow_control``
        Remote broadcasts wait for the process's high-water mark like local
        ones (default ``True``).
    ``socket_timeout``, ``connect_timeout``, ``health_check_interval``
        Seconds. The listener sends PING after ``health_check_interval``
        seconds of silence and reconnects without an answer.
    ``backoff``
        ``(first, max)`` reconnection delays in seconds.
    ``batch_size``
        Envelopes per pipelined batch.
    ``close_timeout``
        Seconds :meth:`stop` (``Endpoint.close()``, and interpreter exit)
        keeps sending what is queued before it drops the rest.
    Other keyword arguments go to redis-py's connection (``password``,
    ``ssl_ca_certs``, ...). The RESP2 protocol is always used.
    """

    #: :func:`~phx_gevent.serve` refuses to start unpatched with such an adapter.
    requires_monkey_patching = True

    def __init__(
        self,
        url: str | Sequence[Any] | redis_connect.RedisTarget,
        prefix: str = "phx",
        *,
        routing: str | None = None,
        subscribe_timeout: float = 5.0,
        linger: float = 1.0,
        subscribe_chunk: int = 1000,
        node_name: str | None = None,
        max_pending: int = 10_000,
        max_pending_bytes: int = 16 * 1024 * 1024,
        publish_timeout: float = 0.5,
        replay_window: float = 10.0,
        replay_wait: float = 5.0,
        direct_ttl: float = 1.0,
        max_inbox: int = 10_000,
        max_inbox_bytes: int = 32 * 1024 * 1024,
        flow_control: bool = True,
        socket_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        health_check_interval: float = 5.0,
        backoff: tuple[float, float] = (0.1, 2.0),
        batch_size: int = 256,
        close_timeout: float = 5.0,
        **redis_kwargs: Any,
    ) -> None:
        if redis is None:  # pragma: no cover
            raise ImportError("RedisAdapter needs redis-py: pip install redis")
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ValueError(f"prefix must be a non-empty string without spaces, got {prefix!r}")
        if node_name is not None and (not node_name or "\n" in node_name):
            raise ValueError(f"node_name must be a non-empty string without newlines, got {node_name!r}")
        for name, value in (
            ("max_pending", max_pending),
            ("max_pending_bytes", max_pending_bytes),
            ("max_inbox", max_inbox),
            ("max_inbox_bytes", max_inbox_bytes),
            ("batch_size", batch_size),
        ):
            if int(value) <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if isinstance(url, str):
            url, self.routing = split_routing(url, routing)
        else:
            self.routing = check_routing(routing or "topic")
        if subscribe_timeout < 0 or linger < 0:
            raise ValueError(f"subscribe_timeout and linger are seconds >= 0, got {subscribe_timeout!r}, {linger!r}")
        if int(subscribe_chunk) < 1:
            raise ValueError(f"subscribe_chunk must be at least 1 channel, got {subscribe_chunk!r}")
        self.subscribe_timeout = float(subscribe_timeout)
        # Pure bookkeeping of the subscriber connection (subscriptions.py); kept across a fork.
        self._subs = SubscriptionManager(linger, subscribe_chunk)
        self._fixed: tuple[bytes, ...] = ()
        if backoff[0] <= 0 or backoff[1] < backoff[0]:
            raise ValueError(f"backoff must be (first, max) with 0 < first <= max, got {backoff!r}")
        self.url = url
        self.prefix = prefix
        self._node_auto = node_name is None
        self.node_name = node_name or make_node_name()
        self.max_pending = int(max_pending)
        self.max_pending_bytes = int(max_pending_bytes)
        self.publish_timeout = float(publish_timeout)
        self.replay_window = float(replay_window)
        self.replay_wait = float(replay_wait)
        self.direct_ttl = float(direct_ttl)
        self.max_inbox = int(max_inbox)
        self.max_inbox_bytes = int(max_inbox_bytes)
        self.flow_control = bool(flow_control)
        self.socket_timeout = float(socket_timeout)
        self.health_check_interval = float(health_check_interval)
        self.backoff = (float(backoff[0]), float(backoff[1]))
        self.batch_size = int(batch_size)
        self.close_timeout = float(close_timeout)
        #: Called with the plain message of a history broadcast that could not be
        #: appended (Redis down, refused, dropped): the local layer delivers it
        #: without an offset. Set by the PubSub.
        self.on_history_fallback: Callable[[bytes], None] | None = None
        redis_kwargs.setdefault("socket_timeout", self.socket_timeout)
        redis_kwargs.setdefault("socket_connect_timeout", float(connect_timeout))
        redis_kwargs["protocol"] = 2
        # Parses the URL now, so a bad one fails at configuration time; connects nothing.
        #: Where Redis is (:mod:`phx_gevent.pubsub.redis_connect`): one server or a Sentinel-managed primary.
        self.target = redis_connect.target(url, **redis_kwargs)
        if self.target.kind == "cluster":
            raise ValueError(
                "RedisAdapter serves one Redis (or a Sentinel primary); for a Redis Cluster use "
                "phx_gevent.pubsub.redis_cluster.RedisClusterAdapter, or redis_adapter(url) to pick by URL"
            )
        self._pool = self.target.pool()
        self._where = self.target.describe()

        self._receive: Callable[[dict[str, Any]], None] | None = None
        self._running = False
        self._gen = 0
        self._greenlets: list[Any] = []
        self._stop = Event()
        self._pub_conn: Any = None
        self._sub_conn: Any = None
        self._stale: list[Any] = []
        self._ping_conn: Any = None
        self._ping_pid = 0
        self._owner_pid = os.getpid()
        self._reset_state()
        os.register_at_fork(after_in_child=functools.partial(after_fork, weakref.ref(self)))

    supports_history = True

    def _reset_state(self) -> None:
        node = self.node_name
        # Topics whose history missed a message (delivered without offset): a
        # new epoch is started before their next append, so no recovery spans the gap.
        self._gaps: dict[str, Any] = {}
        self._append_sha: bytes | None = None
        self._reload_scripts = False
        # Set once the listener is first subscribed: history broadcasts reach this
        # node through Redis, so the first ones wait for it (bounded).
        self._sub_ready = Event()
        prefix = self.prefix
        self._dual = self.routing == "dual"
        # Topic routing: <prefix>:n is only counted (PUBSUB NUMSUB), never published to.
        self._bchan = nodes_channel(prefix) if self.routing == "topic" else broadcast_channel(prefix)
        self._dprefix = direct_prefix(prefix)
        self._dchan = direct_channel(prefix, node)
        # The channels held for the adapter's life; a forked child has a new direct channel.
        now = _monotonic()
        for channel in self._fixed:
            self._subs.release(channel, now)
        self._fixed = self._fixed_channels()
        for channel in self._fixed:
            self._subs.acquire(channel)
        # Subscribed last on a new connection: once other nodes count it, the rest is in place.
        self._subs.tail = self._bchan if self._bchan in self._fixed else None
        self._restore = self._subs.reset()[0]
        self._bus_event = Event()
        self._bus_lock = BoundedSemaphore(1)
        self._bus_up = False
        self._echo = codec.echo_prefix(node)
        # Our own history messages come back (the script publishes them): keep those.
        self._echo_history = self._echo + b'{"o":"'
        # Outgoing: queued, then in flight (written, not yet acknowledged); its rules are pure (outbox.py).
        self._out = Outbox(self.max_pending, self.max_pending_bytes, self._dprefix)
        self._out_event = Event()
        self._space = Event()
        self._inbox: deque[bytes] = deque()
        self._inbox_bytes = 0
        self._in_event = Event()
        self._pub_ok = False
        self._sub_ok = False
        self._pub_down_since: float | None = None
        self._sub_down_since: float | None = None
        self._in_outage = False
        self._outage_began = 0.0
        self._subscribers_seen = 0
        self._nodes_high = 0
        self._nodes_high_at = 0.0
        self._probed = 0.0
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "published",
                "publish_dropped",
                "publish_expired",
                "publish_errors",
                "replayed",
                "resent",
                "direct_unrouted",
                "received",
                "messages",
                "subscribe_errors",
                "echo_dropped",
                "dual_dropped",
                "receive_dropped",
                "overload_dropped",
                "invalid",
                "delivery_errors",
                "restarts",
                "outages",
                "reconnects",
            ),
            0,
        )
        self._last_error: str | None = None
        self._log_drop_out = supervise.LogLimiter(10.0)
        self._log_expired = supervise.LogLimiter(10.0)
        self._expired_unlogged = 0
        self._log_drop_in = supervise.LogLimiter(10.0)
        self._log_overload = supervise.LogLimiter(10.0)
        self._log_invalid = supervise.LogLimiter(10.0)
        self._log_delivery = supervise.LogLimiter(10.0)
        self._log_pub_retry = supervise.LogLimiter(30.0)
        self._log_sub_retry = supervise.LogLimiter(30.0)

    def __repr__(self) -> str:
        return f"<RedisAdapter {self._where} prefix={self.prefix!r} node={self.node_name!r}>"

    def _fixed_channels(self) -> tuple[bytes, ...]:
        # The channels this connection holds for the adapter's life (a cluster shard: its own).
        return (self._dchan, self._bchan)

    # -- Adapter interface ----------------------------------------------------------------

    def start(self, receive: Callable[[dict[str, Any]], None]) -> None:
        """Connect and begin forwarding and receiving (greenlets in this process; idempotent).

        Never raises because Redis is down: the greenlets retry with backoff.
        Raises :class:`~phx_gevent.errors.NotMonkeyPatchedError` in a process
        that gevent has not monkey-patched (the message names the fix).
        """
        self._receive = receive
        if self._running:
            self.ensure_started()
            return
        self._check_patched()
        self._cleanup_stale()
        self._gen += 1
        gen = self._gen
        self._running = True
        self._owner_pid = os.getpid()
        self._stop = Event()
        self._pub_conn = self._connection("pub")
        self._sub_conn = self._connection("sub")
        register_exit_flush(self)
        # Supervised: a greenlet that dies anyway (a bug) is restarted and
        # counted (``stats()["restarts"]``), never left dead behind a
        # "connected" adapter.
        alive = partial(self._alive, gen)
        self._greenlets = [
            supervise.spawn("Redis publisher", self._supervised, self._run_publisher, gen, alive=alive),
            supervise.spawn("Redis listener", self._supervised, self._run_listener, gen, alive=alive),
            supervise.spawn("Redis delivery", self._supervised, self._run_delivery, gen, alive=alive),
            supervise.spawn("Redis subscriptions", self._supervised, self._run_subscriber, gen, alive=alive),
        ]
        log.debug("phx_gevent: Redis adapter %r started", self)

    def _supervised(self, run: Callable[[int], None], gen: int) -> None:
        try:
            run(gen)
        except Exception:
            self._counters["restarts"] += 1
            raise

    def ensure_started(self) -> None:
        """Restart in a forked child an adapter that was started in its parent."""
        if self._receive is not None and (not self._running or self._owner_pid != os.getpid()):
            self._running = False
            self.start(self._receive)

    def publish(self, envelope: dict[str, Any]) -> None:
        """Queue ``envelope`` for the other nodes; never waits for Redis.

        Raises ``TypeError``/``OverflowError`` when the payload cannot be
        encoded (nothing is queued). When the queue is full it waits up to
        ``publish_timeout`` seconds (only while Redis is connected), then
        drops the oldest queued envelope.
        """
        if self._owner_pid != os.getpid():
            self.ensure_started()
        data = codec.encode(envelope, self.node_name)
        channel = self._channel(envelope["t"]) if envelope["k"] == "b" else self._dprefix + envelope["to"].encode()
        size = len(data)
        if size > self.max_pending_bytes:
            self._counters["publish_errors"] += 1
            log.error("phx_gevent: dropped a %d-byte envelope for %r: larger than max_pending_bytes", size, channel)
            return
        if self._out.full(size) and not self._make_room(size):
            return
        now = _monotonic()
        self._out.add((now, channel, data))
        if self.routing == "dual" and envelope["k"] == "b":
            # The copy for nodes still on broadcast routing (dual nodes drop it: they have the first).
            marked = mark(data)
            if not self._out.full(len(marked)) or self._make_room(len(marked)):
                self._out.add((now, self._bchan, marked))
        self._out_event.set()

    @property
    def connected(self) -> bool:
        """True while the listener is subscribed and the publisher has no known connection problem."""
        return self._sub_ok and self._pub_down_since is None

    def stats(self) -> dict[str, Any]:
        """Counters: ``published``, ``received``, the drops by cause, outages, the queues' sizes.

        ``publish_dropped`` (queue full or stopped), ``publish_expired``
        (older than ``replay_window``, or ``direct_ttl`` for direct
        messages, when they could be sent), ``publish_errors``
        (refused by Redis or too large), ``replayed`` (sent after an outage),
        ``resent`` (written but unacknowledged when a connection broke, sent
        again), ``direct_unrouted`` (direct messages no node was subscribed
        for), ``echo_dropped`` (own messages coming back), ``receive_dropped``
        (inbox full), ``overload_dropped`` (remote broadcasts dropped by
        flow control), ``invalid`` (undecodable messages), ``subscribers``
        (nodes subscribed at the last broadcast).

        ``messages`` counts every message read from Redis (echoes and
        invalid ones included: what this node had to receive), ``received``
        the envelopes handed to the local layer. ``channels`` (subscriptions
        Redis confirmed), ``channels_held`` (channels wanted), ``channels_pending``
        (waiting to be sent), ``subscribe_commands``, ``unsubscribe_commands``
        and ``subscribe_rounds`` (pipelined writes of SUBSCRIBEs) describe the
        subscriber connection; ``routing`` is the routing.
        """
        subs = self._subs.stats()
        return {
            **self._counters,
            "routing": self.routing,
            "channels": subs["active"],
            "channels_held": subs["channels"],
            "channels_pending": subs["pending"],
            "subscribe_commands": subs["subscribe_commands"],
            "unsubscribe_commands": subs["unsubscribe_commands"],
            "subscribe_rounds": subs["rounds"],
            "node": self.node_name,
            "connected": self.connected,
            "publisher_connected": self._pub_ok,
            "listener_connected": self._sub_ok,
            "publish_pending": len(self._out),
            "publish_pending_bytes": self._out.pending_bytes,
            "receive_pending": len(self._inbox),
            "subscribers": self._subscribers_seen,
            "last_error": self._last_error,
        }

    # -- process lifecycle ----------------------------------------------------------------

    def _alive(self, gen: int) -> bool:
        return self._running and gen == self._gen
