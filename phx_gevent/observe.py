"""What metrics, the dashboard and the health probes see: one sampler per endpoint and process.

An :class:`Observer` is created the first time ``endpoint.metrics()``,
``endpoint.dashboard()`` or ``endpoint.health()`` is called. It

* counts the telemetry events of its endpoint (:mod:`phx_gevent.telemetry`):
  connects, joins and refusals, broadcasts and deliveries,
  slow-client drops, overload waits, PubSub outages;
* every ``interval`` seconds (1 s) takes a snapshot of this process: its
  connections by mount and transport, joined channels by route, the busiest
  topics, queued bytes, the PubSub's state and Redis round-trip time,
  presences, and a bounded list of connections (:data:`MAX_CONNECTIONS`);
* when the dashboard is on, publishes the snapshot to the other nodes
  through the PubSub adapter (an internal topic; no local delivery) and
  keeps the latest snapshot of every node it hears from, so any node can
  show the whole cluster. A node not heard from for ``3 * interval + 2``
  seconds is dropped from the view.

The sampler is a greenlet started lazily in the process that serves (the
gunicorn worker starts it after the fork), so a worker with no traffic still
shows up. Its receivers are connected only once an observer exists: an
endpoint without metrics, dashboard or health does no telemetry work.
"""

from __future__ import annotations

import heapq
import logging
import os
import time
import weakref
from collections.abc import Callable
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import gevent
from blinker import ANY
from flask import Response, request

from . import telemetry
from .flow import flow
from .pubsub.local import ALL_EVENTS
from .runtime import process_id

if TYPE_CHECKING:  # pragma: no cover
    from .endpoint import Endpoint

__all__ = ["Observer", "observer_of", "MAX_CONNECTIONS", "TOP_TOPICS", "INTERNAL_TOPICS", "add_view"]

log = logging.getLogger(__name__)

#: Connections listed per node in a snapshot (the busiest first: most channels).
MAX_CONNECTIONS = 200
#: Connections counted by a snapshot between two yields to the hub.
SLICE = 500
_first = itemgetter(0)  # the sort key of (count, ...) tuples: a C call, not a lambda per item
#: Topics listed per node, by local channel subscribers.
TOP_TOPICS = 10
#: Topics whose presences are listed (by number of keys).
TOP_PRESENCE = 20

#: Prefixes of the library's own topics (presence replication, these stats, the dashboard),
#: left out of "top topics" and of the broadcast counts.
INTERNAL_TOPICS = ("phx_presence:", "phx:")


def add_view(endpoint: Endpoint, rule: str, name: str, view: Callable[..., Any], methods: list[str]) -> None:
    """Add a plain HTTP route to the endpoint's blueprint (or to its apps once registered)."""
    if not endpoint.apps:
        endpoint.blueprint.add_url_rule(rule, name, view, methods=methods)
        return
    for app in endpoint.apps:
        app.add_url_rule(rule, f"{endpoint.blueprint.name}.{name}", view, methods=methods)


def allowed(auth: Callable[[Any], Any] | None, default: bool) -> Any:
    """Run ``auth(request)`` inside a request: its (truthy) answer, or ``default`` without ``auth``.

    An ``auth`` that raises refuses (logged).
    """
    if auth is None:
        return default
    try:
        return auth(request)
    except Exception:
        log.exception("phx_gevent: auth callable %r raised; refusing", auth)
        return False


def observer_of(endpoint: Endpoint) -> Observer:
    """The endpoint's observer, created on first use."""
    if endpoint.observer is None:
        endpoint.observer = Observer(endpoint)
    return endpoint.observer


