"""Per-topic routing of the Redis adapter with a real redis-server: who receives what, joins, outages, storms.

Nodes are PubSub instances in this process, each with its own Redis
connections (tests/servers.py starts the redis-server). Counts come from the
adapter's ``stats()`` (``messages``: every message a node read from Redis)
and from Redis itself (``PUBSUB NUMSUB``, ``INFO commandstats``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import gevent
import pytest

from phx_gevent.pubsub import PubSub
from phx_gevent.pubsub.redis import RedisAdapter
from phx_gevent.pubsub.routing import topic_channel
from tests.servers import Recorder, RedisServer, redis_server, wait_until  # noqa: F401

TIMEOUT = 10.0
_prefixes = itertools.count(1)


@pytest.fixture
def nodes(redis_server: RedisServer) -> Iterator[Any]:  # noqa: F811
    """``nodes(n, **adapter_options)``: started PubSub nodes on the test's Redis, subscribed."""
    made: list[PubSub] = []
    prefix = f"r{next(_prefixes)}"

    def make(n: int = 2, **options: Any) -> list[PubSub]:
        out = []
        for _ in range(n):
            node = PubSub(RedisAdapter(redis_server.url, prefix=prefix, backoff=(0.05, 0.3), **options))
            node.start()
            out.append(node)
        made.extend(out)
        wait_until(lambda: all(x.adapter.stats()["listener_connected"] for x in out), TIMEOUT, "subscriptions")
        return out

    yield make
    for node in made:
        node.stop()


class Sub:
    """A fake channel subscriber (the shape pubsub/local.py documents) that records intercepted events."""

    def __init__(self) -> None:
        self.owner = object()
        self.intercept = ("e",)
        self.writer = None
        self.got: list[Any] = []

    def deliver(self, topic: str, event: str, payload: Any) -> None:
        self.got.append(payload)


def stat(node: PubSub, name: str) -> Any:
    return node.adapter.stats()[name]


def numsub(redis: RedisServer, channel: bytes) -> int:
    return int(redis.command("PUBSUB", "NUMSUB", channel)[1])


