"""Prometheus metrics fed by the telemetry events: ``endpoint.metrics("/metrics")``.

Needs ``prometheus_client`` (``pip install phx_gevent[metrics]``).

Counters and the histogram are updated by telemetry receivers as events
happen (connects and joins are counted in the process and added to their
counters with each sample: at most a second later, and always before a
scrape is answered); gauges (connections, channels, queued bytes, PubSub state) are set
from the endpoint's sampler (:mod:`phx_gevent.observe`) every second and
again when a scrape arrives.

Several processes (gunicorn workers): set ``PROMETHEUS_MULTIPROC_DIR`` to an
empty directory writable by every worker **before** the app starts (and wipe
it when gunicorn starts). prometheus_client then keeps each worker's values
in files there, and a scrape served by any worker adds up every worker's
figures: counters and the histogram are summed, gauges too over the live
workers (``livesum``; ``phx_pubsub_connected`` is the minimum, the RTT the
maximum). The gunicorn worker marks itself dead when it exits cleanly; add
``child_exit`` to your gunicorn config so that a killed worker is too::

    from prometheus_client import multiprocess
    def child_exit(server, worker):
        multiprocess.mark_process_dead(worker.pid)

Without the variable the figures are this process's only. Several machines:
scrape each one (Prometheus adds them up); figures are per machine.

Labels never include topics or socket ids (unbounded); only mount paths,
transports, route patterns, channel classes and drop reasons.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from blinker import ANY
from flask import Response

from . import telemetry
from .observe import INTERNAL_TOPICS, add_view, allowed, observer_of

if TYPE_CHECKING:  # pragma: no cover
    from .endpoint import Endpoint

__all__ = ["install", "multiprocess_mode", "mark_process_dead", "HANDLE_IN_BUCKETS"]

log = logging.getLogger(__name__)

#: Buckets of ``phx_channel_handle_in_seconds``.
HANDLE_IN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


def multiprocess_mode() -> bool:
    """True when ``PROMETHEUS_MULTIPROC_DIR`` is set (figures of every worker of this machine)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))


