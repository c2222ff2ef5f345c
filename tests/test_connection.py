"""The connection rules of PROTOCOL.md 5.1 and the channel lifecycle, on an in-memory transport."""

from __future__ import annotations

from typing import Any

import gevent
import pytest
from gevent.event import Event

from phx_gevent import (
    CLOSED,
    DISCONNECTED,
    DUPLICATE_JOIN,
    LEFT,
    SHUTDOWN,
    Channel,
    Reply,
    Socket,
    channel,
    error,
    ok,
    reply,
    socket_ref,
    stop,
)
from phx_gevent.serializers import V1
from tests.fakes import make_connection, msg

EVENTS: list[tuple[str, Any]] = []


@pytest.fixture(autouse=True)
def _reset_events():
    EVENTS.clear()
    yield
    EVENTS.clear()


class RoomChannel(Channel):
    intercept = ["shout"]

    def join(self, topic: str, payload: Any, socket: Any):
        if payload.get("refuse"):
            return error({"reason": "nope"})
        if payload.get("crash"):
            raise RuntimeError("join crash")
        if payload.get("bad_return"):
            return {"not": "a reply"}
        if payload.get("push_in_join"):
            self.push(socket, "too_early", {})
        if payload.get("slow"):
            gate = payload["slow"]
            GATES[gate].wait(5)
        if payload.get("after_join"):
            socket.channel_pid.send("after_join")
        return ok({"joined": topic})

    def handle_in(self, event: str, payload: Any, socket: Any):
        if event == "ping":
            return ok(payload)
        if event == "noreply":
            return None
        if event == "crash":
            raise RuntimeError("handle_in crash")
        if event == "stop":
            return stop("normal", ok({"bye": True}))
        if event == "stop_error":
            return stop("boom")
        if event == "bad":
            return 42
        if event == "noop":
            return Reply("noop", {"x": 1})
        if event == "async":
            ref = socket_ref(socket)
            gevent.spawn(reply, ref, ok({"late": True}))
            return None
        if event == "broadcast":
            self.broadcast(socket, payload["event"], payload["payload"])
            return ok()
        if event == "broadcast_from":
            self.broadcast_from(socket, payload["event"], payload["payload"])
            return ok()
        if event == "bad_push":
            self.push(socket, "x", {"v": object()})
            return ok()
        if event == "bad_reply":
            return ok({"v": {1, 2}})
        if event == "slow":
            GATES[payload["gate"]].wait(5)
            return ok({"slow": "done"})
        return error({"reason": "unknown"})

    def handle_out(self, event: str, payload: Any, socket: Any):
        self.push(socket, event, {**payload, "via": "handle_out"})
        return None

    def handle_info(self, message: Any, socket: Any):
        if message == "after_join":
            self.push(socket, "welcome", {"topic": socket.topic})
        return None

    def terminate(self, reason: Any, socket: Any) -> None:
        EVENTS.append(("terminate", socket.topic, reason))


GATES: dict[str, Event] = {}


class UserSocket(Socket):
    channels = [channel("room:*", RoomChannel)]

    def connect(self, params, socket, connect_info):
        return socket.assign(user="u1")

    def id(self, socket):
        return "user_socket:u1"


def join(conn, transport, topic="room:1", ref="1", payload=None) -> list:
    conn.handle(msg(ref, ref, topic, "phx_join", payload or {}))
    return transport.wait_event("phx_reply", ref=ref)


def test_heartbeat_is_answered_on_topic_phoenix_with_null_join_ref():
    conn, t, _ = make_connection(UserSocket)
    conn.handle(msg(None, "5", "phoenix", "heartbeat"))
    assert t.wait_count(1) == [[None, "5", "phoenix", "phx_reply", {"status": "ok", "response": {}}]]


@pytest.mark.parametrize("ref", [0, "0", 7, "abc"])
def test_refs_are_echoed_with_their_json_type(ref):
    conn, t, _ = make_connection(UserSocket)
    conn.handle(msg(None, ref, "phoenix", "heartbeat"))
    frame = t.wait_count(1)[0]
    assert frame[1] == ref and type(frame[1]) is type(ref)


def test_join_to_unmatched_topic_is_refused_with_null_join_ref():
    conn, t, _ = make_connection(UserSocket)
    assert join(conn, t, topic="nowhere:1", ref="3") == [
        None,
        "3",
        "nowhere:1",
        "phx_reply",
        {"status": "error", "response": {"reason": "unmatched topic"}},
    ]


