"""Telemetry: blinker signals for what the server does, named after Phoenix's telemetry events.

Connect a receiver to a signal to observe it::

    from phx_gevent import telemetry

    @telemetry.channel_joined.connect
    def on_join(sender, measurements, metadata):
        print(metadata["topic"], metadata["result"], measurements["duration"])

Every signal is sent as ``signal.send(sender, measurements=..., metadata=...)``:
``measurements`` holds numbers, ``metadata`` describes what happened. Durations
are **seconds** (``float``, from :func:`time.perf_counter`): Python's native
unit, where Phoenix uses Erlang's native time unit. docs/observability.md has
the full table of events, senders, measurements and metadata.

A receiver runs synchronously in the greenlet that emits (a channel greenlet,
a connection's reader, the fan-out): keep it short and never block. A receiver
that raises is logged and does not affect the server or the other receivers.
blinker holds receivers weakly by default: connect closures and bound
methods with ``weak=False``, or they vanish with their last reference.

Cost: every emitting site is guarded by ``if signal.receivers:``, one dict
truth test, so a server nobody observes does no telemetry work at all, and
broadcasts emit once per broadcast, never per subscriber.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from blinker import NamedSignal, Namespace

__all__ = [
    "namespace",
    "socket_connected",
    "channel_joined",
    "channel_handled_in",
    "socket_drain",
    "broadcast",
    "overload_wait",
    "overload_timeout",
    "slow_client_drop",
    "pubsub_down",
    "pubsub_up",
    "presence_change",
    "emit",
    "format_duration",
]

log = logging.getLogger(__name__)

#: The namespace of every phx_gevent signal (``namespace.signal(name)`` returns the same object).
namespace = Namespace()

#: A connection attempt was answered (accepted or refused). Sender: the :class:`~phx_gevent.Endpoint`.
#: measurements ``duration`` (s, the ``connect`` callback and ``id``); metadata ``endpoint``,
#: ``mount`` (path), ``handler`` (class name), ``transport``, ``serializer`` (``vsn``),
#: ``result`` (``"ok"``/``"error"``), ``socket_id``, ``params`` (the param names, not values).
socket_connected: NamedSignal = namespace.signal("phoenix.socket_connected")

#: A ``phx_join`` was answered. Sender: the Endpoint. measurements ``duration`` (s, from the
#: ``phx_join`` to its reply); metadata ``topic``, ``route`` (pattern), ``channel`` (class name),
#: ``result`` (``"ok"``, ``"error"``), ``socket`` (the channel's socket struct).
channel_joined: NamedSignal = namespace.signal("phoenix.channel_joined")

#: ``handle_in`` returned. Sender: the Endpoint. measurements ``duration`` (s); metadata
#: ``event``, ``topic``, ``channel`` (class name), ``ref``, ``socket``.
channel_handled_in: NamedSignal = namespace.signal("phoenix.channel_handled_in")

#: One batch of a shutdown drain was told to reconnect (close 1012). Sender: the Endpoint.
#: measurements ``count`` (this batch), ``total`` (connections when the drain began),
#: ``index`` (0-based batch), ``rounds`` (batches planned); metadata ``mount``, ``interval`` (s).
socket_drain: NamedSignal = namespace.signal("phoenix.socket_drain")

#: A broadcast was handed to this node's subscribers (once per broadcast, local or from
#: another node). Sender: the :class:`~phx_gevent.pubsub.PubSub`. measurements
#: ``subscribers`` (deliveries made), ``bytes`` (size of one encoded frame, 0 when nobody
#: was reached by the fastlane); metadata ``topic``, ``event``, ``node``.
broadcast: NamedSignal = namespace.signal("phx_gevent.broadcast")

#: A broadcaster waited for the queues to drain below the low-water mark. Sender: the
#: :class:`~phx_gevent.flow.FlowControl`. measurements ``duration`` (s), ``queued`` (bytes
#: when the wait began); metadata ``high_water``.
overload_wait: NamedSignal = namespace.signal("phx_gevent.overload_wait")

#: A broadcaster gave up (:class:`~phx_gevent.errors.BroadcastTimeout`). Sender: the FlowControl.
#: measurements ``duration`` (s), ``queued`` (bytes); metadata ``high_water``.
overload_timeout: NamedSignal = namespace.signal("phx_gevent.overload_timeout")

#: A connection was dropped because it did not read what it was sent. Sender: its writer
#: (WebSocket) or long-poll session. measurements ``queued_bytes``; metadata ``reason``
#: (``"hard_cap"``: over 4x ``max_connection_queue_bytes``; ``"stalled"``: over the cap and
#: nothing drained for ``slow_client_timeout``; ``"buffer_full"``: a long-poll session over
#: ``max_buffer_bytes``), ``transport``.
slow_client_drop: NamedSignal = namespace.signal("phx_gevent.slow_client_drop")

#: The PubSub adapter lost its connection (the first side that lost it). Sender: the adapter.
#: measurements none (``{}``); metadata ``node``, ``adapter`` (repr), ``reason`` (the error).
pubsub_down: NamedSignal = namespace.signal("phx_gevent.pubsub_down")

#: The PubSub adapter is connected again (both sides). Sender: the adapter. measurements
#: ``duration`` (s, the outage); metadata ``node``, ``adapter``.
pubsub_up: NamedSignal = namespace.signal("phx_gevent.pubsub_up")

#: A ``presence_diff`` was broadcast to this node's subscribers of a topic. Sender: the
#: :class:`~phx_gevent.Presence`. measurements ``joins``, ``leaves`` (keys in the diff);
#: metadata ``topic``, ``presence`` (its name).
presence_change: NamedSignal = namespace.signal("phx_gevent.presence_change")


def emit(signal: NamedSignal, sender: Any, measurements: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
    """Send ``signal`` to its receivers, each isolated from the others' failures.

    Callers check ``signal.receivers`` first (so building the dicts costs
    nothing when nobody listens). Never raises because of a receiver.
    """
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, measurements=measurements, metadata=metadata)
        except Exception:
            log.exception("phx_gevent: telemetry receiver %r of %s failed", receiver, signal.name)


def format_duration(seconds: float) -> str:
    """``45µs`` below a millisecond, else ``1.2ms`` (Phoenix's log style)."""
    micros = seconds * 1_000_000
    if micros < 1000:
        return f"{int(micros)}µs"
    return f"{micros / 1000:.1f}ms"
