"""History units: offsets, configs, the memory store, the two-variant fan-out, and replay/live dedupe.

Plus the Redis store against a private redis-server: the atomic append
script, epochs (flush, reset), the emitter function, and a Redis outage
(delivered without offset, then recovered false across the gap).
"""

from __future__ import annotations

import re
from typing import Any

import gevent
import pytest
from flask import Flask

from phx_gevent import Channel, Endpoint, Socket, channel, ok
from phx_gevent.pubsub import PubSub
from phx_gevent.pubsub import history as h
from phx_gevent.pubsub.local import RecoveryBuffer
from phx_gevent.serializers import V1, V2, FastlaneEncoder
from phx_gevent.testing import ChannelTest
from phx_gevent.transports.websocket import encoder_for
from tests.servers import RedisServer, redis_server, wait_until  # noqa: F401

CFG = h.HistoryConfig.coerce({"size": 5, "ttl": 60, "events": ["new_msg"]})


# -- offsets and configs ----------------------------------------------------------------------


def test_offsets_never_look_like_integers_and_parse_back():
    for _ in range(200):
        epoch = h.new_epoch()
        assert re.fullmatch(r"[a-z][a-z0-9]{7}", epoch)
        offset = h.format_offset(epoch, 17)
        assert not re.fullmatch(r"-?\d+", offset)
        assert h.parse_offset(offset) == (epoch, 17)
    for bad in [None, 17, "17", "", "abc", "a-1", "abcd-0", "abcd-01", "ABCD-1", "abcd-1-2", "9bcd-1", ["x"], "a" * 50]:
        assert h.parse_offset(bad) is None, bad


def test_config_validation():
    assert h.HistoryConfig.coerce(None) is None
    cfg = h.HistoryConfig.coerce({"size": 10, "ttl": 5, "events": ["a"], "max_replay": 50})
    assert cfg.max_replay == 10 and cfg.keeps("a") and not cfg.keeps("b")
    assert h.HistoryConfig.coerce({}).keeps("anything")
    for bad in [{"size": 0}, {"ttl": 0}, {"ttl": -1}, {"size": 10**9}, {"colour": 1}, {"max_replay": 0}]:
        with pytest.raises(ValueError):
            h.HistoryConfig.coerce(bad)
    for bad in [{"events": "new_msg"}, {"events": [1]}, ["size"]]:
        with pytest.raises(TypeError):
            h.HistoryConfig.coerce(bad)


def test_rules_longest_pattern_wins_and_conflicts_are_refused():
    rules = h.HistoryRules()
    big = h.HistoryConfig.coerce({"size": 100})
    rules.add("room:*", CFG)
    rules.add("room:vip:*", big)
    assert rules.for_topic("room:vip:1") == big
    assert rules.for_topic("room:1") == CFG
    assert rules.for_topic("other") is None
    rules.add("room:*", CFG)  # same config again: fine
    with pytest.raises(ValueError):
        rules.add("room:*", big)


# -- the memory store -------------------------------------------------------------------------


