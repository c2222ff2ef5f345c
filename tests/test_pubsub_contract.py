"""One contract for every PubSub setup: the local layer, MemoryAdapter nodes, Redis nodes (both routings).

Each test gets ``cluster(n)``: ``n`` started PubSub nodes that share a bus.
For the local layer (one process, no adapter) the "nodes" are the same
PubSub, which must behave like a cluster whose members are all one process;
tests of node-to-node messages use the ``nodes`` fixture (distinct nodes
only). Subscribers are fakes with the
shape the local layer documents (owner, intercept, writer, deliver).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest

from phx_gevent.pubsub import ALL_EVENTS, PubSub
from phx_gevent.pubsub.memory import MemoryBus
from phx_gevent.pubsub.redis import RedisAdapter
from phx_gevent.pubsub.redis_cluster import RedisClusterAdapter
from tests.redis_topologies import redis_cluster  # noqa: F401
from tests.servers import RedisServer, wait_until

TIMEOUT = 10.0
_prefixes = itertools.count(1)


class FakeEncoder:
    """A fastlane encoder: a broadcast becomes an immutable frame; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def broadcast(self, topic: str, event: str, payload: Any) -> Any:
        self.calls += 1
        if isinstance(payload, bytes):
            return ("binary", topic, event, payload)
        return json.dumps([topic, event, payload], ensure_ascii=False)


class FakeWriter:
    def __init__(self, encoder: FakeEncoder) -> None:
        self.encoder = encoder
        self.frames: list[Any] = []

    def write(self, frame: Any) -> None:
        self.frames.append(frame)


class Sub:
    """A subscriber: fastlane frames land in ``received``; intercepted events too, marked."""

    def __init__(self, intercept: Any = (), encoder: FakeEncoder | None = None) -> None:
        self.owner = object()
        self.intercept = intercept
        self.writer = FakeWriter(encoder or FakeEncoder())
        self.delivered: list[tuple[str, str, Any]] = []

    def deliver(self, topic: str, event: str, payload: Any) -> None:
        self.delivered.append((topic, event, payload))

    @property
    def received(self) -> list[tuple[str, str, Any]]:
        """Everything this subscriber got, decoded, in order (fastlane then intercepted)."""
        out: list[tuple[str, str, Any]] = []
        for frame in self.writer.frames:
            if isinstance(frame, tuple):
                out.append((frame[1], frame[2], frame[3]))
            else:
                topic, event, payload = json.loads(frame)
                out.append((topic, event, payload))
        return out + [("intercepted:" + t, e, p) for t, e, p in self.delivered]

    def events(self) -> list[str]:
        return [e for _, e, _ in self.received]

    def wait_events(self, n: int, timeout: float = TIMEOUT) -> list[str]:
        wait_until(lambda: len(self.received) >= n, timeout, f"{n} messages (have {self.events()})")
        return self.events()


class Cluster:
    """Factory of started nodes for one kind of setup; stops them at the end."""

    def __init__(self, kind: str, redis: RedisServer | None = None, shards: Any = None) -> None:
        self.kind = kind
        self.redis_cluster = shards
        self.distinct = kind != "local"
        self.redis = redis
        self.bus = MemoryBus()
        self.prefix = f"contract{next(_prefixes)}"
        self.nodes: list[PubSub] = []

    def __call__(self, n: int) -> list[PubSub]:
        if self.kind == "local":
            node = PubSub()
            node.start()
            self.nodes.append(node)
            return [node] * n
        nodes = []
        for _ in range(n):
            if self.kind == "memory":
                adapter: Any = self.bus.adapter()
            elif self.kind == "cluster":
                adapter = RedisClusterAdapter(self.redis_cluster.url, prefix=self.prefix, backoff=(0.05, 0.3))
            else:
                assert self.redis is not None
                routing = {"redis-broadcast": "broadcast", "redis-dual": "dual"}.get(self.kind, "topic")
                adapter = RedisAdapter(self.redis.url, prefix=self.prefix, backoff=(0.05, 0.3), routing=routing)
            node = PubSub(adapter)
            node.start()
            if self.kind in ("redis", "redis-dual", "cluster"):
                _routed_subscriptions(node)
            nodes.append(node)
        self.nodes.extend(nodes)
        if self.kind.startswith("redis") or self.kind == "cluster":
            wait_until(lambda: all(n.adapter.stats()["listener_connected"] for n in nodes), TIMEOUT, "subscriptions")
        return nodes

    def close(self) -> None:
        for node in self.nodes:
            node.stop()