def command_calls(redis: RedisServer, command: str) -> int:
    """How many times Redis ran ``command`` (INFO commandstats)."""
    info = redis.command("INFO", "commandstats")  # parsed by redis-py: {"cmdstat_x": {"calls": n, ...}}
    return int(info.get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.mark.parametrize("routing", ["topic", "broadcast"])
def test_a_node_receives_only_the_topics_it_has_subscribers_for(nodes, redis_server, routing):  # noqa: F811
    a, b, c = nodes(3, routing=routing)
    on_a, on_b = Sub(), Sub()
    for node, topic, sub in ((a, "room:a", on_a), (b, "room:b", on_b)):
        assert node.wait_routed(topic)
        node.subscribe(topic, sub)
    before = {n: stat(n, "messages") for n in (a, b, c)}
    for i in range(50):
        c.broadcast("room:a", "e", {"i": i})
        c.broadcast("room:b", "e", {"i": i})
        c.broadcast("room:nobody", "e", {"i": i})
    wait_until(lambda: len(on_a.got) == 50 and len(on_b.got) == 50, TIMEOUT, "the broadcasts")
    c.broadcast("room:a", "e", {"i": "marker"})
    c.broadcast("room:b", "e", {"i": "marker"})
    wait_until(lambda: len(on_a.got) == 51 and len(on_b.got) == 51, TIMEOUT, "the markers")
    wait_until(lambda: stat(c, "messages") - before[c] >= (150 if routing == "broadcast" else 0), TIMEOUT, "echoes")
    got = {n: stat(n, "messages") - before[n] for n in (a, b, c)}
    if routing == "topic":
        # Proportional to each node's interest, not to the cluster's traffic.
        assert (got[a], got[b], got[c]) == (51, 51, 0)
        assert numsub(redis_server, topic_channel(a.adapter.prefix, "room:nobody")) == 0
        assert stat(a, "channels") == 3  # its topic, its direct channel, the nodes channel
    else:
        # The old design: every node reads (and c drops as echoes) all 152.
        assert (got[a], got[b], got[c]) == (152, 152, 152)


def test_the_last_subscriber_gone_the_node_unsubscribes_after_the_linger(nodes, redis_server):  # noqa: F811
    a, b = nodes(2, linger=0.05)
    sub = Sub()
    channel = topic_channel(a.adapter.prefix, "room:brief")
    assert a.wait_routed("room:brief")
    a.subscribe("room:brief", sub)
    assert numsub(redis_server, channel) == 1
    a.unsubscribe("room:brief", sub)
    wait_until(lambda: numsub(redis_server, channel) == 0, TIMEOUT, "the UNSUBSCRIBE")
    wait_until(lambda: stat(a, "channels") == 2, TIMEOUT, "the confirmation")
    before = stat(a, "messages")
    b.broadcast("room:brief", "e", {})
    b.broadcast("room:brief", "e", {})
    wait_until(lambda: stat(b, "published") >= 2, TIMEOUT, "the publications")
    assert stat(a, "messages") == before and sub.got == []


def test_a_broadcast_right_after_a_confirmed_route_reaches_the_new_subscriber(nodes):
    a, b = nodes(2)
    for i in range(20):
        topic, sub = f"room:fresh{i}", Sub()
        # What a channel join does before its reply: wait for the route, then subscribe.
        assert a.wait_routed(topic)
        a.subscribe(topic, sub)
        b.broadcast(topic, "e", {"i": i})  # at once, from the other node
        wait_until(lambda sub=sub: sub.got, TIMEOUT, f"the broadcast on {topic}")


def test_wait_routed_returns_only_once_redis_confirmed_the_subscription(nodes):
    a, b = nodes(2)
    channel = topic_channel(a.adapter.prefix, "room:held")
    a.adapter._bus_lock.acquire()  # the subscription writer cannot write: nothing reaches Redis
    try:
        waiter = gevent.spawn(a.wait_routed, "room:held")
        gevent.idle()  # every runnable greenlet ran: the waiter is parked on the round's confirmation
        assert not waiter.ready() and a.adapter._subs.refs(channel) == 1
    finally:
        a.adapter._bus_lock.release()
    assert waiter.get(timeout=TIMEOUT) is True and a.adapter._subs.is_active(channel)
    sub = Sub()
    a.subscribe("room:held", sub)
    b.broadcast("room:held", "e", {"n": 1})
    wait_until(lambda: sub.got == [{"n": 1}], TIMEOUT, "the broadcast")


def test_a_join_storm_is_batched_into_a_few_subscribe_commands(nodes, redis_server):  # noqa: F811
    (a,) = nodes(1, linger=0.05)
    calls = command_calls(redis_server, "subscribe")
    topics = [f"user:{i}" for i in range(10_000)]
    subs = [Sub() for _ in topics]

    def join(topic: str, sub: Sub) -> bool:
        routed = a.wait_routed(topic)
        a.subscribe(topic, sub)
        return routed

    jobs = [gevent.spawn(join, t, s) for t, s in zip(topics, subs, strict=True)]
    gevent.joinall(jobs, timeout=60, raise_error=True)
    assert all(job.value for job in jobs)
    assert stat(a, "channels") == 10_002
    assert numsub(redis_server, topic_channel(a.adapter.prefix, "user:9999")) == 1
    commands = command_calls(redis_server, "subscribe") - calls
    rounds = stat(a, "subscribe_rounds")
    # 10,000 joins waited on a handful of rounds (one pipelined write each, of up to
    # 1,000 channels per SUBSCRIBE), never one round trip per join.
    assert commands == stat(a, "subscribe_commands") - 1 and commands <= 60, (commands, rounds)
    assert rounds <= 30, rounds
    unsub = command_calls(redis_server, "unsubscribe")
    for topic, sub in zip(topics, subs, strict=True):
        a.unsubscribe(topic, sub)
    wait_until(lambda: stat(a, "channels") == 2, TIMEOUT, "the storm of leaves to be unsubscribed")
    assert command_calls(redis_server, "unsubscribe") - unsub <= 60


def test_a_join_during_an_outage_does_not_wait_and_its_subscription_is_restored(nodes, redis_server):  # noqa: F811
    a, b = nodes(2, subscribe_timeout=30.0)
    kept = Sub()
    assert a.wait_routed("room:kept")
    a.subscribe("room:kept", kept)
    redis_server.kill()
    wait_until(lambda: not stat(a, "listener_connected"), TIMEOUT, "the outage")
    late = Sub()
    with gevent.Timeout(5, AssertionError("a join waited for Redis during the outage")):
        assert a.wait_routed("room:late") is False  # the join goes on at once, locally
    a.subscribe("room:late", late)
    a.broadcast("room:late", "e", {"local": True})
    assert late.got == [{"local": True}]
    redis_server.start()
    wait_until(lambda: a.adapter.connected and b.adapter.connected, TIMEOUT, "reconnection")
    # Every held channel came back with the reconnection, in one round.
    assert stat(a, "channels") == 4 and stat(a, "channels_pending") == 0
    b.broadcast("room:late", "e", {"remote": 1})
    b.broadcast("room:kept", "e", {"remote": 2})
    wait_until(lambda: len(late.got) == 2 and kept.got == [{"remote": 2}], TIMEOUT, "both topics")
    assert late.got[1] == {"remote": 1}


def test_history_appends_and_direct_messages_follow_the_routing(nodes):
    a, b = nodes(2)
    seen: list[Any] = []
    b.register("svc", lambda payload, sender: seen.append((payload, sender)))
    a.send_direct(b.node_name, "svc", {"x": 1})
    wait_until(lambda: seen, TIMEOUT, "the direct message")
    assert seen == [({"x": 1}, a.node_name)]
    for node in (a, b):
        node.keep_history("hist:*", {"size": 10, "ttl": 60})
    on_a, on_b = Sub(), Sub()
    for node, sub in ((a, on_a), (b, on_b)):
        assert node.wait_routed("hist:1")
        node.subscribe("hist:1", sub)
    a.broadcast("hist:1", "e", {"n": 1})
    # The script publishes on the topic's channel: both get it (a through its echo), with one offset.
    wait_until(lambda: on_a.got and on_b.got, TIMEOUT, "the history broadcast")
    assert on_a.got == on_b.got == [{"n": 1}]
    entries = b.history("hist:1")
    assert entries is not None and [e.payload for e in entries] == [{"n": 1}]


def test_routing_is_chosen_by_option_or_url_and_checked(redis_server):  # noqa: F811
    assert RedisAdapter(redis_server.url).routing == "topic"
    adapter = RedisAdapter(redis_server.url + "?routing=broadcast")
    assert adapter.routing == "broadcast" and "routing" not in adapter.url
    assert RedisAdapter(redis_server.url + "?routing=broadcast", routing="topic").routing == "topic"
    with pytest.raises(ValueError, match="routing must be one of"):
        RedisAdapter(redis_server.url, routing="sharded")
    with pytest.raises(ValueError, match="linger"):
        RedisAdapter(redis_server.url, linger=-1)
    with pytest.raises(ValueError, match="subscribe_chunk"):
        RedisAdapter(redis_server.url, subscribe_chunk=0)
    from phx_gevent.pubsub.routing import split_routing

    assert split_routing("unix:///tmp/r.sock?db=2&routing=dual", None) == ("unix:///tmp/r.sock?db=2", "dual")
    assert split_routing("redis://h:1/0?routing=broadcast", None) == ("redis://h:1/0", "broadcast")


def test_a_subscription_refused_by_an_acl_is_logged_and_the_node_keeps_working(redis_server, caplog):  # noqa: F811
    prefix = f"r{next(_prefixes)}"
    # This user may subscribe to the node channels and to topics starting "ok", nothing else.
    redis_server.command(
        "ACL", "SETUSER", "limited", "on", ">pw", "~*", "+@all", "resetchannels",
        f"&{prefix}:d:*", f"&{prefix}:n", f"&{prefix}:t:{{ok*",
    )  # fmt: skip
    url = redis_server.url.replace("redis://", "redis://limited:pw@")
    a = PubSub(RedisAdapter(url, prefix=prefix, backoff=(0.05, 0.3)))
    b = PubSub(RedisAdapter(redis_server.url, prefix=prefix, backoff=(0.05, 0.3)))
    try:
        for node in (a, b):
            node.start()
        wait_until(lambda: a.adapter.connected and b.adapter.connected, TIMEOUT, "both nodes")
        assert a.wait_routed("denied:1") is False
        a.subscribe("denied:1", Sub())
        assert "refused a subscription" in caplog.text and stat(a, "subscribe_errors") == 1
        ok = Sub()
        assert a.wait_routed("ok:1")  # the connection was not dropped: later rounds work
        a.subscribe("ok:1", ok)
        b.broadcast("ok:1", "e", {"after": "refusal"})
        wait_until(lambda: ok.got == [{"after": "refusal"}], TIMEOUT, "the allowed topic")
        assert stat(a, "reconnects") == 0 and stat(a, "outages") == 0
    finally:
        a.stop()
        b.stop()


def test_a_rolling_switch_through_dual_routing_delivers_every_broadcast_once(redis_server):  # noqa: F811
    # broadcast -> dual -> topic: within one step of that order nodes hear each other,
    # with history offsets, and nobody gets a message twice.
    from phx_gevent import Emitter

    prefix = f"r{next(_prefixes)}"
    made: list[PubSub] = []

    def node(routing: str) -> PubSub:
        n = PubSub(RedisAdapter(redis_server.url, prefix=prefix, backoff=(0.05, 0.3), routing=routing))
        n.start()
        n.keep_history("hist:*", {"size": 10, "ttl": 60})
        made.append(n)
        wait_until(lambda: n.adapter.connected, TIMEOUT, f"the {routing} node")
        return n

    try:
        for step, (old_routing, new_routing) in enumerate((("broadcast", "dual"), ("dual", "topic"))):
            old, new = node(old_routing), node(new_routing)
            for topic in (f"room:{step}", f"hist:{step}"):
                subs = {n: Sub() for n in (old, new)}
                for n, sub in subs.items():
                    assert n.wait_routed(topic)
                    n.subscribe(topic, sub)
                old.broadcast(topic, "e", {"from": old_routing})
                new.broadcast(topic, "e", {"from": new_routing})
                with Emitter(redis_server.url, prefix=prefix, routing="dual") as emitter:  # as during the switch
                    emitter.broadcast(topic, "e", {"from": "emitter"})
                expected = sorted([old_routing, new_routing, "emitter"])
                for n, sub in subs.items():
                    wait_until(lambda sub=sub: len(sub.got) >= 3, TIMEOUT, f"{topic} on the {n.adapter.routing} node")
                # A marker from each node travels after anything it sent: nothing comes twice.
                old.broadcast(topic, "e", {"from": "marker-old"})
                new.broadcast(topic, "e", {"from": "marker-new"})
                for sub in subs.values():
                    wait_until(lambda sub=sub: len(sub.got) >= 5, TIMEOUT, "the markers")
                    assert sorted(p["from"] for p in sub.got[:3]) == expected
                    assert len(sub.got) == 5
            dual = old if old_routing == "dual" else new
            assert stat(dual, "dual_dropped") > 0 and stat(dual, "invalid") == 0
    finally:
        for n in made:
            n.stop()


def test_a_channel_join_during_an_outage_succeeds_and_hears_other_workers_once_back(redis_server):  # noqa: F811
    # The real join path (ChannelProcess, phx_gevent.testing's in-memory transport) on a Redis endpoint.
    from flask import Flask

    from phx_gevent import Endpoint
    from phx_gevent.testing import ChannelTest
    from tests.handlers import UserSocket

    prefix = f"r{next(_prefixes)}"
    adapter = RedisAdapter(redis_server.url, prefix=prefix, backoff=(0.05, 0.3), subscribe_timeout=30.0)
    endpoint = Endpoint(Flask(__name__), pubsub=adapter)
    endpoint.socket("/socket", UserSocket)
    other = PubSub(RedisAdapter(redis_server.url, prefix=prefix, backoff=(0.05, 0.3)))
    other.start()
    try:
        client = ChannelTest(endpoint).connect({"user": "u1"})
        wait_until(lambda: adapter.connected and other.adapter.connected, TIMEOUT, "both nodes")
        redis_server.kill()
        wait_until(lambda: not adapter.stats()["listener_connected"], TIMEOUT, "the outage")
        with gevent.Timeout(5, AssertionError("the join waited for Redis during the outage")):
            room = client.join("room:outage")
        assert room.reply.status == "ok"
        redis_server.start()
        wait_until(lambda: adapter.connected and other.adapter.connected, TIMEOUT, "reconnection")
        assert adapter._subs.is_active(topic_channel(prefix, "room:outage"))  # restored with the connection
        other.broadcast("room:outage", "news", {"n": 1})

        def news() -> bool:
            return any(m.event == "news" and m.payload == {"n": 1} for m in client.transport.messages())

        wait_until(news, TIMEOUT, "the other worker's broadcast")
    finally:
        other.stop()
        endpoint.close()
