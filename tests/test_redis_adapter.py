"""The Redis adapter beyond the shared contract: wire format, outages, replay, drops, flow control.

Every test starts its own redis-server (tests/servers.py) and kills or
restarts it to simulate outages; waits are on conditions, with timeouts.
"""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from gevent.event import Event

from phx_gevent import Endpoint
from phx_gevent.flow import flow
from phx_gevent.pubsub import PubSub, codec
from phx_gevent.pubsub.redis import RedisAdapter
from phx_gevent.pubsub.routing import topic_channel
from phx_gevent.runtime import runtime
from tests.servers import Recorder, RedisServer, redis_server, wait_until  # noqa: F401

TIMEOUT = 10.0
FAST = {"backoff": (0.05, 0.3)}
_prefixes = itertools.count(1)


@pytest.fixture
def nodes(redis_server: RedisServer) -> Iterator[Any]:  # noqa: F811
    """``nodes(n, **adapter_options)``: started PubSub nodes on the test's Redis, subscribed."""
    made: list[PubSub] = []
    prefix = f"t{next(_prefixes)}"

    def make(n: int = 2, url: str | None = None, **options: Any) -> list[PubSub]:
        out = []
        for _ in range(n):
            node = PubSub(RedisAdapter(url or redis_server.url, prefix=prefix, **{**FAST, **options}))
            node.start()
            out.append(node)
        made.extend(out)
        wait_until(lambda: all(subscribed(x) for x in out), TIMEOUT, "subscriptions")
        return out

    yield make
    for node in made:
        node.stop()


def subscribed(node: PubSub) -> bool:
    return node.adapter.stats()["listener_connected"]


def stat(node: PubSub, name: str) -> Any:
    return node.adapter.stats()[name]


# -- wire format ----------------------------------------------------------------------------


def test_codec_round_trips_and_puts_the_sender_first():
    env = {"k": "b", "n": "host:1:ab", "t": "room:1", "e": "ev", "p": {"é": "/", "n": [1, None]}, "x": 12345}
    data = codec.encode(env)
    assert data.startswith(codec.echo_prefix("host:1:ab"))
    assert codec.decode(data) == env
    binary = {**env, "p": bytes(range(256)), "x": None}
    assert codec.decode(codec.encode(binary)) == binary
    direct = {"k": "d", "n": "a", "to": "b", "t": "svc", "e": "", "p": {"raw": b"\x00", "l": [b"\xff"]}, "x": None}
    assert codec.decode(codec.encode(direct)) == direct


def test_codec_refuses_what_it_cannot_carry_and_garbage():
    env = {"k": "b", "n": "n1", "t": "t", "e": "e", "x": None}
    for payload in ({"nan": float("nan")}, {"o": object()}, {"b": b"nested bytes in a broadcast"}):
        with pytest.raises((TypeError, OverflowError)):
            codec.encode({**env, "p": payload})
    with pytest.raises(ValueError):
        codec.encode({**env, "n": "two\nlines", "p": {}})
    evil = pickle.dumps(Event)
    for garbage in (
        b"",
        evil,
        b"phx1\n",
        b"phx1\nnode",
        b"phx1\nnode\n{not json",
        b"phx1\nnode\n[1,2]",
        b'phx1\nnode\n{"k":"b","t":"t","e":"e","p":[1]}',
        b'phx1\nnode\n{"k":"x","t":"t","e":"e","p":{}}',
        b'phx1\nnode\n{"k":"b","t":"t","e":"e","pb":"***"}',
        b'phx1\nnode\n{"k":"d","t":"t","e":"e","p":{}}',
        b'phx1\n\n{"k":"b","t":"t","e":"e","p":{}}',
        b'phx1\nnode\n{"k":"b","t":"t","e":"e","p":{},"x":"str"}',
    ):
        with pytest.raises(codec.EnvelopeError):
            codec.decode(garbage)


# -- construction and URLs --------------------------------------------------------------------