class Observer:
    """Counts an endpoint's events and samples its process every ``interval`` seconds (see module doc)."""

    def __init__(self, endpoint: Endpoint, interval: float = 1.0) -> None:
        self._endpoint = weakref.ref(endpoint)
        self.interval = float(interval)
        #: Cumulative counts of this process (reset by a fork).
        self.counters: dict[str, Any] = {}
        #: The latest snapshot of every node heard from: ``{node: (received at, snapshot)}``.
        self.nodes: dict[str, tuple[float, dict[str, Any]]] = {}
        #: Publish snapshots to the other nodes (the dashboard turns this on).
        self.gossip = False
        #: Called with each new local snapshot (the metrics' gauges).
        self.on_sample: list[Callable[[dict[str, Any]], None]] = []
        self.rtt: float | None = None
        self._pid = 0
        self._greenlet: Any = None
        self._pinger: Any = None
        self._last: tuple[float, dict[str, Any]] | None = None
        self._rates = {"broadcasts": 0.0, "deliveries": 0.0}
        self._receivers: list[tuple[Any, Callable[..., Any]]] = []
        self._handlers: dict[str, Callable[[Any, str], None]] = {}
        self._reset_counters()
        self._connect()

    @property
    def endpoint(self) -> Endpoint:
        endpoint = self._endpoint()
        if endpoint is None:  # pragma: no cover - the endpoint owns its observer
            raise RuntimeError("the endpoint of this observer is gone")
        return endpoint

    @property
    def stats_topic(self) -> str:
        """The internal topic node snapshots travel on."""
        return f"phx:stats:{self.endpoint.name}"

    def _reset_counters(self) -> None:
        self.counters = {
            "connects": 0,
            "connects_refused": 0,
            "joins": 0,
            "joins_refused": 0,
            "broadcasts": 0,
            "deliveries": 0,
            "broadcast_bytes": 0,
            "overload_waits": 0,
            "overload_timeouts": 0,
            "drops": {},
            "pubsub_outages": 0,
            "presence_changes": 0,
        }

    # -- events -------------------------------------------------------------------------

    def _connect(self) -> None:
        # Receivers hold the observer weakly (bound methods): an endpoint that
        # goes away takes its counters with it. Endpoint-specific events are
        # filtered by sender; process-wide ones (flow, drops, Redis) are not.
        endpoint = self.endpoint
        pairs = [
            (telemetry.socket_connected, endpoint, self._on_connected),
            (telemetry.channel_joined, endpoint, self._on_joined),
            (telemetry.broadcast, endpoint.pubsub, self._on_broadcast),
            (telemetry.overload_wait, ANY, self._on_overload_wait),
            (telemetry.overload_timeout, ANY, self._on_overload_timeout),
            (telemetry.slow_client_drop, ANY, self._on_drop),
            (telemetry.pubsub_down, ANY, self._on_pubsub_down),
            (telemetry.presence_change, ANY, self._on_presence),
        ]
        for signal, sender, receiver in pairs:
            signal.connect(receiver, sender=sender)
            self._receivers.append((signal, receiver))

    def close(self) -> None:
        """Disconnect the receivers and stop the sampler."""
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)
        self._receivers = []
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None

    def _on_connected(self, sender: Any, measurements: Any, metadata: Any) -> None:
        self.counters["connects" if metadata["result"] == "ok" else "connects_refused"] += 1

    def _on_joined(self, sender: Any, measurements: Any, metadata: Any) -> None:
        self.counters["joins" if metadata["result"] == "ok" else "joins_refused"] += 1

    def _on_broadcast(self, sender: Any, measurements: Any, metadata: Any) -> None:
        if metadata["topic"].startswith(INTERNAL_TOPICS):
            return  # the library's own traffic (presence replication, these stats) is not the app's
        c = self.counters
        c["broadcasts"] += 1
        c["deliveries"] += measurements["subscribers"]
        c["broadcast_bytes"] += measurements["bytes"] * measurements["subscribers"]

    def _on_overload_wait(self, sender: Any, measurements: Any, metadata: Any) -> None:
        self.counters["overload_waits"] += 1

    def _on_overload_timeout(self, sender: Any, measurements: Any, metadata: Any) -> None:
        self.counters["overload_timeouts"] += 1

    def _on_drop(self, sender: Any, measurements: Any, metadata: Any) -> None:
        drops = self.counters["drops"]
        drops[metadata["reason"]] = drops.get(metadata["reason"], 0) + 1

    def _on_pubsub_down(self, sender: Any, measurements: Any, metadata: Any) -> None:
        adapter = self.endpoint.pubsub.adapter
        # A Redis Cluster's shards report their own outages (sender.cluster is the endpoint's adapter).
        if adapter is not None and (sender is adapter or getattr(sender, "cluster", None) is adapter):
            self.counters["pubsub_outages"] += 1

    def _on_presence(self, sender: Any, measurements: Any, metadata: Any) -> None:
        if getattr(sender, "pubsub", None) is self.endpoint.pubsub:
            self.counters["presence_changes"] += 1

    # -- the sampler --------------------------------------------------------------------

    def ensure_started(self) -> None:
        """Start the sampler in this process (again after a fork; idempotent)."""
        pid = process_id()  # called for every new connection: no getpid() system call each time
        if self._pid == pid and self._greenlet is not None:
            return
        if self._pid != pid and self._pid:
            self._reset_counters()  # a forked worker counts its own events
            self.nodes = {}
            self._last = None
            self._rates = {"broadcasts": 0.0, "deliveries": 0.0}
            self.rtt = None
        self._pid = pid
        endpoint = self.endpoint
        pubsub = endpoint.pubsub
        pubsub.start()
        # A topic subscriber rather than a blinker receiver: a receiver on the
        # PubSub's signal would take every broadcast off its fast path.
        pubsub.subscribe(self.stats_topic, _StatsSubscription(self))
        for name, handler in self._handlers.items():
            pubsub.register(name, handler)
        self._greenlet = gevent.spawn(_run, weakref.ref(self))

    def register(self, name: str, handler: Callable[[Any, str], None]) -> None:
        """Register a node-to-node handler on the PubSub, now and after every (re)start."""
        self._handlers[name] = handler
        self.endpoint.pubsub.register(name, handler)

    def tick(self) -> dict[str, Any]:
        """Take a snapshot now: store it, feed ``on_sample``, publish it when gossiping; returns it."""
        snapshot = self.snapshot()
        node = snapshot["node"]
        self.nodes[node] = (time.monotonic(), snapshot)
        for callback in list(self.on_sample):
            try:
                callback(snapshot)
            except Exception:
                log.exception("phx_gevent: stats callback %r failed", callback)
        pubsub = self.endpoint.pubsub
        if self.gossip and pubsub.adapter is not None:
            try:
                envelope = {"k": "b", "n": node, "t": self.stats_topic, "e": "stats", "p": snapshot, "x": None}
                pubsub.adapter.publish(envelope)
            except Exception:
                log.exception("phx_gevent: could not publish this node's stats")
        self._expire()
        self._ping()
        return snapshot

    def _ping(self) -> None:
        # Redis round-trip time, measured in a greenlet of its own: a slow or
        # absent Redis must not hold up the snapshots that report it.
        adapter = self.endpoint.pubsub.adapter
        ping = getattr(adapter, "ping", None)
        if ping is None or (self._pinger is not None and not self._pinger.dead):
            return

        def run() -> None:
            self.rtt = ping()

        self._pinger = gevent.spawn(run)

    def _on_remote_stats(self, topic: str, *, event: str, payload: Any, from_: Any = None) -> None:
        if event == "stats" and isinstance(payload, dict) and isinstance(payload.get("node"), str):
            if payload["node"] != self.endpoint.node_name:
                self.nodes[payload["node"]] = (time.monotonic(), payload)

    def _expire(self) -> None:
        limit = time.monotonic() - (3 * self.interval + 2.0)
        for name in [n for n, (at, _) in self.nodes.items() if at < limit]:
            del self.nodes[name]

    def cluster(self) -> list[dict[str, Any]]:
        """The latest snapshot of every live node (this one first, then by name)."""
        self._expire()
        me = self.endpoint.node_name
        return sorted((snap for _, snap in self.nodes.values()), key=lambda s: (s["node"] != me, s["node"]))

    def snapshot(self, advance: bool = True) -> dict[str, Any]:
        """This process now, as JSON-compatible data (see the module docstring).

        Rates are per second between the last two sampler ticks;
        ``advance=False`` (an extra snapshot for a scrape or a page) reuses
        the last tick's rates and leaves its reference point alone.
        """
        endpoint = self.endpoint
        pubsub = endpoint.pubsub
        now = time.monotonic()
        counters = {**self.counters, "drops": dict(self.counters["drops"])}
        rates = self._rates
        if advance:
            if self._last is not None and now > self._last[0]:
                span = now - self._last[0]
                rates = {k: max(0.0, (counters[k] - self._last[1][k]) / span) for k in rates}
            self._last, self._rates = (now, counters), rates
        mounts = []
        channels: dict[str, int] = {}
        # The dashboard's list: of the first MAX_CONNECTIONS * 4, only those listed are described.
        conns: list[tuple[int, Any, str]] = []
        cap = MAX_CONNECTIONS * 4 if self.gossip else 0
        total = 0
        for mount in endpoint.mounts:
            per = {"websocket": 0, "longpoll": 0}
            routes: dict[str, int] = {}
            route_of: dict[str, str] = {}
            path = mount.path  # a lean pass, yielding between slices: a broadcast waits for one slice
            for conn in list(mount.connections):
                if total % SLICE == SLICE - 1:
                    gevent.sleep(0)
                name = conn.transport.name
                per[name] = per.get(name, 0) + 1
                topics = conn.channels
                for topic in topics:
                    pattern = route_of.get(topic)
                    if pattern is None:
                        route = mount.handler.route(topic)
                        pattern = route_of[topic] = route.pattern if route is not None else topic
                    routes[pattern] = routes.get(pattern, 0) + 1
                if total < cap:
                    conns.append((len(topics), conn, path))
                total += 1
            for pattern, n in routes.items():
                channels[pattern] = channels.get(pattern, 0) + n
            mounts.append({"path": mount.path, "handler": type(mount.handler).__name__, **per, "channels": routes})
        top = heapq.nlargest(MAX_CONNECTIONS, conns, key=_first)  # keeps the first of equal keys
        listed = [_describe(conn, path, list(conn.channels)) for _, conn, path in top]
        adapter = pubsub.adapter
        bus = {} if adapter is None else adapter.stats()
        return {
            "node": endpoint.node_name,
            "pid": os.getpid(),
            "time": time.time(),
            "interval": self.interval,
            "draining": endpoint.draining,
            "connections": total,
            "mounts": mounts,
            "channels": channels,
            "topics": _top_topics(pubsub),
            "queued_bytes": flow.queued,
            "counters": counters,
            "rates": rates,
            "pubsub": {
                "adapter": None if adapter is None else type(adapter).__name__,
                "connected": pubsub_connected(endpoint),
                "rtt": self.rtt,
                "last_error": bus.get("last_error"),
                # Topic routing: what this node had to read from Redis, and how many channels it holds.
                "routing": bus.get("routing"),
                "messages": bus.get("messages"),
                "subscriptions": bus.get("channels"),
            },
            "presence": _local_presence(pubsub),
            "conns": listed,
        }