def test_event_for_a_topic_without_channel_is_unmatched_and_leave_is_ok():
    conn, t, _ = make_connection(UserSocket)
    conn.handle(msg("9", "10", "room:1", "new_msg", {}))
    conn.handle(msg("9", "11", "room:1", "phx_leave", {}))
    frames = t.wait_count(2)
    assert frames[0] == [
        None,
        "10",
        "room:1",
        "phx_reply",
        {"status": "error", "response": {"reason": "unmatched topic"}},
    ]
    assert frames[1] == ["9", "11", "room:1", "phx_reply", {"status": "ok", "response": {}}]


def test_join_ok_reply_carries_join_ref_and_response():
    conn, t, _ = make_connection(UserSocket)
    assert join(conn, t) == ["1", "1", "room:1", "phx_reply", {"status": "ok", "response": {"joined": "room:1"}}]
    assert "room:1" in conn.channels


def test_join_without_join_ref_uses_the_ref():
    conn, t, _ = make_connection(UserSocket)
    conn.handle(msg(None, "4", "room:1", "phx_join"))
    assert t.wait_event("phx_reply", ref="4")[0] == "4"
    assert conn.channels["room:1"].join_ref == "4"


def test_join_refused_leaves_no_channel():
    conn, t, _ = make_connection(UserSocket)
    frame = join(conn, t, payload={"refuse": True})
    assert frame[4] == {"status": "error", "response": {"reason": "nope"}}
    assert conn.channels == {}
    # As Phoenix: {:error, reply} stops the channel with :shutdown, which runs terminate.
    assert EVENTS == [("terminate", "room:1", SHUTDOWN)]


@pytest.mark.parametrize("payload", [{"crash": True}, {"bad_return": True}, {"push_in_join": True}])
def test_join_that_raises_or_returns_garbage_is_a_crashed_join(payload):
    conn, t, _ = make_connection(UserSocket)
    assert join(conn, t, payload=payload)[4] == {"status": "error", "response": {"reason": "join crashed"}}
    assert conn.channels == {}
    # A crashed join runs terminate with the exception, as a crashed Phoenix channel process does.
    assert len(EVENTS) == 1 and EVENTS[0][:2] == ("terminate", "room:1") and isinstance(EVENTS[0][2], Exception)


def test_join_timeout_answers_error_and_kills_the_join():
    GATES["t"] = Event()
    conn, t, _ = make_connection(UserSocket, join_timeout=0.2)
    frame = join(conn, t, payload={"slow": "t"})
    assert frame[4] == {"status": "error", "response": {"reason": "join timeout"}}
    GATES["t"].set()
    conn.handle(msg("1", "2", "room:1", "ping", {}))
    assert t.wait_event("phx_reply", ref="2")[4]["response"] == {"reason": "unmatched topic"}
    assert conn.channels == {}


def test_push_reply_and_custom_status():
    conn, t, _ = make_connection(UserSocket)
    join(conn, t)
    conn.handle(msg("1", "2", "room:1", "ping", {"a": [1, "x"]}))
    conn.handle(msg("1", "3", "room:1", "noop", {}))
    assert t.wait_event("phx_reply", ref="2") == [
        "1",
        "2",
        "room:1",
        "phx_reply",
        {"status": "ok", "response": {"a": [1, "x"]}},
    ]
    assert t.wait_event("phx_reply", ref="3")[4] == {"status": "noop", "response": {"x": 1}}


def test_stale_join_ref_is_dropped_and_null_join_ref_accepted():
    conn, t, _ = make_connection(UserSocket)
    join(conn, t)
    conn.handle(msg("old", "2", "room:1", "ping", {}))
    conn.handle(msg("old", "3", "room:1", "phx_leave", {}))
    conn.handle(msg(None, "4", "room:1", "ping", {}))
    t.wait_event("phx_reply", ref="4")
    refs = [f[1] for f in t.decoded()]
    assert "2" not in refs and "3" not in refs
    assert "room:1" in conn.channels


def test_leave_replies_then_closes_and_terminates():
    conn, t, _ = make_connection(UserSocket)
    join(conn, t)
    conn.handle(msg("1", "5", "room:1", "phx_leave", {}))
    close = t.wait_event("phx_close")
    frames = t.decoded()
    assert frames.index(["1", "5", "room:1", "phx_reply", {"status": "ok", "response": {}}]) < frames.index(close)
    assert close == ["1", "1", "room:1", "phx_close", {}]
    assert conn.channels == {}
    assert EVENTS == [("terminate", "room:1", LEFT)]