def test_memory_store_recovery_rules(monkeypatch):
    store = h.MemoryHistory()
    offsets = [store.append("t", "new_msg", {"i": i}, CFG) for i in range(8)]
    epoch = h.parse_offset(offsets[0])[0]
    assert [h.parse_offset(o) for o in offsets] == [(epoch, i) for i in range(1, 9)]

    def fetch(since: Any, last: int | None = None, has_since: bool = True) -> h.Recovery:
        return store.fetch("t", since, last, CFG, has_since=has_since)

    # Kept: 4..8 (size 5). From 3: 4..8. From 8 (the latest): nothing, recovered.
    r = fetch(offsets[2])
    assert r.recovered and [e.payload["i"] for e in r.entries] == [3, 4, 5, 6, 7]
    assert [e.offset for e in r.entries] == offsets[3:]
    assert fetch(offsets[7]) == h.Recovery(True, [], epoch, 8)
    assert not fetch(offsets[1]).recovered  # 3 is gone
    assert not fetch(h.format_offset(epoch, 9)).recovered  # never existed
    assert not fetch(h.format_offset("zzzzzzzz", 3)).recovered  # another epoch (topic)
    assert not fetch("garbage").recovered and not fetch(5).recovered
    assert fetch(None) == h.Recovery(True, [], epoch, 8)
    assert [e.payload["i"] for e in fetch(None, last=2).entries] == [6, 7]
    assert [e.payload["i"] for e in fetch(None, last=1000, has_since=False).entries] == [3, 4, 5, 6, 7]
    assert fetch(None, has_since=False).entries == []
    # Unknown topic: a first join recovers (nothing to replay), an offset does not.
    assert store.fetch("u", None, None, CFG, has_since=True).recovered
    assert not store.fetch("u", offsets[0], None, CFG, has_since=True).recovered
    # The stored payload is a copy.
    payload = {"i": 99}
    store.append("t", "new_msg", payload, CFG)
    payload["i"] = 0
    assert fetch(None, last=1).entries[0].payload == {"i": 99}
    # TTL: after 61 s nothing is recoverable, and the topic is eventually forgotten.
    now = h._monotonic()
    monkeypatch.setattr(h, "_monotonic", lambda: now + 61)
    assert not fetch(offsets[6]).recovered
    store.append("other", "new_msg", {}, CFG)  # sweeps
    assert "t" not in store.topics
    assert not fetch(offsets[7]).recovered  # a new epoch would follow


def test_max_replay_bounds_one_recovery():
    cfg = h.HistoryConfig.coerce({"size": 10, "ttl": 60, "max_replay": 3})
    store = h.MemoryHistory()
    offsets = [store.append("t", "e", {"i": i}, cfg) for i in range(6)]
    assert store.fetch("t", offsets[2], None, cfg, has_since=True).recovered
    assert not store.fetch("t", offsets[1], None, cfg, has_since=True).recovered


# -- the fan-out ------------------------------------------------------------------------------


class _Counting(FastlaneEncoder):
    __slots__ = ()
    calls: list[str] = []

    def broadcast(self, topic: str, event: str, payload: Any) -> Any:
        self.calls.append("plain")
        return self.serializer.encode_broadcast(topic, event, payload)

    def wrap(self, data: Any) -> Any:
        self.calls.append("ref")
        return data


class _Sub:
    intercept: frozenset[str] = frozenset()

    def __init__(self, encoder: Any, offsets: bool) -> None:
        self.owner = self
        self.offsets = offsets
        self.frames: list[Any] = []
        self.writer = self
        self.encoder = encoder
        self.replayed: tuple[str, int] | None = None

    def write(self, frame: Any) -> None:
        self.frames.append(frame)


def test_dispatch_offset_encodes_two_variants_and_plain_frames_are_unchanged():
    ps = PubSub()
    enc = _Counting.of(V2)
    _Counting.calls.clear()
    subs = [_Sub(enc, offsets=i % 2 == 0) for i in range(10)]
    for s in subs:
        ps.subscribe("t", s)
    ps.local_deliver("t", "new_msg", {"a": 1}, None, "abcdefgh-3")
    assert sorted(_Counting.calls) == ["plain", "ref"]
    plain = V2.encode_broadcast("t", "new_msg", {"a": 1})
    assert plain == '[null,null,"t","new_msg",{"a":1}]'
    for i, s in enumerate(subs):
        assert s.frames == (['[null,"abcdefgh-3","t","new_msg",{"a":1}]'] if i % 2 == 0 else [plain])
    # V1 puts it in "ref"; binary V2 has no ref slot: the same frame as without.
    assert V1.encode_broadcast_ref("t", "e", {}, "abcd-1") == '{"topic":"t","event":"e","payload":{},"ref":"abcd-1"}'
    assert V2.encode_broadcast_ref("t", "e", b"\x01", "abcd-1") == V2.encode_broadcast("t", "e", b"\x01")
    ws = encoder_for(V2)
    assert ws.broadcast_ref("t", "e", {}, "abcd-1") == ws.wrap('[null,"abcd-1","t","e",{}]')


