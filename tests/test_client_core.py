"""The Python client's protocol core against literal frames (PROTOCOL.md), with a fake clock and no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from phx_gevent.client import (
    CLOSED,
    ERRORED,
    JOINED,
    JOINING,
    Presence,
    SocketCore,
    reconnect_after,
    rejoin_after,
    sync_diff,
    sync_state,
    wire,
)
from phx_gevent.serializers import V2

# -- the wire ------------------------------------------------------------------------------


def test_binary_frames_match_the_vectors_of_protocol_md():
    # C->S push with join_ref "12", ref "123", topic "topic", event "event", payload "efg".
    assert (
        wire.encode("12", "123", "topic", "event", b"efg") == bytes.fromhex("0002030505") + b"12123topicevent" + b"efg"
    )
    # S->C push (no ref), reply, broadcast.
    push = wire.decode(bytes.fromhex("00020505") + b"12topicevent" + b"efg")
    assert (push.join_ref, push.ref, push.topic, push.event, push.payload) == ("12", None, "topic", "event", b"efg")
    reply = wire.decode(bytes.fromhex("0102030502") + b"12123topicok" + b"efg")
    assert (reply.join_ref, reply.ref, reply.topic, reply.event) == ("12", "123", "topic", "phx_reply")
    assert reply.payload == {"status": "ok", "response": b"efg"}
    bcast = wire.decode(bytes.fromhex("020505") + b"topicevent" + b"efg")
    assert (bcast.join_ref, bcast.ref, bcast.topic, bcast.event, bcast.payload) == (
        None,
        None,
        "topic",
        "event",
        b"efg",
    )


def test_text_frames_are_v2_arrays():
    assert json.loads(wire.encode(None, "1", "phoenix", "heartbeat", {})) == [None, "1", "phoenix", "heartbeat", {}]
    msg = wire.decode('["3","3","room:1","phx_reply",{"status":"ok","response":{}},"extra"]')
    assert (msg.join_ref, msg.ref, msg.topic, msg.event, msg.payload) == (
        "3",
        "3",
        "room:1",
        "phx_reply",
        {"status": "ok", "response": {}},
    )
    for bad in ("{}", "[1,2,3]", "not json", '[null,null,1,"e",{}]', b"", b"\x07abc", bytes.fromhex("0005") + b"ab"):
        with pytest.raises(wire.DecodeError):
            wire.decode(bad)
    with pytest.raises(wire.EncodeError):
        wire.encode("1", "2", "t" * 256, "e", b"x")


def test_the_client_wire_is_the_mirror_of_the_server_serializer():
    for payload in ({"a": [1, "é/"]}, b"\x00\xffbin"):
        assert V2.decode(wire.encode("7", "8", "room:1", "ev", payload)).payload == payload
        pushed = wire.decode(V2.encode_push("7", "room:1", "ev", payload))
        assert (pushed.join_ref, pushed.ref, pushed.event, pushed.payload) == ("7", None, "ev", payload)
        cast = wire.decode(V2.encode_broadcast("room:1", "ev", payload))
        assert (cast.join_ref, cast.ref, cast.payload) == (None, None, payload)
        rep = wire.decode(V2.encode_reply("7", "8", "room:1", "ok", payload))
        assert (rep.join_ref, rep.ref, rep.payload) == ("7", "8", {"status": "ok", "response": payload})


# -- the state machine ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_timers_run_in_deadline_order_and_a_key_holds_one_timer():
    from phx_gevent.client.timers import Backoff, Timers

    clock = Clock()
    timers = Timers(clock)
    ran: list[str] = []
    timers.set("a", 2.0, lambda: ran.append("a"))
    timers.set("b", 1.0, lambda: ran.append("b"))
    timers.set("a", 3.0, lambda: ran.append("a2"))  # replaces the first "a"
    timers.set("c", 0.5, lambda: ran.append("c"))
    timers.cancel("c")
    assert timers.next_deadline() == clock.now + 1.0 and timers.deadline("a") == clock.now + 3.0
    assert timers.pop_due() is None  # nothing due yet
    clock.now += 5
    while (callback := timers.pop_due()) is not None:
        callback()
    assert ran == ["b", "a2"] and timers.next_deadline() is None and "a" not in timers
    backoff = Backoff(timers, "r", lambda: None, lambda tries: float(tries))
    backoff.schedule_timeout()
    backoff.schedule_timeout()
    assert backoff.pending and timers.deadline("r") == clock.now + 2.0
    backoff.reset()
    assert not backoff.pending and backoff.tries == 0


class Harness:
    """A SocketCore with a fake clock; ``sent`` holds decoded frames as lists."""

    def __init__(self, **options: Any) -> None:
        self.clock = Clock()
        self.core = SocketCore(self.clock, **options)
        self.sent: list[Any] = []
        self.closes: list[tuple[Any, Any]] = []
        self.opens = 0

    def pump(self) -> list[tuple[Any, ...]]:
        other = []
        for action in self.core.take_actions():
            if action[0] == "send":
                data = action[1]
                self.sent.append(data if isinstance(data, bytes) else json.loads(data))
            else:
                other.append(action)
        return other

    def open(self) -> None:
        self.core.connect()
        assert self.pump() == [("open",)]
        self.core.transport_opened()
        self.pump()

    def recv(self, *frame: Any) -> None:
        self.core.receive(json.dumps(list(frame)))
        self.pump()

    def tick(self, seconds: float) -> list[tuple[Any, ...]]:
        self.clock.now += seconds
        self.core.advance()
        return self.pump()

    def take(self) -> list[Any]:
        sent, self.sent = self.sent, []
        return sent

    def joining(self, topic: str = "room:1") -> tuple[Any, list[Any]]:
        """A channel whose join was just sent (no reply yet), and that join frame."""
        ch = self.core.channel(topic)
        ch.join()
        self.pump()
        (join,) = self.take()
        return ch, join

    def joined(self, topic: str = "room:1") -> Any:
        ch = self.core.channel(topic, {"p": 1})
        ch.join()
        self.pump()
        (join,) = self.take()
        assert join[2:] == [topic, "phx_join", {"p": 1}] and join[0] == join[1]
        self.recv(join[0], join[1], topic, "phx_reply", {"status": "ok", "response": {}})
        assert ch.state == JOINED
        return ch


def ok(jr: Any, ref: Any, topic: str = "room:1", response: Any = None) -> list[Any]:
    return [jr, ref, topic, "phx_reply", {"status": "ok", "response": {} if response is None else response}]


def test_join_push_and_reply_use_phoenix_refs():
    h = Harness()
    h.open()
    ch = h.core.channel("room:1")
    replies: list[Any] = []
    ch.join().receive("ok", replies.append)
    h.pump()
    assert h.take() == [["1", "1", "room:1", "phx_join", {}]]
    h.recv(*ok("1", "1", response={"user": "a"}))
    assert replies == [{"user": "a"}] and ch.state == JOINED and ch.join_ref == "1"
    outcome: list[Any] = []
    ch.push("ping", {"a": 1}).receive("ok", outcome.append).receive_any(lambda s, r: outcome.append(s))
    h.pump()
    assert h.take() == [["1", "2", "room:1", "ping", {"a": 1}]]
    h.recv(*ok("1", "2", response={"a": 1}))
    assert outcome == [{"a": 1}, "ok"]
    # A binary payload goes as a kind-0 binary frame with join_ref and ref.
    ch.push("blob", b"\x01\x02")
    h.pump()
    assert h.take() == [bytes((0, 1, 1, 6, 4)) + b"13room:1blob\x01\x02"]


def test_events_with_a_stale_join_ref_are_dropped_broadcasts_are_not():
    h = Harness()
    h.open()
    ch = h.joined()
    got: list[Any] = []
    ch.on("new_msg", lambda payload, ref, join_ref: got.append((payload, join_ref)))
    h.recv(None, None, "room:1", "new_msg", {"n": 1})  # broadcast: no join_ref
    h.recv(ch.join_ref, None, "room:1", "new_msg", {"n": 2})  # push of this join
    h.recv("999", None, "room:1", "new_msg", {"n": 3})  # an earlier join: stale
    h.recv(None, None, "room:2", "new_msg", {"n": 4})  # another topic
    assert got == [({"n": 1}, ch.join_ref), ({"n": 2}, ch.join_ref)]


def test_heartbeat_every_interval_from_the_reply_and_timeout_closes_and_reconnects():
    h = Harness(heartbeat_interval=30.0)
    h.open()
    assert h.tick(29.9) == [] and h.take() == []
    h.tick(0.1)
    (hb,) = h.take()
    assert hb == [None, hb[1], "phoenix", "heartbeat", {}]
    h.tick(5)
    h.recv(None, hb[1], "phoenix", "phx_reply", {"status": "ok", "response": {}})
    # The next one is 30 s after the reply, not after the send.
    h.tick(29.9)
    assert h.take() == []
    h.tick(0.1)
    (hb2,) = h.take()
    assert hb2[3] == "heartbeat"
    # Unanswered at the next tick: close 1000 "heartbeat timeout", then reconnect.
    assert h.tick(30) == [("close", 1000, "heartbeat timeout")]
    h.core.transport_closed(1000, "heartbeat timeout")
    assert h.pump() == []
    assert h.tick(0.01) == [("open",)]


def test_reconnect_follows_phoenix_js_backoff_and_resets_once_open():
    assert [reconnect_after(n) for n in range(1, 12)] == [0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 5.0]
    assert [rejoin_after(n) for n in range(1, 6)] == [1.0, 2.0, 5.0, 10.0, 10.0]
    h = Harness()
    h.core.connect()
    assert h.pump() == [("open",)]
    delays = []
    for _ in range(11):
        h.core.transport_closed(1006, "refused")  # the attempt failed
        delays.append(round(h.core.next_deadline() - h.clock.now, 3))
        assert h.tick(delays[-1]) == [("open",)]
    assert delays == [0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 5.0]
    h.core.transport_opened()
    h.core.transport_closed(1001, "disconnected")
    assert round(h.core.next_deadline() - h.clock.now, 3) == 0.01


def test_join_errors_rejoin_with_backoff_forever():
    h = Harness(heartbeat_interval=0)
    h.open()
    ch = h.core.channel("room:secret")
    ch.join()
    h.pump()
    gaps = []
    for _ in range(5):
        (join,) = h.take()
        h.recv(join[0], join[1], "room:secret", "phx_reply", {"status": "error", "response": {"reason": "no"}})
        assert ch.state == ERRORED
        gap = h.core.next_deadline() - h.clock.now
        gaps.append(gap)
        h.tick(gap)
        assert ch.state == JOINING
    assert gaps == [1.0, 2.0, 5.0, 10.0, 10.0]


def test_phx_error_rejoins_with_a_new_join_ref_and_phx_close_is_final():
    h = Harness(heartbeat_interval=0)
    h.open()
    ch = h.joined()
    old = ch.join_ref
    errors: list[Any] = []
    ch.on_error(lambda payload, ref, jr: errors.append(payload))
    h.recv(old, old, "room:1", "phx_error", {"reason": "channel_crash"})
    assert ch.state == ERRORED and errors == [{"reason": "channel_crash"}]
    assert h.tick(0.99) == [] and h.take() == []
    h.tick(0.01)
    (join,) = h.take()
    assert join[3] == "phx_join" and join[0] == join[1] != old
    h.recv(*ok(join[0], join[1]))
    assert ch.state == JOINED
    # A late phx_close of the old join is stale; the current one closes the channel for good.
    h.recv(old, old, "room:1", "phx_close", {})
    assert ch.state == JOINED
    h.recv(ch.join_ref, ch.join_ref, "room:1", "phx_close", {})
    assert ch.state == CLOSED and ch not in h.core.channels
    assert h.tick(60) == [] and [f for f in h.take() if f[3] == "phx_join"] == []


def test_pushes_wait_for_the_join_and_expired_ones_are_never_sent():
    h = Harness(heartbeat_interval=0, timeout=10.0)
    h.open()
    ch, join = h.joining()
    outcomes: list[Any] = []
    ch.push("early", {"n": 1}, timeout=2.0).receive("timeout", lambda r: outcomes.append("early timeout"))
    ch.push("late", {"n": 2}).receive("ok", lambda r: outcomes.append("late ok"))
    h.pump()
    assert h.take() == []  # buffered while joining
    h.tick(2.0)
    assert outcomes == ["early timeout"]
    h.recv(*ok(join[0], join[1]))
    (late,) = h.take()  # only the one still in time, with a fresh ref
    assert late[2:] == ["room:1", "late", {"n": 2}] and late[0] == join[0] and int(late[1]) > int(join[1])
    h.recv(*ok(join[0], late[1]))
    assert outcomes == ["early timeout", "late ok"]


def test_a_join_timeout_leaves_that_join_then_rejoins():
    h = Harness(heartbeat_interval=0, timeout=10.0)
    h.open()
    ch, join = h.joining()
    h.tick(10.0)
    (leave,) = h.take()
    assert leave == [join[0], leave[1], "room:1", "phx_leave", {}]
    assert ch.state == ERRORED
    h.tick(1.0)
    (rejoin,) = h.take()
    assert rejoin[3] == "phx_join" and rejoin[0] != join[0]


def test_a_lost_connection_errors_channels_buffers_frames_and_rejoins_at_once_on_open():
    h = Harness(heartbeat_interval=0)
    h.open()
    ch = h.joined()
    h.core.transport_closed(1006, "gone")
    assert ch.state == ERRORED
    ch.push("while_down", {"x": 1})
    h.pump()
    assert h.take() == []
    assert h.tick(0.01) == [("open",)]
    h.core.transport_opened()
    h.pump()
    (rejoin,) = h.take()  # no backoff on open
    assert rejoin[3] == "phx_join"
    h.recv(*ok(rejoin[0], rejoin[1]))
    (push,) = h.take()
    assert push[2:] == ["room:1", "while_down", {"x": 1}] and push[0] == rejoin[0]


def test_socket_frames_made_while_disconnected_go_first_on_open():
    h = Harness(heartbeat_interval=0)
    ch = h.core.channel("room:1")
    ch.join()  # before any connection: buffered by the socket
    h.core.connect()
    assert h.pump() == [("open",)]
    assert h.take() == []
    h.core.transport_opened()
    h.pump()
    assert [f[3] for f in h.take()] == ["phx_join"]


def test_leave_and_disconnect():
    h = Harness(heartbeat_interval=0)
    h.open()
    ch = h.joined()
    closed: list[Any] = []
    ch.on_close(lambda *a: closed.append(a))
    ch.leave()
    h.pump()
    (leave,) = h.take()
    assert leave == [ch.join_ref, leave[1], "room:1", "phx_leave", {}]
    # As phoenix.js: the channel is "leaving", so it cannot push, so the leave counts as done at once.
    assert ch.state == CLOSED and closed and ch not in h.core.channels
    h.recv(*ok(ch.join_ref, leave[1]))  # the server's reply changes nothing
    # Joining the same topic again with a new channel leaves any open instance first.
    a = h.joined("room:2")
    b = h.core.channel("room:2")
    b.join()
    h.pump()
    assert [f[3] for f in h.take()] == ["phx_leave", "phx_join"]
    assert a.state == CLOSED and b.state == JOINING
    # disconnect(): a clean close and no reconnection.
    h.core.disconnect()
    assert h.pump() == [("close", 1000, "")]
    h.core.transport_closed(1000, "")
    assert h.tick(60) == []
    with pytest.raises(RuntimeError):
        b.join()


def test_disconnect_during_the_handshake_wins():
    h = Harness()
    h.core.connect()
    assert h.pump() == [("open",)]
    h.core.disconnect()
    assert h.pump() == [("close", 1000, "")]
    h.core.transport_opened()  # the handshake finished anyway: ignored
    assert not h.core.connected
    h.core.transport_closed(1000, "")
    assert h.core.state == "closed" and h.tick(60) == []
    h.core.connect()  # and a later connect() works again
    assert h.pump() == [("open",)]


# -- presence ------------------------------------------------------------------------------


def meta(ref: str, **extra: Any) -> dict[str, Any]:
    return {"phx_ref": ref, **extra}


def test_presence_state_and_diffs_follow_phoenix_js():
    events: list[Any] = []

    def on_join(key: str, current: Any, joined: Any) -> None:
        events.append(("join", key, current is None, [m["phx_ref"] for m in joined["metas"]]))

    def on_leave(key: str, current: Any, left: Any) -> None:
        events.append(("leave", key, [m["phx_ref"] for m in current["metas"]], [m["phx_ref"] for m in left["metas"]]))

    before = {"a": {"metas": [meta("1")]}, "b": {"metas": [meta("2")]}}
    snapshot = {"a": {"metas": [meta("1"), meta("3")]}, "c": {"metas": [meta("4")]}}
    state = sync_state(before, snapshot, on_join, on_leave)
    assert before == {"a": {"metas": [meta("1")]}, "b": {"metas": [meta("2")]}}  # untouched
    assert state == {"a": {"metas": [meta("1"), meta("3")]}, "c": {"metas": [meta("4")]}}
    assert events == [("join", "a", False, ["3"]), ("join", "c", True, ["4"]), ("leave", "b", [], ["2"])]
    # An update is a join and a leave of the same key in one diff (phx_ref_prev).
    diff = {
        "joins": {"a": {"metas": [meta("5", phx_ref_prev="3", status="away")]}},
        "leaves": {"a": {"metas": [meta("3")]}},
    }
    state = sync_diff(state, diff)
    assert state["a"]["metas"] == [meta("1"), meta("5", phx_ref_prev="3", status="away")]
    state = sync_diff(state, {"joins": {}, "leaves": {"c": {"metas": [meta("4")]}, "zz": {"metas": [meta("9")]}}})
    assert list(state) == ["a"]


def test_presence_holds_diffs_until_the_state_of_the_current_join():
    h = Harness(heartbeat_interval=0)
    h.open()
    ch = h.core.channel("room:1")
    presence = Presence(ch)
    syncs: list[Any] = []
    presence.on_sync(lambda: syncs.append(presence.list(lambda key, p: (key, len(p["metas"])))))
    ch.join()
    h.pump()
    (join,) = h.take()
    h.recv(*ok(join[0], join[1]))
    h.recv(None, None, "room:1", "presence_diff", {"joins": {"b": {"metas": [meta("2")]}}, "leaves": {}})
    assert syncs == []  # held: no presence_state for this join yet
    h.recv(join[0], None, "room:1", "presence_state", {"a": {"metas": [meta("1")]}})
    assert syncs == [[("a", 1), ("b", 1)]]
    h.recv(None, None, "room:1", "presence_diff", {"joins": {}, "leaves": {"a": {"metas": [meta("1")]}}})
    assert syncs[-1] == [("b", 1)]