class _StatsSubscription:
    """Receives the other nodes' snapshots (every event of the stats topic goes to :meth:`deliver`)."""

    __slots__ = ("observer", "owner", "intercept", "writer")

    def __init__(self, observer: Observer) -> None:
        self.observer = weakref.ref(observer)
        self.owner = self
        self.intercept = ALL_EVENTS
        self.writer = None

    def deliver(self, topic: str, event: str, payload: Any) -> None:
        observer = self.observer()
        if observer is not None:
            observer._on_remote_stats(topic, event=event, payload=payload)


def _run(ref: weakref.ref[Observer]) -> None:
    # The sampler holds its observer weakly: it ends with its endpoint.
    while True:
        observer = ref()
        if observer is None:
            return
        interval = observer.interval
        try:
            observer.tick()
        except Exception:
            log.exception("phx_gevent: taking a stats snapshot failed")
        del observer
        gevent.sleep(interval)


def _describe(conn: Any, path: str, topics: list[str]) -> dict[str, Any]:
    writer = conn.transport.writer
    return {
        "key": f"{id(conn):x}",
        "id": conn.socket.id,
        "mount": path,
        "transport": conn.transport.name,
        "topics": topics[:20],
        "queued": getattr(writer, "qbytes", 0),
    }


def _top_topics(pubsub: Any) -> list[list[Any]]:
    # Channel subscribers only (their writer is a connection's); the socket-id
    # topics and the library's own topics are not "hot topics".
    candidates = heapq.nlargest(
        TOP_TOPICS * 5,
        ((len(t.subs), name, t) for name, t in list(pubsub.topics.items()) if not name.startswith(INTERNAL_TOPICS)),
        key=_first,
    )
    counted = []
    for _, name, t in candidates:
        n = sum(1 for sub in list(t.subs) if getattr(sub, "writer", None) is not None)
        if n:
            counted.append([name, n])
    counted.sort(key=lambda item: (-item[1], item[0]))
    return counted[:TOP_TOPICS]


