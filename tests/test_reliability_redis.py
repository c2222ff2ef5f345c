"""Background greenlets survive bad data and their own failures (issue 17, items 2, 4 and 7)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from phx_gevent import supervise
from phx_gevent.pubsub import PubSub, codec
from phx_gevent.pubsub.redis import RedisAdapter
from phx_gevent.pubsub.routing import topic_channel
from tests.servers import Recorder, RedisServer, redis_server, wait_until  # noqa: F401

TIMEOUT = 10.0
_prefixes = itertools.count(1)


@pytest.fixture
def nodes(redis_server: RedisServer) -> Iterator[Any]:  # noqa: F811
    made: list[PubSub] = []
    prefix = f"rel{next(_prefixes)}"

    def make(n: int = 2) -> list[PubSub]:
        out = [PubSub(RedisAdapter(redis_server.url, prefix=prefix, backoff=(0.05, 0.3))) for _ in range(n)]
        for node in out:
            node.start()
        made.extend(out)
        wait_until(lambda: all(x.adapter.stats()["listener_connected"] for x in out), TIMEOUT, "subscriptions")
        return out

    yield make
    for node in made:
        node.stop()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        # 1,000 levels in a direct message with tagged bytes: the stdlib decoder recursed.
        ('{"k":"b","t":"deep","e":"x","x":null,"nb":1,"p":{"a":' + _nested(1000) + "}}", False),
        # 1,000 levels without: a valid (if odd) payload, delivered.
        ('{"k":"b","t":"deep","e":"x","x":null,"p":{"a":' + _nested(1000) + "}}", True),
        ('{"k":"b","t":"deep","e":"x","x":null,"p":{"a":' + _nested(100_000) + "}}", False),
        ('{"k":"b","t":"deep","e":"x","x":null,"p":{"a":NaN}}', False),
        ('{"k":"b","t":"deep","e":"x","x":null,"p":{"a":1e400}}', False),
        ('{"k":"b","t":"deep","e":"x","x":null,"p":{"a":"\\ud800"}}', False),
    ],
)
def test_a_hostile_envelope_never_stops_cross_node_delivery(nodes, redis_server, body, valid):  # noqa: F811
    a, b = nodes(2)
    remote = Recorder(b, "deep")
    channel = topic_channel(a.adapter.prefix, "deep")  # topic routing: the topic's own channel
    redis_server.command("PUBLISH", channel, b"phx1\nintruder:1:aa\n" + body.encode())
    a.broadcast("deep", "after", {"n": 1})
    wait_until(lambda: ("after", {"n": 1}) in remote.got, TIMEOUT, "delivery after the envelope")
    assert [e for e, _ in remote.got] == (["x", "after"] if valid else ["after"])
    assert b.adapter.stats()["invalid"] == (0 if valid else 1)
    # Still alive: the next one arrives too.
    a.broadcast("deep", "again", {"n": 2})
    wait_until(lambda: ("again", {"n": 2}) in remote.got, TIMEOUT, "the next delivery")


def test_codec_refuses_what_cannot_be_re_encoded():
    for body in ('{"a":NaN}', '{"a":-Infinity}', '{"a":1e400}', '{"a":"\\udc00x"}', '{"a":' + _nested(1000) + "}"):
        raw = b'phx1\nn:1:a\n{"k":"b","t":"t","e":"e","x":null,"nb":1,"p":' + body.encode() + b"}"
        with pytest.raises(codec.EnvelopeError):
            codec.decode(raw)
    ok = codec.decode(b'phx1\nn:1:a\n{"k":"b","t":"t","e":"e","x":null,"p":{"s":"\\ud83d\\ude00","f":1.5e300}}')
    assert ok["p"] == {"s": "\U0001f600", "f": 1.5e300}


class _Exploding:
    """Stands in for the delivery greenlet's wake-up event: the first wait raises outside any handler."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.fired = False

    def wait(self, timeout: float | None = None) -> bool:
        if not self.fired:
            self.fired = True
            raise RuntimeError("a bug outside the per-envelope handler")
        return self.real.wait(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_background_greenlet_that_dies_is_restarted_and_counted(nodes):
    a, b = nodes(2)
    before = supervise.counters.get("Redis delivery", {}).get("restarts", 0)
    b.adapter._in_event = _Exploding(b.adapter._in_event)
    remote = Recorder(b, "r")
    wait_until(lambda: b.adapter._in_event.fired, TIMEOUT, "the failure")
    a.broadcast("r", "after", {})
    assert remote.wait(1) == [("after", {})]
    assert supervise.counters["Redis delivery"]["restarts"] == before + 1
    assert b.adapter.stats()["restarts"] >= 1


# -- 7. presence: a bogus version is recovered from ---------------------------------------------


@pytest.mark.parametrize("kind", ["delta", "state"])
def test_a_forged_huge_presence_version_does_not_silence_a_node_for_good(kind, caplog):
    from phx_gevent.presence.state import StateTransfer
    from phx_gevent.pubsub.memory import MemoryBus
    from tests.test_presence import Node

    bus = MemoryBus()
    a, b = Node(bus), Node(bus)
    rogue = bus.adapter()
    try:
        a.join("alice")
        wait_until(lambda: b.keys() == {"alice"}, 5, "b synced")
        peer = b.presence._nodes[a.endpoint.node_name]
        rogue.start(lambda envelope: None)
        if kind == "delta":
            # A delta in a's name that follows on from what b has and claims a version far ahead.
            forged = {"n": a.endpoint.node_name, "v": 10**18, "v0": peer.version + 1, "j": [], "l": []}
            rogue.publish({"k": "b", "n": "rogue", "t": "phx_presence:presence", "e": "delta", "p": forged, "x": None})
        else:
            # A state transfer "from a" (direct messages carry the sender's name) with a huge version.
            caplog.set_level(logging.WARNING, logger="phx_gevent.presence.replication")
            b.presence._enqueue(StateTransfer(a.endpoint.node_name, {"v": 10**18, "s": []}))
            # Applied: seen, or already undone by a's next heartbeat (which logs the resync), on a busy machine.
            wait_until(lambda: peer.version == 10**18 or "resyncing" in caplog.text, 5, "the forged state applied")
        # a's real changes must reach b again (its heartbeat is the truth about its version).
        a.join("bob")
        wait_until(lambda: b.keys() == {"alice", "bob"}, 5, "b follows a again")
    finally:
        rogue.stop()
        a.close()
        b.close()