def test_endpoint_takes_a_redis_url_and_a_prefix(redis_server):  # noqa: F811
    endpoint = Endpoint(pubsub=redis_server.url, pubsub_prefix="app1")
    adapter = endpoint.pubsub.adapter
    assert isinstance(adapter, RedisAdapter) and adapter.prefix == "app1"
    assert endpoint.node_name == adapter.node_name
    with pytest.raises(ValueError):
        RedisAdapter("http://not-redis/")
    with pytest.raises(ValueError):
        RedisAdapter(redis_server.url, prefix="has space")


def test_unix_socket_urls_work(nodes, redis_server):  # noqa: F811
    a, b = nodes(2, url=redis_server.unix_url)
    rec = Recorder(b, "unix")
    a.broadcast("unix", "hi", {"over": "unix"})
    assert rec.wait(1) == [("hi", {"over": "unix"})]
    assert "unix:" in repr(a.adapter)


def test_prefixes_keep_apps_apart(redis_server):  # noqa: F811
    one = PubSub(RedisAdapter(redis_server.url, prefix="app-one", **FAST))
    two = PubSub(RedisAdapter(redis_server.url, prefix="app-two", **FAST))
    one_b = PubSub(RedisAdapter(redis_server.url, prefix="app-one", **FAST))
    try:
        for node in (one, two, one_b):
            node.start()
        wait_until(lambda: all(subscribed(n) for n in (one, two, one_b)), TIMEOUT, "subscriptions")
        rec_two, rec_one_b = Recorder(two, "shared"), Recorder(one_b, "shared")
        one.broadcast("shared", "for-app-one", {})
        two.broadcast("shared", "for-app-two", {})
        assert rec_one_b.wait(1) == [("for-app-one", {})]
        assert rec_two.got == [("for-app-two", {})]  # its own, delivered locally
        assert stat(two, "received") == 0 and stat(one_b, "received") == 1
    finally:
        for node in (one, two, one_b):
            node.stop()


def test_own_echo_is_dropped_by_node_name(nodes):
    a, b = nodes(2)
    rec_a, rec_b = Recorder(a, "echo"), Recorder(b, "echo")
    for i in range(20):
        a.broadcast("echo", "n", {"i": i})
    rec_b.wait(20)
    b.broadcast("echo", "marker", {})
    rec_a.wait(21)
    assert [p.get("i") for _, p in rec_a.got] == [*range(20), None]
    wait_until(lambda: stat(a, "echo_dropped") == 20, TIMEOUT, "20 echoes dropped")
    assert stat(a, "received") == 1 and stat(b, "received") == 20
    assert stat(a, "messages") == 21 and stat(b, "messages") == 21  # every message read, echoes included
    if a.adapter.routing == "broadcast":  # topic routing counts the nodes at most once a second
        assert stat(a, "subscribers") == 2


# -- outages ------------------------------------------------------------------------------------


def test_an_outage_keeps_local_delivery_and_replays_after_restart(nodes, redis_server):  # noqa: F811
    a, b = nodes(2)
    local, remote = Recorder(a, "out"), Recorder(b, "out")
    a.broadcast("out", "before", {"i": 0})
    remote.wait(1)
    redis_server.kill()
    wait_until(lambda: not a.adapter.connected and not b.adapter.connected, TIMEOUT, "the outage to be noticed")
    # Publishing while Redis is gone neither blocks nor raises; local subscribers get it at once.
    with gevent.Timeout(5, AssertionError("broadcast blocked during the outage")):
        for i in range(1, 21):
            a.broadcast("out", "during", {"i": i})
    assert [p["i"] for _, p in local.got] == list(range(21))
    assert stat(a, "publish_pending") == 20 and stat(a, "outages") >= 1
    assert stat(a, "last_error")
    redis_server.start()
    wait_until(lambda: a.adapter.connected and b.adapter.connected, TIMEOUT, "reconnection")
    a.broadcast("out", "after", {"i": 21})
    remote.wait(22)
    # The replay arrives in order, before what was published after the outage, once only.
    assert [p["i"] for _, p in remote.got] == list(range(22))
    assert stat(a, "replayed") >= 20 and stat(a, "publish_pending") == 0
    assert stat(a, "reconnects") >= 1 and stat(b, "reconnects") >= 1