class _Metrics:
    """The process's metric objects (created once: prometheus_client forbids duplicates)."""

    def __init__(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:  # pragma: no cover - an optional dependency
            raise ImportError("endpoint.metrics() needs prometheus_client: pip install 'phx_gevent[metrics]'") from exc
        self.prom = prom
        self.registry = prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = prom.Gauge(
            "phx_connections",
            "Open connections",
            ["mount", "transport"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.channels = prom.Gauge(
            "phx_channels", "Joined channels", ["route"], registry=r, multiprocess_mode="livesum"
        )
        self.queued = prom.Gauge(
            "phx_queued_bytes", "Bytes waiting in connections' output queues", registry=r, multiprocess_mode="livesum"
        )
        self.pubsub_connected = prom.Gauge(
            "phx_pubsub_connected",
            "1 when the PubSub adapter reaches the other nodes (no adapter: 1)",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.pubsub_rtt = prom.Gauge(
            "phx_pubsub_rtt_seconds",
            "Round-trip time of a PING to Redis",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.presences = prom.Gauge(
            "phx_presences", "Presences (metas) tracked by this node", registry=r, multiprocess_mode="livesum"
        )
        self.connects = prom.Counter(
            "phx_socket_connects", "Connection attempts answered", ["transport", "result"], registry=r
        )
        self.joins = prom.Counter("phx_channel_joins", "Channel joins answered", ["route", "result"], registry=r)
        self.handle_in = prom.Histogram(
            "phx_channel_handle_in_seconds",
            "Time spent in handle_in",
            ["channel"],
            buckets=HANDLE_IN_BUCKETS,
            registry=r,
        )
        self.broadcasts = prom.Counter("phx_broadcasts", "Broadcasts dispatched on this node", registry=r)
        self.deliveries = prom.Counter("phx_deliveries", "Broadcast deliveries to subscribers", registry=r)
        self.broadcast_bytes = prom.Counter(
            "phx_broadcast_bytes", "Bytes of broadcast frames handed to connections", registry=r
        )
        self.drops = prom.Counter(
            "phx_slow_client_drops", "Connections dropped as slow clients", ["reason", "transport"], registry=r
        )
        self.overload_waits = prom.Counter(
            "phx_overload_waits", "Broadcasts that waited for queues to drain", registry=r
        )
        self.overload_timeouts = prom.Counter(
            "phx_overload_timeouts", "Broadcasts that gave up (BroadcastTimeout)", registry=r
        )
        self.outages = prom.Counter("phx_pubsub_outages", "PubSub adapter outages", registry=r)
        self.drained = prom.Counter("phx_socket_drained", "Connections drained at shutdown", registry=r)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        #: Connects (by transport and result) and joins (by route and result) not yet flushed.
        self._connects: dict[tuple[str, str], int] = {}
        self._joins: dict[tuple[str, str], int] = {}
        self.seen_routes: set[str] = set()
        self.seen_mounts: set[tuple[str, str]] = set()
        self._connect()

    def _connect(self) -> None:
        # Module-level metric objects, receivers held strongly: every endpoint of the process feeds them.
        pairs: list[tuple[Any, Callable[..., Any]]] = [
            (telemetry.socket_connected, self._on_connected),
            (telemetry.channel_joined, self._on_joined),
            (telemetry.channel_handled_in, self._on_handled_in),
            (telemetry.broadcast, self._on_broadcast),
            (telemetry.overload_wait, lambda s, measurements, metadata: self.overload_waits.inc()),
            (telemetry.overload_timeout, lambda s, measurements, metadata: self.overload_timeouts.inc()),
            (telemetry.slow_client_drop, self._on_drop),
            (telemetry.pubsub_down, lambda s, measurements, metadata: self.outages.inc()),
            (telemetry.socket_drain, lambda s, measurements, metadata: self.drained.inc(measurements["count"])),
        ]
        for signal, receiver in pairs:
            signal.connect(receiver, sender=ANY, weak=False)

    def _child(self, metric: Any, *labels: str) -> Any:
        # labels() takes a lock and builds a key on every call: keep each labelled child.
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _on_connected(self, sender: Any, measurements: Any, metadata: Any) -> None:
        # Counted here, added to the Prometheus counter at the next sample (a second at most, and
        # before every scrape): prometheus_client takes a lock per increment, and a reconnect
        # storm makes tens of thousands of connects and joins a second.
        key = (metadata["transport"], metadata["result"])
        counts = self._connects
        counts[key] = counts.get(key, 0) + 1

    def _on_joined(self, sender: Any, measurements: Any, metadata: Any) -> None:
        key = (metadata["route"], metadata["result"])
        counts = self._joins
        counts[key] = counts.get(key, 0) + 1

    def flush(self) -> None:
        """Add the connects and joins counted since the last flush to their Prometheus counters."""
        for metric, counts in ((self.connects, self._connects), (self.joins, self._joins)):
            if counts:
                pending = list(counts.items())
                counts.clear()
                for labels, n in pending:
                    self._child(metric, *labels).inc(n)

    def _on_handled_in(self, sender: Any, measurements: Any, metadata: Any) -> None:
        self._child(self.handle_in, metadata["channel"]).observe(measurements["duration"])

    def _on_broadcast(self, sender: Any, measurements: Any, metadata: Any) -> None:
        if metadata["topic"].startswith(INTERNAL_TOPICS):
            return  # presence replication and the dashboard's stats are not the app's broadcasts
        n = measurements["subscribers"]
        self.broadcasts.inc()
        if n:
            self.deliveries.inc(n)
            self.broadcast_bytes.inc(n * measurements["bytes"])

    def _on_drop(self, sender: Any, measurements: Any, metadata: Any) -> None:
        self._child(self.drops, metadata["reason"], metadata["transport"]).inc()

    def sample(self, snapshot: dict[str, Any]) -> None:
        """Set the gauges from a sampler snapshot (:meth:`phx_gevent.observe.Observer.snapshot`)."""
        # Once a second and on every scrape: the labelled children are kept (_child), not looked up.
        self.flush()
        mounts = set()
        for mount in snapshot["mounts"]:
            for transport in ("websocket", "longpoll"):
                mounts.add((mount["path"], transport))
                self._child(self.connections, mount["path"], transport).set(mount.get(transport, 0))
        for gone in self.seen_mounts - mounts:
            self._child(self.connections, *gone).set(0)
        self.seen_mounts |= mounts
        routes = snapshot["channels"]
        for route, n in routes.items():
            self._child(self.channels, route).set(n)
        for gone_route in self.seen_routes - set(routes):
            self._child(self.channels, gone_route).set(0)
        self.seen_routes |= set(routes)
        self.queued.set(snapshot["queued_bytes"])
        self.pubsub_connected.set(1 if snapshot["pubsub"]["connected"] else 0)
        rtt = snapshot["pubsub"]["rtt"]
        if rtt is not None:
            self.pubsub_rtt.set(rtt)
        self.presences.set(sum(entry["metas"] for entry in snapshot["presence"].values()))

    def exposition(self) -> bytes:
        """The text format of every metric (all workers' in multiprocess mode)."""
        prom = self.prom
        if multiprocess_mode():
            from prometheus_client import multiprocess

            registry = prom.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return prom.generate_latest(registry)
        return prom.generate_latest(self.registry)


_metrics: _Metrics | None = None


def metrics() -> _Metrics:
    """The process's metric objects, created (and fed) on first use."""
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


def install(endpoint: Endpoint, path: str, auth: Callable[[Any], Any] | None) -> None:
    """Serve the exposition at ``path`` (see :meth:`Endpoint.metrics`)."""
    m = metrics()
    observer = observer_of(endpoint)
    observer.on_sample.append(m.sample)

    def view() -> Response:
        if not allowed(auth, True):
            return Response("forbidden", status=403, mimetype="text/plain")
        observer.ensure_started()
        m.sample(observer.snapshot(advance=False))
        return Response(m.exposition(), mimetype=m.prom.CONTENT_TYPE_LATEST)

    add_view(endpoint, path, "phx_metrics", view, ["GET"])


def mark_process_dead() -> None:
    """In multiprocess mode, write out the counts not yet flushed and drop this process's live gauges (at exit)."""
    if _metrics is None or "prometheus_client" not in sys.modules or not multiprocess_mode():
        return
    try:
        _metrics.flush()  # the connects and joins of the last second: counters outlive their process
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())
    except Exception:
        log.exception("phx_gevent: marking this process dead for prometheus_client failed")