def test_replayed_copies_in_flight_are_dropped_once():
    ps = PubSub()
    sub = _Sub(_Counting.of(V2), offsets=True)
    sub.replayed = ("abcdefgh", 5)
    ps.subscribe("t", sub)
    for seq in (4, 5, 6, 5):
        ps.local_deliver("t", "new_msg", {"s": seq}, None, f"abcdefgh-{seq}")
    # 4 and 5 were replayed already; after 6 the filter is off.
    assert [f.split(",")[1] for f in sub.frames] == ['"abcdefgh-6"', '"abcdefgh-5"']


def test_recovery_buffer_drops_what_the_replay_covered():
    buf = RecoveryBuffer(None)
    buf.add("f3", "abcdefgh-3")
    buf.write("plain")
    buf.add("f4", "abcdefgh-4")
    buf.add("x4", "zzzzzzzz-4")
    out = _Sub(None, True)
    assert buf.flush_into(out, "abcdefgh", 3) == 3
    assert out.frames == ["plain", "f4", "x4"]


# -- replay and live racing, in one process ----------------------------------------------------


class Room(Channel):
    history = {"size": 50, "ttl": 60, "events": ["new_msg"]}

    def join(self, topic: str, payload: Any, socket: Any) -> Any:
        return ok({"hello": 1})


class _Sock(Socket):
    channels = [channel("room:*", Room), channel("plain:*", Room, history=False)]

    def connect(self, params: dict, socket: Any, connect_info: dict) -> Any:
        return socket


def _endpoint(**kwargs: Any) -> Endpoint:
    app = Flask(__name__)
    endpoint = Endpoint(app, **kwargs)
    endpoint.socket("/socket", _Sock, log=False)
    return endpoint


def test_a_live_broadcast_racing_the_replay_is_sent_once_in_order(monkeypatch):
    endpoint = _endpoint()
    for i in range(3):
        endpoint.broadcast("room:1", "new_msg", {"i": i})
    first = endpoint.history("room:1")[0].offset
    real = endpoint.pubsub.fetch_history

    def racing(topic: str, since: Any, last: Any, *, has_since: bool) -> h.Recovery:
        endpoint.broadcast("room:1", "new_msg", {"i": 3})  # before the read: in the replay and live
        result = real(topic, since, last, has_since=has_since)
        endpoint.broadcast("room:1", "new_msg", {"i": 4})  # after the read: live only
        return result

    monkeypatch.setattr(endpoint.pubsub, "fetch_history", racing)
    client = ChannelTest(endpoint).connect({})
    room = client.join("room:1", {"since": first})
    assert room.reply.status == "ok" and room.reply.response == {"hello": 1, "recovered": True}
    wait_until(lambda: len(_msgs(client)) >= 4, 5, "the replay and the live message")
    gevent.sleep(0.05)
    got = _msgs(client)
    assert [m.payload["i"] for m in got] == [1, 2, 3, 4]
    assert [h.parse_offset(m.ref)[1] for m in got] == [2, 3, 4, 5]
    # The join reply comes before every one of them.
    frames = client.transport.messages()
    assert frames[0].event == "phx_reply"


def test_plain_join_and_topics_without_history_are_untouched():
    endpoint = _endpoint()
    client = ChannelTest(endpoint).connect({})
    plain = client.join("plain:1", {"since": None, "last": 5})
    assert plain.reply.response == {"hello": 1}  # no history on this route: since/last mean nothing
    room = client.join("room:2", {})
    assert room.reply.response == {"hello": 1}
    endpoint.broadcast("plain:1", "new_msg", {"x": 1})
    endpoint.broadcast("room:2", "new_msg", {"x": 2})
    endpoint.broadcast("room:2", "other", {"x": 3})
    wait_until(lambda: len(client.transport.frames) >= 5, 5, "three broadcasts")
    assert client.transport.frames[-3:] == [
        '[null,null,"plain:1","new_msg",{"x":1}]',
        '[null,null,"room:2","new_msg",{"x":2}]',
        '[null,null,"room:2","other",{"x":3}]',
    ]
    assert endpoint.history("plain:1") is None
    assert [e.payload for e in endpoint.history("room:2")] == [{"x": 2}]


def _msgs(client: Any) -> list[Any]:
    return [m for m in client.transport.messages() if m.event == "new_msg"]