def _routed_subscriptions(node: PubSub) -> None:
    """``node.subscribe`` returns once the topic's route is confirmed, as a channel join waits before its reply.

    With topic routing a subscription reaches Redis asynchronously (batched);
    the contract is about what a subscriber receives once subscribed, so the
    tests subscribe the way the channel layer does: route, then subscribe.
    """
    plain = node.subscribe

    def subscribe(topic: str, sub: Any) -> None:
        assert node.wait_routed(topic, TIMEOUT), f"no route to {topic!r}"
        plain(topic, sub)

    node.subscribe = subscribe  # type: ignore[method-assign]


def _cluster(kind: str, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    redis = RedisServer().start() if kind.startswith("redis") else None
    # A Redis Cluster (3 shards) is started once for the module; each test has its own prefix.
    c = Cluster(kind, redis, request.getfixturevalue("redis_cluster") if kind == "cluster" else None)
    yield c
    c.close()
    if redis is not None:
        redis.close()


@pytest.fixture(params=["local", "memory", "redis", "redis-broadcast", "redis-dual", "cluster"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Every setup, the single-process local layer included."""
    yield from _cluster(request.param, request)


@pytest.fixture(params=["memory", "redis", "redis-broadcast", "redis-dual", "cluster"])
def nodes(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Setups with distinct nodes, for node-to-node behaviour."""
    yield from _cluster(request.param, request)


# -- the contract ----------------------------------------------------------------------------


def test_node_names_are_unique_and_name_host_and_pid(cluster):
    import os
    import socket

    nodes = cluster(3)
    names = [n.node_name for n in nodes]
    for name in names:
        assert f"{socket.gethostname()}:{os.getpid()}:" in name
        if cluster.distinct:
            assert name == nodes[names.index(name)].adapter.node_name
    if cluster.distinct:
        assert len(set(names)) == 3
    assert PubSub().node_name != PubSub().node_name  # the random part differs within one process


def test_a_broadcast_reaches_each_subscriber_on_every_node_exactly_once(cluster):
    a, b, c = cluster(3)
    subs = {node_i: [Sub(), Sub()] for node_i in range(3)}
    for i, node in enumerate((a, b, c)):
        for sub in subs[i]:
            node.subscribe("room:1", sub)
    other = Sub()
    b.subscribe("room:2", other)
    a.broadcast("room:1", "hello", {"n": 1})
    everyone = [s for group in subs.values() for s in group]
    for sub in everyone:
        assert sub.wait_events(1) == ["hello"]
    # A marker published from another node travels after any echo of the first
    # broadcast: nothing may arrive twice before it.
    b.broadcast("room:1", "marker", {})
    for sub in everyone:
        assert sub.wait_events(2) == ["hello", "marker"]
    assert other.received == []
    assert all(s.received[0] == ("room:1", "hello", {"n": 1}) for s in everyone)


def test_broadcast_from_skips_only_the_sender(cluster):
    a, b = cluster(2)
    sender, neighbour, remote = Sub(), Sub(), Sub()
    a.subscribe("room:from", sender)
    a.subscribe("room:from", neighbour)
    b.subscribe("room:from", remote)
    a.broadcast("room:from", "said", {"x": 1}, from_=sender.owner)
    assert neighbour.wait_events(1) == ["said"]
    assert remote.wait_events(1) == ["said"]
    a.broadcast("room:from", "marker", {})
    sender.wait_events(1)
    assert sender.events() == ["marker"]


def test_one_publisher_order_is_kept_on_every_node(cluster):
    a, b, c = cluster(3)
    subs = [Sub(), Sub(), Sub()]
    # One subscriber per node on two topics: the order holds across topics too.
    for node, sub in zip((a, b, c), subs, strict=True):
        node.subscribe("order:x", sub)
        node.subscribe("order:y", sub)
    count = 300
    for i in range(count):
        a.broadcast("order:x" if i % 3 else "order:y", "n", {"i": i})
    for sub in subs:
        sub.wait_events(count)
        got = [p["i"] for _, _, p in sub.received]
        if cluster.kind == "cluster":
            # Each shard is a connection of its own: the order holds per topic (per shard), not across shards.
            assert [i for i in got if i % 3] == [i for i in range(count) if i % 3]
            assert [i for i in got if not i % 3] == [i for i in range(count) if not i % 3]
            assert sorted(got) == list(range(count))
        else:
            assert got == list(range(count))


def test_binary_and_unicode_payloads_survive(cluster):
    a, b = cluster(2)
    subs = [Sub(), Sub()]
    a.subscribe("bin", subs[0])
    b.subscribe("bin", subs[1])
    blob = bytes(range(256)) * 4
    text = {"é": 'ü/\u2028"\\', "n": [1, 2.5, None, True, {"deep": ["x"]}], "big": 2**53, "emoji": "\U0001f600"}
    a.broadcast("bin", "blob", blob)
    a.broadcast("bin", "text", text)
    a.broadcast("bin", "empty", b"")
    for sub in subs:
        sub.wait_events(3)
        assert sub.received == [("bin", "blob", blob), ("bin", "text", text), ("bin", "empty", b"")]


def test_the_fastlane_encodes_once_per_encoder_on_each_node(cluster):
    a, b = cluster(2)
    shared = {id(a): FakeEncoder(), id(b): FakeEncoder()}
    subs = []
    for node in dict.fromkeys((a, b)):  # the local layer's two "nodes" are one PubSub
        for _ in range(5):
            sub = Sub(encoder=shared[id(node)])
            node.subscribe("fast", sub)
            subs.append(sub)
    a.broadcast("fast", "tick", {"n": 1})
    for sub in subs:
        sub.wait_events(1)
    assert {enc.calls for enc in shared.values() if enc.calls} == {1}


def test_intercepted_events_go_through_deliver_on_every_node(cluster):
    a, b = cluster(2)
    subs = [Sub(intercept=["announce"]), Sub(intercept=["announce"])]
    a.subscribe("icpt", subs[0])
    b.subscribe("icpt", subs[1])
    a.broadcast("icpt", "announce", {"text": "hi"})
    a.broadcast("icpt", "plain", {"text": "ho"})
    for sub in subs:
        sub.wait_events(2)
        assert sub.delivered == [("icpt", "announce", {"text": "hi"})]
        assert [e for _, e, _ in sub.received] == ["plain", "announce"]


def test_a_socket_id_disconnect_reaches_every_node(cluster):
    a, b, c = cluster(3)
    subs = [Sub(intercept=ALL_EVENTS) for _ in range(3)]
    for node, sub in zip((a, b, c), subs, strict=True):
        node.subscribe("user_socket:42", sub)
    c.broadcast("user_socket:42", "disconnect", {})
    for sub in subs:
        wait_until(lambda sub=sub: sub.delivered, TIMEOUT, "the disconnect")
        assert sub.delivered == [("user_socket:42", "disconnect", {})]


def test_in_process_listeners_see_broadcasts_from_other_nodes(cluster):
    a, b = cluster(2)
    seen: list[tuple[str, str, Any]] = []
    b.connect(lambda topic, event, payload, from_: seen.append((topic, event, payload)), "listen:1")
    a.broadcast("listen:1", "ev", {"v": 1})
    a.broadcast("listen:2", "ev", {"v": 2})
    a.broadcast("listen:1", "ev", {"v": 3})
    wait_until(lambda: len(seen) >= 2, TIMEOUT, "listener calls")
    assert seen == [("listen:1", "ev", {"v": 1}), ("listen:1", "ev", {"v": 3})]


def test_a_payload_is_captured_when_broadcast(cluster):
    a, b = cluster(2)
    subs = [Sub(), Sub()]
    a.subscribe("snap", subs[0])
    b.subscribe("snap", subs[1])
    payload = {"v": 1}
    a.broadcast("snap", "ev", payload)
    payload["v"] = 2  # too late: every node must see the value at broadcast time
    a.broadcast("snap", "ev", payload)
    for sub in subs:
        sub.wait_events(2)
        assert [p["v"] for _, _, p in sub.received] == [1, 2]


def test_bad_payloads_raise_and_deliver_nothing(cluster):
    a, b = cluster(2)
    subs = [Sub(), Sub()]
    a.subscribe("bad", subs[0])
    b.subscribe("bad", subs[1])
    for payload in (["list"], "text", None, 5):
        with pytest.raises(TypeError):
            a.broadcast("bad", "ev", payload)
    with pytest.raises(TypeError):
        a.broadcast(5, "ev", {})
    if cluster.distinct:
        # What the bus cannot carry fails in the caller, even with no local subscriber.
        a.unsubscribe("bad", subs[0])
        for payload in ({"nan": float("nan")}, {"obj": object()}, {"bytes": b"inside"}):
            with pytest.raises((TypeError, OverflowError, ValueError)):
                a.broadcast("bad", "ev", payload)
        a.subscribe("bad", subs[0])
    a.broadcast("bad", "ok", {})
    for sub in subs:
        assert sub.wait_events(1) == ["ok"]


def test_direct_messages_reach_only_their_node(nodes):
    a, b, c = nodes(3)
    calls: dict[str, list[tuple[Any, str]]] = {n.node_name: [] for n in (a, b, c)}
    for node in (a, b, c):
        node.register("svc", lambda payload, sender, name=node.node_name: calls[name].append((payload, sender)))
    payload = {"op": "poll", "lines": ["x", "ü"], "raw": b"\x00\xff", "nested": [{"more": b"y"}]}
    a.send_direct(b.node_name, "svc", payload)
    a.send_direct(a.node_name, "svc", {"self": True})  # this node: called at once
    assert calls[a.node_name] == [({"self": True}, a.node_name)]
    a.send_direct(b.node_name, "nobody-registered", {"x": 1})
    a.send_direct(b.node_name, "svc", {"marker": True})
    wait_until(lambda: len(calls[b.node_name]) >= 2, TIMEOUT, "direct messages")
    assert calls[b.node_name] == [(payload, a.node_name), ({"marker": True}, a.node_name)]
    # A marker sent to c from a after the others: c got nothing else.
    a.send_direct(c.node_name, "svc", {"marker": True})
    wait_until(lambda: calls[c.node_name], TIMEOUT, "the marker on c")
    assert calls[c.node_name] == [({"marker": True}, a.node_name)]


def test_broadcasts_and_direct_messages_from_one_publisher_stay_in_order(nodes):
    a, b = nodes(2)
    log: list[Any] = []
    b.register("svc", lambda payload, sender: log.append(("direct", payload["i"])))
    b.connect(lambda topic, event, payload, from_: log.append(("bcast", payload["i"])), "mixed")
    for i in range(100):
        if i % 2:
            a.send_direct(b.node_name, "svc", {"i": i})
        else:
            a.broadcast("mixed", "ev", {"i": i})
    wait_until(lambda: len(log) >= 100, TIMEOUT, "100 messages")
    if nodes.kind == "cluster":
        # The topic's channel and b's direct channel may live on different shards: each keeps its own order.
        assert [i for kind, i in log if kind == "bcast"] == list(range(0, 100, 2))
        assert [i for kind, i in log if kind == "direct"] == list(range(1, 100, 2))
    else:
        assert [i for _, i in log] == list(range(100))


def test_a_stopped_node_no_longer_receives_and_can_start_again(nodes):
    a, b = nodes(2)
    sub = Sub()
    b.subscribe("stop", sub)
    b.stop()
    a.broadcast("stop", "while_stopped", {})
    # Gone from the bus before b comes back.
    wait_until(lambda: a.adapter.stats()["published"] >= 1, TIMEOUT, "the publication")
    b.start()
    if nodes.kind.startswith("redis") or nodes.kind == "cluster":
        wait_until(lambda: b.adapter.stats()["listener_connected"], TIMEOUT, "resubscription")
    a.broadcast("stop", "after", {})
    # "after" follows "while_stopped" from the same publisher: had b got that one, it would come first.
    assert sub.wait_events(1) == ["after"]