def _local_presence(pubsub: Any) -> dict[str, dict[str, int]]:
    # Presences tracked by this node, per topic: keys and metas.
    from .presence import trackers

    topics: dict[str, dict[str, int]] = {}
    for tracker in list(trackers):
        if tracker.pubsub is not pubsub:
            continue
        for topic, count in tracker.local_counts().items():
            entry = topics.setdefault(topic, {"keys": 0, "metas": 0})
            entry["keys"] += count.keys
            entry["metas"] += count.metas
    ranked = sorted(topics.items(), key=lambda item: (-item[1]["keys"], item[0]))[:TOP_PRESENCE]
    return dict(ranked)


def cluster_presence(pubsub: Any) -> dict[str, dict[str, Any]]:
    """Who is present per topic on every node, as this node's replicas know it: ``{topic: {count, keys}}``."""
    from .presence import trackers

    topics: dict[str, set[str]] = {}
    for tracker in list(trackers):
        if tracker.pubsub is not pubsub:
            continue
        for topic, keys in tracker.known_keys().items():
            topics.setdefault(topic, set()).update(keys)
    ranked = sorted(topics.items(), key=lambda item: (-len(item[1]), item[0]))[:TOP_PRESENCE]
    return {topic: {"count": len(keys), "keys": sorted(keys)[:50]} for topic, keys in ranked}