def test_what_is_older_than_the_replay_window_is_dropped_and_counted(nodes, redis_server, caplog):  # noqa: F811
    a, b = nodes(2, replay_window=0.0)
    remote = Recorder(b, "old")
    redis_server.kill()
    wait_until(lambda: not a.adapter.connected, TIMEOUT, "the outage")
    for i in range(5):
        a.broadcast("old", "stale", {"i": i})
    redis_server.start()
    wait_until(lambda: a.adapter.connected and b.adapter.connected, TIMEOUT, "reconnection")
    wait_until(lambda: stat(a, "publish_expired") == 5, TIMEOUT, "5 expired envelopes")
    a.broadcast("old", "fresh", {})
    assert remote.wait(1) == [("fresh", {})]
    assert "waited too long" in caplog.text


def test_direct_messages_are_not_replayed_late(nodes, redis_server, monkeypatch):  # noqa: F811
    import time

    import phx_gevent.pubsub.redis as redis_module
    import phx_gevent.pubsub.redis_loops as redis_loops

    a, b = nodes(2)
    remote = Recorder(b, "late")
    calls: list[Any] = []
    b.register("svc", lambda payload, sender: calls.append(payload))
    a.broadcast("late", "seen", {})
    remote.wait(1)
    redis_server.kill()
    wait_until(lambda: not a.adapter.connected, TIMEOUT, "the outage")
    a.send_direct(b.node_name, "svc", {"stale": True})
    a.broadcast("late", "replayed", {})
    # Five seconds pass for the adapter: past direct_ttl (1 s), within replay_window (10 s).
    offset = 5.0
    for module in (redis_module, redis_loops):  # the adapter and its connection loops
        monkeypatch.setattr(module, "_monotonic", lambda: time.monotonic() + offset)
    redis_server.start()
    remote.wait(2)
    a.send_direct(b.node_name, "svc", {"fresh": True})
    wait_until(lambda: calls, TIMEOUT, "the fresh direct message")
    assert calls == [{"fresh": True}]
    assert remote.events() == ["seen", "replayed"]
    assert stat(a, "publish_expired") == 1


def test_a_full_publish_queue_drops_the_oldest_and_logs(nodes, redis_server, caplog):  # noqa: F811
    a, b = nodes(2, max_pending=5)
    remote = Recorder(b, "full")
    a.broadcast("full", "n", {"i": -1})  # a has seen b: its replay waits for b to be back
    remote.wait(1)
    del remote.got[:]
    redis_server.kill()
    wait_until(lambda: not a.adapter.connected, TIMEOUT, "the outage")
    with gevent.Timeout(5, AssertionError("publish blocked on a full queue during an outage")):
        for i in range(12):
            a.broadcast("full", "n", {"i": i})
    assert stat(a, "publish_dropped") == 7 and stat(a, "publish_pending") == 5
    assert "publish queue full" in caplog.text
    redis_server.start()
    remote.wait(5)
    assert [p["i"] for _, p in remote.got] == [7, 8, 9, 10, 11]


def test_killed_connections_reconnect_and_resubscribe(nodes, redis_server):  # noqa: F811
    a, b = nodes(2)
    remote = Recorder(b, "kill")
    killed = redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")
    assert killed >= 2
    redis_server.command("CLIENT", "KILL", "TYPE", "normal")
    wait_until(lambda: stat(b, "reconnects") >= 1 and subscribed(b), TIMEOUT, "resubscription")
    a.broadcast("kill", "after", {})
    assert remote.wait(1) == [("after", {})]


def test_a_stop_flushes_what_is_queued(nodes):
    a, b = nodes(2)
    remote = Recorder(b, "flush")
    for i in range(50):
        a.broadcast("flush", "n", {"i": i})
    a.stop()
    assert stat(a, "publish_pending") == 0 and stat(a, "publish_dropped") == 0
    remote.wait(50)


# -- the receiving side -------------------------------------------------------------------------