def test_crash_in_handle_in_sends_phx_error_and_terminates():
    conn, t, _ = make_connection(UserSocket)
    join(conn, t)
    conn.handle(msg("1", "6", "room:1", "crash", {}))
    assert t.wait_event("phx_error") == ["1", "1", "room:1", "phx_error", {"reason": "channel_crash"}]
    assert conn.channels == {}
    assert len(EVENTS) == 1 and isinstance(EVENTS[0][2], RuntimeError)


def test_stop_normal_replies_then_phx_close():
    conn, t, _ = make_connection(UserSocket)
    join(conn, t)
    conn.handle(msg("1", "7", "room:1", "stop", {}))
    close = t.wait_event("phx_close")
    frames = t.decoded()
    assert frames.index(["1", "7", "room:1", "phx_reply", {"status": "ok", "response": {"bye": True}}]) < frames.index(
        close
    )
    assert EVENTS == [("terminate", "room:1", "normal")]


def test_stop_with_an_error_reason_sends_phx_error():
    conn, t, _ = make_connection(UserSocket)
    join(conn, t)
    conn.handle(msg("1", "8", "room:1", "stop_error", {}))
    t.wait_event("phx_error")
    assert EVENTS == [("terminate", "room:1", "boom")]


def test_bad_return_value_crashes_with_a_message_naming_what_was_expected(caplog):
    conn, t, _ = make_connection(UserSocket)
    join(conn, t)
    conn.handle(msg("1", "9", "room:1", "bad", {}))
    t.wait_event("phx_error")
    reason = EVENTS[0][2]
    assert "handle_in must return None, ok(...)/error(...)" in str(reason) and "got 42" in str(reason)


def test_unencodable_push_or_reply_fails_only_that_channel():
    conn, t, _ = make_connection(UserSocket)
    join(conn, t, topic="room:1", ref="1")
    join(conn, t, topic="room:2", ref="2")
    conn.handle(msg("1", "3", "room:1", "bad_push", {}))
    conn.handle(msg("2", "4", "room:2", "bad_reply", {}))
    t.wait(lambda fs: sum(1 for f in fs if f[3] == "phx_error") == 2)
    join(conn, t, topic="room:3", ref="5")
    conn.handle(msg("5", "6", "room:3", "ping", {"still": "works"}))
    assert t.wait_event("phx_reply", ref="6")[4]["response"] == {"still": "works"}


def test_async_reply_from_another_greenlet():
    conn, t, _ = make_connection(UserSocket)
    join(conn, t)
    conn.handle(msg("1", "12", "room:1", "async", {}))
    assert t.wait_event("phx_reply", ref="12") == [
        "1",
        "12",
        "room:1",
        "phx_reply",
        {"status": "ok", "response": {"late": True}},
    ]


def test_after_join_push_comes_after_the_join_reply():
    conn, t, _ = make_connection(UserSocket)
    conn.handle(msg("1", "1", "room:1", "phx_join", {"after_join": True}))
    welcome = t.wait_event("welcome")
    frames = t.decoded()
    assert frames[0][3] == "phx_reply" and frames.index(welcome) == 1
    assert welcome == ["1", None, "room:1", "welcome", {"topic": "room:1"}]


def test_broadcast_fastlane_intercept_and_broadcast_from():
    conn_a, ta, endpoint = make_connection(UserSocket)
    mount_b = endpoint.mounts[0]
    from phx_gevent.connection import Connection
    from phx_gevent.serializers import V2
    from tests.fakes import FakeTransport

    tb = FakeTransport()
    sb = mount_b.new_socket("websocket", V2)
    conn_b = Connection(mount_b, sb, V2, tb)
    conn_b.start()
    join(conn_a, ta)
    join(conn_b, tb)
    endpoint.broadcast("room:1", "news", {"n": 1})
    assert ta.wait_event("news") == [None, None, "room:1", "news", {"n": 1}]
    assert tb.wait_event("news") == [None, None, "room:1", "news", {"n": 1}]
    endpoint.broadcast("room:1", "shout", {"n": 2})
    assert ta.wait_event("shout") == ["1", None, "room:1", "shout", {"n": 2, "via": "handle_out"}]
    conn_a.handle(msg("1", "2", "room:1", "broadcast_from", {"event": "news", "payload": {"n": 3}}))
    tb.wait_event("news", payload={"n": 3})
    ta.wait_event("phx_reply", ref="2")
    assert not [f for f in ta.decoded() if f[3] == "news" and f[4] == {"n": 3}]


