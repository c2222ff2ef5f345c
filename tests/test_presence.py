"""Presence: tracking, diffs, channel monitors, replication between nodes, phoenix.js's Presence.

Nodes are Endpoints on a MemoryBus (the Redis adapter's wire format, in
one process) with short heartbeat periods; the gunicorn + Redis case is in
test_gunicorn.py. Waits poll with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import itertools
from typing import Any

import gevent
import pytest
from flask import Flask

from phx_gevent import Channel, Endpoint, Presence, Socket, channel, error, ok
from phx_gevent.presence import PresenceCount
from phx_gevent.pubsub.memory import MemoryBus
from phx_gevent.testing import ChannelTest
from tests.servers import wait_until

FAST = {"broadcast_period": 0.05, "down_period": 1.0}
_names = itertools.count(1)


class PresenceChannel(Channel):
    """``presence:*``: tracks the user after the join and pushes the list; pushes drive the rest."""

    def join(self, topic: str, payload: Any, socket: Any):
        if isinstance(payload, dict) and payload.get("track_in_join"):
            # Tracked before the join reply; the join then fails: the presence must not stay.
            socket.handler.presence.track(socket, socket.assigns["user"], {})
            if payload.get("refuse"):
                return error({"reason": "refused"})
        socket.channel_pid.send("after_join")
        return ok()

    def handle_info(self, message: Any, socket: Any):
        if message == "after_join":
            presence = socket.handler.presence
            presence.track(socket, socket.assigns["user"], {"status": "here"})
            self.push(socket, "presence_state", presence.list(socket))
        return None

    def handle_in(self, event: str, payload: Any, socket: Any):
        presence = socket.handler.presence
        if event == "update":
            return ok({"ref": presence.update(socket, socket.assigns["user"], lambda m: {**m, **payload})})
        if event == "untrack":
            return ok({"removed": presence.untrack(socket, payload["key"])})
        if event == "track_other":
            return ok({"ref": presence.track(socket, payload["key"], {}, topic=payload["topic"])})
        if event == "crash":
            raise RuntimeError("crash requested")
        return None


class UserSocket(Socket):
    channels = [channel("presence:*", PresenceChannel)]

    def __init__(self, presence: Presence) -> None:
        self.presence = presence

    def connect(self, params: dict, socket: Any, connect_info: dict):
        return socket.assign(user=params["user"])

    def id(self, socket: Any) -> None:
        return None


class Node:
    """An app with an Endpoint, a Presence and a mounted socket; optionally on a bus."""

    def __init__(self, bus: MemoryBus | None = None, presence_cls: type[Presence] = Presence, **opts: Any) -> None:
        self.app = Flask(f"node{next(_names)}")
        self.endpoint = Endpoint(self.app, pubsub=bus.adapter() if bus is not None else None)
        self.presence = presence_cls(self.endpoint, **{**FAST, **opts})
        self.endpoint.socket("/socket", UserSocket(self.presence))
        self.test = ChannelTest(self.endpoint)

    def join(self, user: str, topic: str = "presence:lobby", payload: Any = None) -> Any:
        ch = self.test.connect({"user": user}).join(topic, payload)
        assert ch.joined, ch.reply
        return ch

    def keys(self, topic: str = "presence:lobby") -> set[str]:
        return set(self.presence.list(topic))

    def close(self) -> None:
        self.presence.close()
        self.endpoint.pubsub.stop()


@pytest.fixture
def cluster():
    """``cluster(n)``: n nodes on one MemoryBus; all closed afterwards."""
    made: list[Node] = []
    bus = MemoryBus()

    def make(n: int = 1, **opts: Any) -> list[Node]:
        nodes = [Node(bus, **opts) for _ in range(n)]
        made.extend(nodes)
        return nodes

    make.bus = bus  # type: ignore[attr-defined]
    yield make
    for node in made:
        node.close()


def diff_of(ch: Any) -> dict[str, Any]:
    return ch.assert_push("presence_diff", timeout=5)


# -- one node -----------------------------------------------------------------------------------


def test_track_pushes_state_and_diffs_reach_the_others():
    node = Node()
    alice = node.join("alice")
    state = alice.assert_push("presence_state")
    assert list(state) == ["alice"]
    [meta] = state["alice"]["metas"]
    assert meta["status"] == "here" and isinstance(meta["phx_ref"], str) and meta["phx_ref"]
    assert diff_of(alice) == {"joins": {"alice": {"metas": [meta]}}, "leaves": {}}

    bob = node.join("bob")
    assert set(bob.assert_push("presence_state")) == {"alice", "bob"}
    joined = diff_of(alice)
    assert list(joined["joins"]) == ["bob"] and joined["leaves"] == {}
    assert node.keys() == {"alice", "bob"}
    # The same key from two connections: two metas under one key.
    node.join("bob")
    assert len(node.presence.list("presence:lobby")["bob"]["metas"]) == 2


def test_update_leaves_the_old_meta_and_joins_the_new_with_phx_ref_prev():
    node = Node()
    alice = node.join("alice")
    old = alice.assert_push("presence_state")["alice"]["metas"][0]
    diff_of(alice)
    ref = alice.push("update", {"status": "away"})
    new_ref = alice.assert_reply(ref)["ref"]
    diff = diff_of(alice)
    assert diff["leaves"] == {"alice": {"metas": [old]}}
    [new] = diff["joins"]["alice"]["metas"]
    assert new == {"status": "away", "phx_ref": new_ref, "phx_ref_prev": old["phx_ref"]}
    assert node.presence.list("presence:lobby")["alice"]["metas"] == [new]


@pytest.mark.parametrize("how", ["leave", "crash", "close", "untrack"])
def test_a_channel_that_ends_or_untracks_leaves(how):
    node = Node()
    watcher = node.join("watcher")
    alice = node.join("alice")
    wait_until(lambda: node.keys() == {"watcher", "alice"}, 5, "both present")
    meta = node.presence.list("presence:lobby")["alice"]["metas"][0]
    diff_of(watcher)  # watcher's own join
    diff_of(watcher)  # alice's
    if how == "leave":
        alice.leave()
    elif how == "crash":
        alice.push("crash")
        alice.assert_error()
    elif how == "close":
        alice.client.close()
    else:
        ref = alice.push("untrack", {"key": "alice"})
        assert alice.assert_reply(ref) == {"removed": True}
        ref = alice.push("untrack", {"key": "alice"})
        assert alice.assert_reply(ref) == {"removed": False}
    assert diff_of(watcher) == {"joins": {}, "leaves": {"alice": {"metas": [meta]}}}
    assert node.keys() == {"watcher"}
    assert node.presence.stats()["local"] == 1


def test_a_failed_join_does_not_leave_a_presence_behind():
    node = Node()
    refused = node.test.connect({"user": "ghost"}).join("presence:lobby", {"track_in_join": True, "refuse": True})
    assert refused.reply.status == "error"
    assert node.keys() == set()
    assert node.presence.stats()["local"] == 0


def test_track_errors_and_other_topics():
    node = Node()
    alice = node.join("alice")
    alice.assert_push("presence_state")
    socket_pid = next(iter(node.presence._owned))
    with pytest.raises(ValueError, match="already tracked"):
        node.presence.track(socket_pid, "alice", {})
    with pytest.raises(TypeError, match="key"):
        node.presence.track(socket_pid, None, {})
    node.presence.track(socket_pid, 42, {})  # converted, as Phoenix's to_string does
    assert "42" in node.keys()
    assert node.presence.untrack(socket_pid, 42)
    with pytest.raises(TypeError, match="meta"):
        node.presence.track(socket_pid, "x", ["not", "a", "dict"])
    with pytest.raises(TypeError):
        node.presence.track(socket_pid, "x", {"bad": object()})
    with pytest.raises(TypeError, match="channel"):
        node.presence.track("not a channel", "x", {})
    with pytest.raises(ValueError, match="not tracked"):
        node.presence.update(socket_pid, "nobody", {})
    # A channel may track on another topic; its subscribers get the diff, and it leaves with the channel.
    other = node.join("bob", "presence:other")
    other.assert_push("presence_state")
    ref = alice.push("track_other", {"key": "alice-elsewhere", "topic": "presence:other"})
    alice.assert_reply(ref)
    wait_until(lambda: "alice-elsewhere" in node.keys("presence:other"), 5, "the other topic")
    alice.leave()
    wait_until(lambda: node.keys("presence:other") == {"bob"}, 5, "alice gone from the other topic")


def test_fetch_adds_data_to_lists_and_diffs():
    class Named(Presence):
        def fetch(self, topic: str, presences: dict[str, Any]) -> dict[str, Any]:
            return {k: {**v, "name": k.upper()} for k, v in presences.items()}

    node = Node(presence_cls=Named)
    alice = node.join("alice")
    assert alice.assert_push("presence_state")["alice"]["name"] == "ALICE"
    assert diff_of(alice)["joins"]["alice"]["name"] == "ALICE"


def test_presence_needs_an_endpoint_and_sane_periods():
    with pytest.raises(TypeError):
        Presence(object())
    with pytest.raises(ValueError):
        Presence(Endpoint(Flask("x")), broadcast_period=1, down_period=1)


# -- several nodes ------------------------------------------------------------------------------


def test_presences_replicate_and_diffs_reach_subscribers_on_other_nodes(cluster):
    a, b = cluster(2)
    watcher = b.join("watcher")
    watcher.assert_push("presence_state")
    diff_of(watcher)
    alice = a.join("alice")
    alice.assert_push("presence_state")
    joined = diff_of(watcher)
    assert list(joined["joins"]) == ["alice"]
    wait_until(lambda: b.keys() == a.keys() == {"alice", "watcher"}, 5, "both nodes see both")
    assert b.presence.list("presence:lobby")["alice"] == a.presence.list("presence:lobby")["alice"]
    # The typed accessors the cluster view reads: what this node tracks, what every node knows.
    assert a.presence.local_counts()["presence:lobby"] == PresenceCount(keys=1, metas=1)
    assert b.presence.known_keys()["presence:lobby"] == {"alice", "watcher"}
    # An update and a leave on a travel too.
    alice.push("update", {"status": "away"})
    diff = diff_of(watcher)
    assert diff["joins"]["alice"]["metas"][0]["status"] == "away" and list(diff["leaves"]) == ["alice"]
    alice.leave()
    assert diff_of(watcher) == {"joins": {}, "leaves": {"alice": {"metas": [diff["joins"]["alice"]["metas"][0]]}}}
    wait_until(lambda: b.keys() == a.keys() == {"watcher"}, 5, "alice gone everywhere")


def test_a_node_started_late_learns_the_state_and_pushes_it_as_diffs(cluster):
    (a,) = cluster(1)
    for user in ("alice", "bob"):
        a.join(user)
    (b,) = cluster(1)
    watcher = b.join("watcher")
    wait_until(lambda: b.keys() == {"alice", "bob", "watcher"}, 5, "b learns a's presences")
    seen: set[str] = set(watcher.assert_push("presence_state"))
    while seen != {"alice", "bob", "watcher"}:
        seen |= set(diff_of(watcher)["joins"])
    wait_until(lambda: a.keys() == {"alice", "bob", "watcher"}, 5, "a learns b's")


def test_lost_updates_are_recovered_from_the_heartbeat(cluster):
    a, b = cluster(2)
    a.join("alice")
    wait_until(lambda: b.keys() == {"alice"}, 5, "b synced")
    # b's inbox overflows: everything from a is dropped for a while (as during a Redis outage).
    b.presence.max_queue = 0
    a.join("bob")
    carol = a.join("carol")
    carol.leave()
    wait_until(lambda: b.presence.dropped >= 2, 5, "b dropped a's updates")
    assert b.keys() == {"alice"}
    b.presence.max_queue = 100_000
    wait_until(lambda: b.keys() == {"alice", "bob"}, 5, "b resynced from a's heartbeat")


def test_a_node_that_goes_silent_is_dropped_after_down_period(cluster):
    a, b, c = cluster(3)
    watcher = b.join("watcher")
    a.join("alice")
    c.join("carol")
    wait_until(lambda: b.keys() == {"watcher", "alice", "carol"}, 5, "b sees everyone")
    # a dies without a word (kill -9): no heartbeat, no "down".
    a.presence._greenlet.kill()
    a.endpoint.pubsub.adapter.stop()
    wait_until(lambda: b.keys() == {"watcher", "carol"}, 5, "b drops a after down_period")
    wait_until(
        lambda: any(
            "alice" in m.payload.get("leaves", {})
            for m in watcher.client.transport.messages()
            if m.event == "presence_diff"
        ),
        5,
        "watcher told that alice left",
    )


def test_a_node_that_closes_cleanly_is_dropped_at_once(cluster):
    # down_period is a minute here: only c's "down" message can make b drop it within the wait.
    b, c = cluster(2, down_period=60.0)
    b.join("watcher")
    c.join("carol")
    wait_until(lambda: b.keys() == {"watcher", "carol"}, 5, "b sees carol")
    c.presence.close()
    wait_until(lambda: b.keys() == {"watcher"}, 5, "b drops c on its down message")


def test_garbage_on_the_presence_topic_is_ignored(cluster):
    a, b = cluster(2)
    a.join("alice")
    wait_until(lambda: b.keys() == {"alice"}, 5, "b synced")
    rogue = cluster.bus.adapter()
    rogue.start(lambda envelope: None)
    topic = "phx_presence:presence"
    bad = [
        ("delta", {"n": "rogue", "v": "x"}),
        ("delta", {"n": 5, "v": 1, "j": "nope"}),
        ("hb", {"v": 1}),
        ("state", {"n": "rogue", "v": 10**30}),
        (
            "delta",
            {
                "n": a.endpoint.node_name,
                "v": 10**18,
                "j": [[1, 2, 3], ["t", "k", {"no": "ref"}]],
                "l": [["t", "k", ["unhashable"]]],
            },
        ),
    ]
    for event, payload in bad:
        rogue.publish({"k": "b", "n": "rogue", "t": topic, "e": event, "p": payload, "x": None})
    rogue.publish(
        {
            "k": "d",
            "n": "rogue",
            "to": b.endpoint.node_name,
            "t": topic + ":state",
            "e": "",
            "p": {"v": 3, "s": [["x"], 7]},
            "x": None,
        }
    )
    b.join("bob")
    wait_until(lambda: a.keys() == b.keys() == {"alice", "bob"}, 5, "still replicating")
    assert b.presence._greenlet is not None and not b.presence._greenlet.dead
    rogue.stop()
    gevent.sleep(0)


# -- phoenix.js ---------------------------------------------------------------------------------


def test_phoenix_js_presence_on_the_example_app(example, js):
    url = example.ws + "/socket"
    cids = {}
    for user in ("alice", "bob"):
        # alice over WebSocket, bob over long-poll
        sid = js.open_socket(url, {"user": user}, longpoll=user == "bob")
        cid = js.channel(sid, "room:presence", {"presence": True})
        js.presence(cid)
        assert js.join(cid)["status"] == "ok"
        cids[user] = cid
    # A client that did not ask for presence gets no presence frames at all.
    plain_sid, plain = js.join_room(url, "plain", "room:presence")
    js.wait_presence(cids["alice"], {"alice", "bob"})
    js.wait_presence(cids["bob"], {"alice", "bob"})
    since = js.mark()
    js.leave(cids["bob"])
    js.wait_presence(cids["alice"], {"alice"}, since=since)
    assert not [e for e in js.events if e.get("channel") == plain and e.get("event", "").startswith("presence")]
    assert not [
        e for e in js.events if e.get("ev") == "frame" and e["socket"] == plain_sid and "presence" in e["msg"]["event"]
    ]


def test_phoenix_js_presence_across_two_nodes(live_server, js, cluster):
    a, b = cluster(2)
    servers = [live_server(a.app), live_server(b.app)]
    cids = {}
    for user, server in zip(("alice", "bob"), servers, strict=True):
        sid = js.open_socket(server.ws + "/socket", {"user": user})
        cid = js.channel(sid, "presence:room")
        js.presence(cid)
        assert js.join(cid)["status"] == "ok"
        cids[user] = (sid, cid)
    for _sid, cid in cids.values():
        js.wait_presence(cid, {"alice", "bob"})
    since = js.mark()
    js.send(cmd="disconnect", socket=cids["bob"][0])
    js.wait_presence(cids["alice"][1], {"alice"}, since=since)


def test_changes_queued_together_go_out_as_one_diff_with_their_net_effect():
    node = Node()
    watcher = node.join("watcher")
    watcher.assert_push("presence_state")
    diff_of(watcher)
    clients = [node.test.connect({"user": f"u{i}"}) for i in range(30)]
    for i, client in enumerate(clients):
        client.join("presence:lobby").assert_push("presence_state")
        assert list(diff_of(watcher)["joins"]) == [f"u{i}"]
    # All 30 connections end without a greenlet switch in between: one diff with 30 leaves.
    for client in clients:
        client.close()
    diff = diff_of(watcher)
    assert diff["joins"] == {} and set(diff["leaves"]) == {f"u{i}" for i in range(30)}
    # Tracked and untracked within one batch: never shown; the rest of the batch is.
    pid = next(iter(node.presence._owned))
    node.presence.track(pid, "blink", {})
    node.presence.untrack(pid, "blink")
    node.presence.track(pid, "stays", {})
    diff = diff_of(watcher)
    assert diff["leaves"] == {} and list(diff["joins"]) == ["stays"]
    assert node.keys() == {"watcher", "stays"}
    watcher.refute_push("presence_diff")


def test_get_by_key_is_the_metas_or_an_empty_list_as_phoenix():
    node = Node()
    alice = node.join("alice")
    alice.assert_push("presence_state")
    found = node.presence.get_by_key("presence:lobby", "alice")
    assert [m["status"] for m in found["metas"]] == ["here"]
    assert node.presence.get_by_key("presence:lobby", "nobody") == []
    assert node.presence.get_by_key("presence:empty", "alice") == []


def test_handle_metas_sees_every_diff_with_the_current_list():
    seen: list[tuple[str, set[str], set[str], set[str]]] = []

    class Watching(Presence):
        def handle_metas(self, topic, joins, leaves, presences):
            seen.append((topic, set(joins), set(leaves), set(presences)))
            if "crash" in joins:
                raise RuntimeError("logged, not fatal")

    node = Node(presence_cls=Watching)
    alice = node.join("alice")
    wait_until(lambda: ("presence:lobby", {"alice"}, set(), {"alice"}) in seen, 5, "alice's join")
    node.join("crash")
    bob = node.join("bob")
    bob.assert_push("presence_state")
    wait_until(lambda: any("bob" in s[1] for s in seen), 5, "bob's join after a failing handle_metas")
    alice.leave()
    wait_until(lambda: ("presence:lobby", set(), {"alice"}, {"crash", "bob"}) in seen, 5, "alice's leave")