def pubsub_connected(endpoint: Endpoint) -> bool:
    """True when the endpoint's PubSub reaches the other nodes (always, without an adapter)."""
    adapter = endpoint.pubsub.adapter
    if adapter is None:
        return True
    return bool(getattr(adapter, "connected", True))


# -- health and readiness ----------------------------------------------------------------


def install_health(endpoint: Endpoint, live: str, ready: str) -> None:
    """Add the liveness and readiness routes (see :meth:`Endpoint.health`)."""

    def health() -> Response:
        return _json({"status": "ok", "node": endpoint.node_name}, 200)

    def readiness() -> Response:
        endpoint.pubsub.start()
        connected = pubsub_connected(endpoint)
        ok = connected and not endpoint.draining
        body = {
            "status": "ready" if ok else "unavailable",
            "node": endpoint.node_name,
            "draining": endpoint.draining,
            "pubsub": connected,
        }
        return _json(body, 200 if ok else 503)

    add_view(endpoint, live, "phx_health", health, ["GET", "HEAD"])
    add_view(endpoint, ready, "phx_ready", readiness, ["GET", "HEAD"])


def _json(body: dict[str, Any], status: int) -> Response:
    from .serializers import dumps

    resp = Response(dumps(body), status=status, mimetype="application/json")
    resp.headers["Cache-Control"] = "no-store"
    return resp
