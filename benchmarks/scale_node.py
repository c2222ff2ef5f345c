#!/usr/bin/env python3
"""One node of the many-node scale benchmark (benchmarks/scale.py starts several).

    python benchmarks/scale_node.py CONFIG.json INDEX

A node is what one gunicorn worker is to the Redis bus: a gevent process with
its own :class:`~phx_gevent.pubsub.PubSub` and its own Redis adapter (its own
Redis connections), with local subscribers on the topics the config assigns
to node ``INDEX``. The subscribers stand in for WebSocket connections: each
topic has one subscriber whose writer encodes the frame with the real
WebSocket encoder (what a topic with subscribers costs once per broadcast)
and counts it; no socket is written.

It speaks line-delimited commands on stdin and answers on stdout:

``READY {json}`` (printed once, after every subscription is in place)
``reset``  -> ``OK``: zero the counters and start the CPU clock of the window
``report`` -> one JSON line: envelopes received from Redis (the adapter's
             ``received``), envelopes with local interest, frames delivered,
             CPU seconds of this process since ``reset``, the adapter's stats
``quit``   -> stops the adapter and exits
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(os.environ.get("PHX_ROOT") or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(ROOT))

import gevent  # noqa: E402
from gevent.fileobject import FileObjectThread  # noqa: E402

from phx_gevent.pubsub import PubSub  # noqa: E402
from phx_gevent.pubsub.redis import RedisAdapter  # noqa: E402
from phx_gevent.serializers import V2JSONSerializer  # noqa: E402
from phx_gevent.transports.ws_encoders import encoder_for  # noqa: E402


class CountingWriter:
    """Stands in for the writers of a topic's connections: counts the frames it is given."""

    __slots__ = ("encoder", "frames")

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        self.frames = 0

    def write(self, frame: Any) -> None:
        self.frames += 1


class Sub:
    """A local subscriber (the Subscriber protocol of phx_gevent.contracts) on the fastlane."""

    __slots__ = ("writer",)
    # Not None: a broadcast from another node has from_=None, and the fan-out skips from_'s own subscribers.
    owner = object()
    intercept = frozenset()

    def __init__(self, writer: CountingWriter) -> None:
        self.writer = writer

    def deliver(self, topic: str, event: str, payload: Any) -> None:  # pragma: no cover - nothing intercepted
        pass


class CountingPubSub(PubSub):
    """PubSub that counts, of the envelopes the adapter hands it, those with a local subscriber."""

    useful = 0

    def _receive(self, envelope: dict[str, Any]) -> None:
        if envelope.get("k") == "b" and envelope.get("t") in self.topics:
            self.useful += 1
        super()._receive(envelope)


def make_adapter(cfg: dict[str, Any], index: int) -> Any:
    """The node's adapter, on ``cfg["url"]`` (``?routing=`` chooses the design; ``redis+cluster://``: sharded)."""
    if cfg["url"].startswith(("redis+cluster://", "rediss+cluster://")):
        from phx_gevent.pubsub.redis_cluster import redis_adapter

        return redis_adapter(cfg["url"], cfg["prefix"], node_name=f"scale-node-{index}")
    return RedisAdapter(cfg["url"], prefix=cfg["prefix"], node_name=f"scale-node-{index}")


def per_shard(stats: dict[str, Any]) -> dict[str, int]:
    """Messages read per shard (``host:port``) by a cluster adapter; empty for one Redis."""
    return {addr: received(s) for addr, s in (stats.get("shards") or {}).items()}


def received(stats: dict[str, Any]) -> int:
    """Every pub/sub message the node read from Redis (``messages``; ``received`` on a tree without it)."""
    return int(stats.get("messages", stats["received"]))


def subscribed(adapter: Any, topics: int) -> bool:
    """True once the listener is connected and, under topic routing, every topic's channel is confirmed."""
    if not adapter.connected:
        return False
    stats = adapter.stats()
    if stats.get("routing") == "topic":
        return int(stats.get("channels", 0)) >= topics and not stats.get("channels_pending")
    return True


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    index = int(sys.argv[2])
    topics: list[str] = cfg["assignment"][index]
    adapter = make_adapter(cfg, index)
    pubsub = CountingPubSub(adapter)
    encoder = encoder_for(V2JSONSerializer())
    writers = []
    for topic in topics:
        writer = CountingWriter(encoder)
        writers.append(writer)
        pubsub.subscribe(topic, Sub(writer))
    pubsub.start()
    deadline = time.monotonic() + 60
    while not subscribed(adapter, len(topics)) and time.monotonic() < deadline:
        gevent.sleep(0.05)
    out = sys.stdout
    ready = {"node": index, "topics": len(topics), "connected": adapter.connected, "stats": adapter.stats()}
    out.write("READY " + json.dumps(ready, default=str) + "\n")
    out.flush()
    cpu0 = time.process_time()
    wall0 = time.monotonic()
    base: dict[str, Any] = {}
    # Commands arrive on a pipe: read it in a thread so the adapter's greenlets keep running.
    stdin = FileObjectThread(sys.stdin, "r")
    for line in stdin:
        cmd = line.strip()
        if cmd == "reset":
            pubsub.useful = 0
            for writer in writers:
                writer.frames = 0
            base = dict(adapter.stats())
            cpu0 = time.process_time()
            wall0 = time.monotonic()
            out.write("OK\n")
        elif cmd == "report":
            stats = adapter.stats()
            report = {
                "node": index,
                "topics": len(topics),
                "received": received(stats) - (received(base) if base else 0),
                "delivered_envelopes": stats["received"] - base.get("received", 0),
                "useful": pubsub.useful,
                "frames": sum(w.frames for w in writers),
                "cpu": time.process_time() - cpu0,
                "wall": time.monotonic() - wall0,
                "dropped": stats.get("receive_dropped", 0) - base.get("receive_dropped", 0),
                "per_shard": {a: n - per_shard(base).get(a, 0) for a, n in per_shard(stats).items()},
                "stats": stats,
            }
            out.write(json.dumps(report, default=str) + "\n")
        elif cmd == "quit":
            break
        out.flush()
    pubsub.stop(2.0)


if __name__ == "__main__":
    main()