def test_broadcast_with_unencodable_payload_raises_and_reaches_nobody():
    conn, t, endpoint = make_connection(UserSocket)
    join(conn, t)
    before = len(t.frames)
    with pytest.raises(TypeError):
        endpoint.broadcast("room:1", "news", {"bad": object()})
    with pytest.raises(TypeError):
        endpoint.broadcast("room:1", "news", ["not", "a", "dict"])
    assert len(t.frames) == before


def test_duplicate_join_replaces_the_channel_and_closes_the_old_one_after_the_new_reply():
    conn, t, _ = make_connection(UserSocket)
    join(conn, t, ref="1")
    old = conn.channels["room:1"]
    conn.handle(msg("2", "2", "room:1", "phx_join", {}))
    close = t.wait_event("phx_close")
    frames = t.decoded()
    assert close == ["1", "1", "room:1", "phx_close", {}]
    assert frames.index(t.wait_event("phx_reply", ref="2")) < frames.index(close)
    assert conn.channels["room:1"] is not old and conn.channels["room:1"].join_ref == "2"
    t.wait(lambda _: EVENTS)
    assert EVENTS == [("terminate", "room:1", DUPLICATE_JOIN)]


def test_too_many_channels_are_refused():
    class Small(UserSocket):
        max_channels = 3

    conn, t, _ = make_connection(Small)
    for i in range(3):
        assert join(conn, t, topic=f"room:{i}", ref=str(i + 1))[4]["status"] == "ok"
    frame = join(conn, t, topic="room:9", ref="9")
    assert frame == [
        "9",
        "9",
        "room:9",
        "phx_reply",
        {"status": "error", "response": {"reason": "too many channels joined"}},
    ]


def test_default_limit_is_100_channels():
    conn, t, _ = make_connection(UserSocket)
    for i in range(100):
        conn.handle(msg(str(i), str(i), f"room:{i}", "phx_join", {}))
    conn.handle(msg("x", "x", "room:x", "phx_join", {}))
    assert t.wait_event("phx_reply", ref="x")[4]["response"] == {"reason": "too many channels joined"}
    assert len(conn.channels) == 100


def test_disconnect_by_socket_id_closes_with_1001_and_channels_terminate_disconnected():
    conn, t, endpoint = make_connection(UserSocket)
    join(conn, t)
    endpoint.broadcast("user_socket:u1", "disconnect", {})
    assert t.closed == (1001, "disconnected")
    endpoint.broadcast("user_socket:u1", "other", {})  # ignored
    conn.terminate()
    t.wait(lambda _: EVENTS)
    assert EVENTS == [("terminate", "room:1", DISCONNECTED)]
    assert [f for f in t.decoded() if f[3] in ("phx_close", "phx_error")] == []


def test_connection_close_terminates_channels_after_their_queued_messages():
    GATES["q"] = Event()
    conn, t, _ = make_connection(UserSocket)
    join(conn, t)
    conn.handle(msg("1", "2", "room:1", "slow", {"gate": "q"}))
    conn.terminate()
    assert EVENTS == []
    GATES["q"].set()
    t.wait(lambda _: EVENTS)
    assert EVENTS == [("terminate", "room:1", CLOSED)]


def test_join_reply_is_never_overtaken_and_no_later_broadcast_is_missed():
    """A broadcaster publishes numbered messages while a slow join completes."""
    GATES["j"] = Event()
    conn, t, endpoint = make_connection(UserSocket)
    sent: list[int] = []

    def broadcaster() -> None:
        for n in range(400):
            endpoint.broadcast("room:1", "tick", {"n": n})
            sent.append(n)
            gevent.sleep(0)

    joiner = gevent.spawn(conn.handle, msg("1", "1", "room:1", "phx_join", {"slow": "j", "after_join": True}))
    pub = gevent.spawn(broadcaster)
    gevent.sleep(0)
    GATES["j"].set()
    gevent.joinall([joiner, pub], timeout=10)
    frames = t.wait(lambda fs: fs if any(f[3] == "tick" for f in fs) else None)
    assert frames[0][3] == "phx_reply", frames[:3]
    ticks = [f[4]["n"] for f in frames if f[3] == "tick"]
    assert ticks == list(range(ticks[0], 400)), "a broadcast after the join reply was missed or reordered"
    welcome = next(i for i, f in enumerate(frames) if f[3] == "welcome")
    assert welcome > 0


def test_v1_serializer_replies_have_no_join_ref():
    conn, t, _ = make_connection(UserSocket, serializer=V1)
    conn.handle(msg(None, "1", "room:1", "phx_join", {}))
    frames = t.wait_count(1)
    assert frames[0] == {
        "topic": "room:1",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {"joined": "room:1"}},
        "ref": "1",
    }