# -- Redis ------------------------------------------------------------------------------------


def test_redis_append_script_is_atomic_and_the_emitter_gets_offsets(redis_server):  # noqa: F811
    import redis

    client = redis.Redis.from_url(redis_server.url)
    sub = client.pubsub()
    sub.subscribe("phx:t:{room:1}", "phx:t:{lobby}")  # topic routing: one channel per topic
    for _ in range(2):
        wait_until(lambda: sub.get_message(timeout=0.1), 5, "subscribed")
    rules = h.HistoryRules()
    rules.add("room:*", CFG)
    offsets = [h.publish_with_history(client, "phx", "room:1", "new_msg", {"i": i}, rules=rules) for i in range(7)]
    epoch = h.parse_offset(offsets[0])[0]
    assert [h.parse_offset(o) for o in offsets] == [(epoch, i) for i in range(1, 8)]
    assert h.publish_with_history(client, "phx", "room:1", "other", {}, rules=rules) is None
    assert h.publish_with_history(client, "phx", "lobby", "new_msg", {}, rules=rules) is None
    received = []
    while len(received) < 9:
        m = sub.get_message(timeout=2)
        assert m is not None
        if m["type"] == "message":
            received.append(m["data"])
    from phx_gevent.pubsub import codec

    envs = [codec.decode(d) for d in received]
    assert [e.get("o") for e in envs[:7]] == offsets and [e["p"]["i"] for e in envs[:7]] == list(range(7))
    assert "o" not in envs[7] and "o" not in envs[8]
    store = h.RedisHistory(redis_server.url, "phx")
    r = store.fetch("room:1", offsets[2], None, CFG, has_since=True)
    assert r.recovered and [e.offset for e in r.entries] == offsets[3:]
    assert not store.fetch("room:1", offsets[0], None, CFG, has_since=True).recovered  # size 5
    assert [e.payload["i"] for e in store.fetch("room:1", None, 2, CFG, has_since=False).entries] == [5, 6]
    # Rules published by servers are what the emitter reads by default.
    store.publish_rules(rules)
    assert h.load_rules(client, "phx").for_topic("room:9") == CFG
    assert h.parse_offset(h.publish_with_history(client, "phx", "room:1", "new_msg", {"i": 7})) == (epoch, 8)
    # A reset (or a flush) starts a new epoch: old offsets no longer recover.
    store.reset("room:1", CFG)
    assert not store.fetch("room:1", offsets[-1], None, CFG, has_since=True).recovered
    new = h.publish_with_history(client, "phx", "room:1", "new_msg", {"i": 8}, rules=rules)
    assert h.parse_offset(new)[0] != epoch and h.parse_offset(new)[1] == 1
    sub.close()
    client.close()


def test_recoveries_of_one_topic_and_offset_share_one_read(redis_server):  # noqa: F811
    import redis

    client = redis.Redis.from_url(redis_server.url)
    rules = h.HistoryRules()
    rules.add("room:*", CFG)
    offsets = [h.publish_with_history(client, "phx", "room:s", "new_msg", {"i": i}, rules=rules) for i in range(3)]
    store = h.RedisHistory(redis_server.url, "phx")
    jobs = [gevent.spawn(store.fetch, "room:s", offsets[0], None, CFG, has_since=True) for _ in range(50)]
    gevent.joinall(jobs, timeout=10)
    assert all(j.value.recovered and len(j.value.entries) == 2 for j in jobs)
    # The callers of one instant share a read; those arriving while it runs share the next.
    assert store.stats["reads"] <= 2 and store.stats["reads"] + store.stats["coalesced"] == 50
    assert store._rounds == {}
    # Different offsets (and a foreign or too-far one) share a read too; each gets its own part.
    more = [h.publish_with_history(client, "phx", "room:s", "new_msg", {"i": i}, rules=rules) for i in range(3, 8)]
    offsets += more  # 8 kept of which the last 5 (size 5)
    reads = store.stats["reads"]
    sinces = [offsets[7], offsets[5], offsets[3], offsets[2], offsets[0], "zzzzzzzz-4"]
    jobs = [gevent.spawn(store.fetch, "room:s", s, None, CFG, has_since=True) for s in sinces]
    gevent.joinall(jobs, timeout=10)
    answers = [(j.value.recovered, [e.payload["i"] for e in j.value.entries]) for j in jobs]
    assert answers == [(True, []), (True, [6, 7]), (True, [4, 5, 6, 7]), (True, [3, 4, 5, 6, 7]), (False, []),
                       (False, [])]  # fmt: skip
    assert store.stats["reads"] - reads <= 2
    client.close()