def test_a_slow_local_delivery_drops_at_the_inbox_not_the_redis_connection(nodes, caplog):
    a, b = nodes(2, max_inbox=3)
    release = Event()
    seen: list[int] = []

    def slow(topic: str, event: str, payload: Any, from_: Any) -> None:
        seen.append(payload["i"])
        if payload["i"] == 0:
            release.wait(TIMEOUT)  # holds b's delivery greenlet; the listener must go on reading

    b.connect(slow, "slow")
    for i in range(20):
        a.broadcast("slow", "n", {"i": i})
    wait_until(lambda: stat(b, "receive_dropped") >= 1, TIMEOUT, "inbox drops")
    wait_until(lambda: stat(b, "receive_dropped") + stat(b, "receive_pending") == 19, TIMEOUT, "all 20 read")
    assert subscribed(b)  # never cut off
    assert "inbox full" in caplog.text
    kept = stat(b, "receive_pending")
    assert 1 <= kept <= 3  # the inbox's bound
    release.set()
    a.broadcast("slow", "n", {"i": 100})
    wait_until(lambda: seen and seen[-1] == 100, TIMEOUT, "delivery to resume")
    # What was kept is delivered in order, the rest was dropped and counted.
    assert seen == [0, *range(1, 1 + kept), 100]
    assert stat(b, "receive_dropped") == 19 - kept


class _SettingsOwner:
    """Holds runtime settings for one test (an owner must be weakly referenceable)."""


def test_remote_broadcasts_wait_for_the_high_water_mark_and_drop_on_timeout(nodes):
    a, b = nodes(2)
    remote = Recorder(b, "flow")
    owner = _SettingsOwner()
    runtime.claim(owner, broadcast_timeout=0.2)  # this test's own, until it releases them
    over = flow.high_water + 1
    flow.queued += over  # as if writers held more than the high-water mark
    try:
        # Straight to the adapter: a local broadcast would wait for the same mark.
        a.adapter.publish({"k": "b", "n": a.node_name, "t": "flow", "e": "late", "p": {}, "x": None})
        wait_until(lambda: stat(b, "overload_dropped") == 1, TIMEOUT, "an overload drop")
    finally:
        flow.queued -= over
        runtime.release(owner)
    a.broadcast("flow", "fine", {})
    assert remote.wait(1) == [("fine", {})]


def test_invalid_messages_on_the_channel_are_counted_and_ignored(nodes, redis_server):  # noqa: F811
    a, b = nodes(2)
    remote = Recorder(b, "inv")
    channel = topic_channel(a.adapter.prefix, "inv")
    for junk in (pickle.dumps({"x": 1}), b"phx1\nintruder\n{garbage", b"hello"):
        redis_server.command("PUBLISH", channel, junk)
    a.broadcast("inv", "ok", {})
    assert remote.wait(1) == [("ok", {})]
    assert stat(b, "invalid") == 3


def test_direct_messages_to_a_missing_node_are_counted(nodes):
    (a,) = nodes(1)
    a.send_direct("nobody:1:ff", "svc", {"x": 1})
    wait_until(lambda: stat(a, "direct_unrouted") == 1, TIMEOUT, "an unrouted direct message")


def test_one_redis_server_gone_for_good_never_crashes_the_node(redis_server):  # noqa: F811
    node = PubSub(RedisAdapter(redis_server.url, prefix="gone", backoff=(0.05, 0.1), connect_timeout=0.5))
    redis_server.kill()
    node.start()
    rec = Recorder(node, "gone")
    try:
        for i in range(3):
            node.broadcast("gone", "n", {"i": i})
        wait_until(lambda: stat(node, "outages") >= 1, TIMEOUT, "the failure to be seen")
        assert len(rec.got) == 3 and not node.adapter.connected
    finally:
        node.stop()
    assert stat(node, "publish_dropped") == 3  # stopped with them unsent: counted


def test_a_forked_child_gets_a_new_node_name_and_restarts(nodes):
    a, b = nodes(2)
    remote = Recorder(b, "fork")
    before = a.node_name
    # What os.fork() runs in the child (the at-fork hook); then the gunicorn worker's start-up.
    a.adapter._forked()
    assert a.adapter.node_name != before and a.adapter.stats()["published"] == 0
    a.adapter.ensure_started()
    a.start()
    assert a.node_name == a.adapter.node_name != before
    wait_until(lambda: subscribed(a), TIMEOUT, "the child's subscription")
    a.broadcast("fork", "from-child", {})
    assert remote.wait(1) == [("from-child", {})]
    assert stat(b, "received") == 1