def test_handle_info_via_channel_pid_and_subscribe_to_other_topics():
    received: list[Any] = []

    class InfoChannel(Channel):
        def join(self, topic, payload, socket):
            socket.endpoint.subscribe("other:topic", socket)
            return ok()

        def handle_info(self, message, socket):
            received.append(message)
            self.push(socket, "info", {"event": message.event})

    class S(Socket):
        channels = [channel("info:*", InfoChannel)]

    conn, t, endpoint = make_connection(S)
    conn.handle(msg("1", "1", "info:1", "phx_join", {}))
    t.wait_event("phx_reply", ref="1")
    endpoint.broadcast("other:topic", "ping", {"x": 1})
    assert t.wait_event("info")[4] == {"event": "ping"}
    assert received[0].topic == "other:topic" and received[0].payload == {"x": 1}
    conn.terminate()
    assert endpoint.pubsub.subscriber_count("other:topic") == 0


def test_unsubscribed_topics_are_forgotten():
    conn, t, endpoint = make_connection(UserSocket)
    join(conn, t)
    assert endpoint.pubsub.subscriber_count("room:1") == 1
    conn.handle(msg("1", "2", "room:1", "phx_leave", {}))
    t.wait_event("phx_close")
    conn.terminate()
    assert "room:1" not in endpoint.pubsub.topics
    assert "user_socket:u1" not in endpoint.pubsub.topics


class FloodSocket(UserSocket):
    max_mailbox = 5
    mailbox_timeout = 0.3


def test_a_client_flood_is_pushed_back_on_not_buffered():
    GATES["flood"] = Event()
    conn, t, _ = make_connection(FloodSocket)
    join(conn, t)
    conn.handle(msg("1", "s", "room:1", "slow", {"gate": "flood"}))

    def reader():
        for i in range(20):
            conn.handle(msg("1", str(i), "room:1", "ping", {"i": i}))

    g = gevent.spawn(reader)
    t.wait(lambda _: len(conn.channels["room:1"].mailbox) >= 5)
    for _ in range(100):  # let every other greenlet run: a runaway reader would overfill now
        gevent.sleep(0)
    assert not g.ready() and len(conn.channels["room:1"].mailbox) <= 5
    GATES["flood"].set()
    g.join(timeout=5)
    assert g.successful()
    t.wait(lambda fs: all(any(f[1] == str(i) for f in fs) for i in range(20)))


def test_a_flood_the_channel_never_drains_overloads_the_connection():
    from phx_gevent.errors import ConnectionOverloaded

    GATES["stuck"] = Event()
    conn, t, _ = make_connection(FloodSocket)
    join(conn, t)
    conn.handle(msg("1", "s", "room:1", "slow", {"gate": "stuck"}))
    with pytest.raises(ConnectionOverloaded):
        for i in range(20):
            conn.handle(msg("1", str(i), "room:1", "ping", {}))
    GATES["stuck"].set()


def test_server_side_mailbox_overflow_ends_the_channel_with_phx_error():
    GATES["out"] = Event()

    class SlowOut(RoomChannel):
        def handle_out(self, event, payload, socket):
            GATES["out"].wait(5)

    class S(FloodSocket):
        channels = [channel("room:*", SlowOut)]

    conn, t, endpoint = make_connection(S)
    join(conn, t)
    for i in range(10):
        endpoint.broadcast("room:1", "shout", {"i": i})
    t.wait_event("phx_error")
    GATES["out"].set()
    assert conn.channels == {}


def test_channel_workers_are_reused_and_idle_ones_let_go(monkeypatch):
    from phx_gevent.channels import pool

    monkeypatch.setattr(pool, "TRIM_PERIOD", 0.05)
    conn, t, _ = make_connection(UserSocket, partitions=1)
    partition = conn.partition
    for i in range(5):
        join(conn, t, topic=f"room:{i}", ref=f"j{i}")
    for n in range(3):
        for i in range(5):
            conn.handle(msg(f"j{i}", f"p{n}{i}", f"room:{i}", "ping", {}))
        t.wait(lambda fs, n=n: all(any(f[1] == f"p{n}{i}" for f in fs) for i in range(5)))
    assert len(partition.pool) <= 5  # 20 runs (joins and pings), at most 5 workers ever
    assert partition.stats()["idle"] >= 1
    t.wait(lambda _: partition.stats()["idle"] == 0 and len(partition.pool) == 0)
    conn.handle(msg("j0", "again", "room:0", "ping", {"still": 1}))
    assert t.wait_event("phx_reply", ref="again")[4]["response"] == {"still": 1}