def test_redis_outage_delivers_without_offset_and_recovery_across_it_says_false(redis_server):  # noqa: F811
    endpoint = _endpoint(pubsub=redis_server.url)
    adapter = endpoint.pubsub.adapter
    client = ChannelTest(endpoint).connect({})
    room = client.join("room:o", {"since": None})
    assert room.reply.response["recovered"] is True
    endpoint.broadcast("room:o", "new_msg", {"i": 0})
    wait_until(lambda: len(_msgs(client)) == 1, 10, "the first message")
    before = _msgs(client)[0].ref
    assert h.parse_offset(before) is not None
    redis_server.kill()
    wait_until(lambda: not adapter.connected, 15, "the adapter to notice the outage")
    endpoint.broadcast("room:o", "new_msg", {"i": 1})
    wait_until(lambda: len(_msgs(client)) == 2, 10, "the message sent during the outage")
    assert _msgs(client)[1].ref is None  # delivered here, without an offset
    assert endpoint.history("room:o", since=before) is None  # Redis is down: cannot tell
    redis_server.start()
    wait_until(lambda: adapter.connected, 20, "the adapter to reconnect")
    endpoint.broadcast("room:o", "new_msg", {"i": 2})
    # Either the message arrives with an offset of the new epoch, or (when the node's
    # catch-up after the outage saw that Redis lost the history) the channel is told
    # to rejoin with phx_error: never a silent gap.
    errors = lambda: [m for m in client.transport.messages() if m.event == "phx_error"]  # noqa: E731
    wait_until(lambda: len(_msgs(client)) == 3 or errors(), 10, "a message after the outage, or phx_error")
    if not errors():
        assert h.parse_offset(_msgs(client)[2].ref) is not None
    # Whatever Redis kept (here: nothing, it restarted empty), no recovery spans the gap.
    other = ChannelTest(endpoint).connect({})
    late = other.join("room:o", {"since": before})
    assert late.reply.response["recovered"] is False
    assert endpoint.history("room:o", since=before) is None
    endpoint.pubsub.stop()


def test_publisher_outage_with_redis_kept_still_marks_the_gap(redis_server):  # noqa: F811
    # Only this node loses Redis (its connections are killed); Redis keeps the
    # old history, so only the epoch reset stops a recovery across the gap.
    endpoint = _endpoint(pubsub=redis_server.url)
    adapter = endpoint.pubsub.adapter
    client = ChannelTest(endpoint).connect({})
    room = client.join("room:p", {"since": None})
    assert room.reply.response["recovered"] is True
    endpoint.broadcast("room:p", "new_msg", {"i": 0})
    wait_until(lambda: len(_msgs(client)) == 1, 10, "the first message")
    before = _msgs(client)[0].ref
    redis_server.command("CLIENT", "PAUSE", "1500", "WRITE")
    adapter._pub_failed(ConnectionError("simulated"))  # the node believes Redis is down
    endpoint.broadcast("room:p", "new_msg", {"i": 1})
    wait_until(lambda: len(_msgs(client)) == 2, 10, "the message sent meanwhile")
    assert _msgs(client)[1].ref is None
    adapter._pub_conn.disconnect()  # the publisher reconnects and resets the gapped topic's epoch
    wait_until(lambda: adapter.stats()["reconnects"] >= 1 and not adapter._gaps, 20, "the reset")
    endpoint.broadcast("room:p", "new_msg", {"i": 2})
    wait_until(lambda: len([m for m in _msgs(client) if m.ref]) >= 2, 10, "a message after")
    assert endpoint.history("room:p", since=before) is None
    endpoint.pubsub.stop()
