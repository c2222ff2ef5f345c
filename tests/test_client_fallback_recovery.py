"""The Python client's long-poll fallback, nested connect params and history recovery.

Each rule first on the protocol core (fake clock, literal frames), then end to
end against a real server in this process.
"""

from __future__ import annotations

import pytest

from phx_gevent import Channel, Socket, channel, ok
from phx_gevent.client import JOINED, Client, LongPollClient, Reply, SocketCore, wire
from phx_gevent.options import ConfigurationError
from tests.servers import wait_until
from tests.test_client_core import Harness
from tests.test_client_core import ok as ok_frame
from tests.test_client_e2e import FAST, TIMEOUT, Events

# -- long-poll fallback (phoenix.js's longPollFallbackMs) -----------------------------------


def test_a_websocket_that_fails_to_open_falls_back_to_long_poll_at_once():
    h = Harness(long_poll_fallback=2.5)
    ch = h.core.channel("room:1")
    ch.join()
    h.core.connect()
    assert h.pump() == [("open",)] and h.core.transport == "websocket"
    assert h.core.fallback_deadline() == h.clock.now + 2.5
    h.core.transport_closed(1006, "connection refused")
    # No backoff: long-poll opens now, and stays the transport (reconnects use it too).
    assert h.pump() == [("open",)] and h.core.transport == "longpoll"
    assert h.core.fallback_deadline() is None
    h.core.transport_opened()
    h.pump()
    join = h.take()[-1]  # (the first join, buffered while connecting, goes out first: phoenix.js's way)
    assert join[2:4] == ["room:1", "phx_join"]
    h.recv(*ok_frame(join[0], join[1]))
    assert ch.state == JOINED
    assert h.tick(100) == [] and h.take() == []  # no heartbeats over long-poll
    h.core.transport_closed(3410, "session_gone")
    assert h.tick(1) == [("open",)] and h.core.transport == "longpoll"


def test_a_websocket_that_opens_but_does_not_answer_its_ping_falls_back():
    h = Harness(long_poll_fallback=2.0)
    h.open()
    (ping,) = h.take()
    assert ping[:4] == [None, ping[1], "phoenix", "heartbeat"]
    assert h.tick(1.9) == []
    assert h.tick(0.2) == [("close", 1000, "falling back to long-poll")]
    h.core.transport_closed(1000, "falling back to long-poll")
    assert h.pump() == [("open",)] and h.core.transport == "longpoll"
    assert not h.core.primary_passed_health_check


def test_an_answered_ping_keeps_the_websocket_and_each_reconnect_may_still_fall_back():
    h = Harness(long_poll_fallback=2.0)
    h.open()
    (ping,) = h.take()
    h.recv(None, ping[1], "phoenix", "phx_reply", {"status": "ok", "response": {}})
    assert h.core.primary_passed_health_check and h.core.fallback_deadline() is None
    assert h.tick(5) == [] and h.core.transport == "websocket"
    h.core.transport_closed(1006, "network")  # an open WebSocket lost: the usual reconnect
    assert h.pump() == [] and h.core.transport == "websocket"
    assert h.tick(0.01) == [("open",)]
    h.core.transport_closed(1006, "refused")  # this attempt did not open: fall back (phoenix.js)
    assert h.pump() == [("open",)] and h.core.transport == "longpoll"


def test_disconnect_cancels_the_fallback():
    h = Harness(long_poll_fallback=2.0)
    h.core.connect()
    h.pump()
    h.core.disconnect()
    h.pump()
    h.core.transport_closed(1000, "")
    assert h.tick(10) == [] and h.core.transport == "websocket"


@pytest.mark.parametrize(
    ("value", "message"),
    [(2500, "2500 seconds.*milliseconds"), (0, "positive number of seconds"), ("2", "number of seconds")],
)
def test_a_fallback_in_milliseconds_is_refused_naming_the_unit(value, message):
    with pytest.raises(ConfigurationError, match=message):
        SocketCore(lambda: 0.0, long_poll_fallback=value)
    with pytest.raises(ConfigurationError, match="'websocket' or 'longpoll'"):
        SocketCore(lambda: 0.0, transport="sse")


# -- nested connect params --------------------------------------------------------------------


def test_connect_params_nest_as_plug_decodes_them():
    from phx_gevent.transports.http import parse_params

    params = {"user": {"id": 7, "tags": ["a", "b"], "admin": True, "none": None}, "rows": [{"x": 1}], "s": "é&="}
    pairs = wire.query_params(params)
    assert pairs == [
        ("user[id]", "7"),
        ("user[tags][]", "a"),
        ("user[tags][]", "b"),
        ("user[admin]", "true"),
        ("rows[0][x]", "1"),
        ("s", "é&="),
    ]
    from urllib.parse import urlencode

    assert parse_params(urlencode(pairs)) == {
        "user": {"id": "7", "tags": ["a", "b"], "admin": "true"},
        "rows": {"0": {"x": "1"}},
        "s": "é&=",
    }
    with pytest.raises(wire.EncodeError):
        wire.query_params({"blob": b"x"})


class EchoChannel(Channel):
    def join(self, topic, payload, socket):
        return ok({"params": socket.assigns["params"], "transport": socket.transport})


class EchoSocket(Socket):
    channels = [channel("echo:*", EchoChannel)]

    def connect(self, params, socket, connect_info):
        params = {k: v for k, v in params.items() if k != "vsn"}
        return socket.assign(params=params)


NESTED = {"user": {"id": 7, "roles": ["admin", "dev"]}, "token": "t/+="}
ARRIVED = {"user": {"id": "7", "roles": ["admin", "dev"]}, "token": "t/+="}


@pytest.mark.parametrize("cls", [Client, LongPollClient])
def test_nested_params_arrive_as_the_object_given(mounted, cls):
    server = mounted(EchoSocket(), longpoll=True)
    client = cls(server.ws + "/socket", params=NESTED, **FAST)
    try:
        client.connect()
        reply = client.channel("echo:1").join().wait()
        assert reply.status == "ok" and reply.response["params"] == ARRIVED
    finally:
        client.close()


def test_the_client_falls_back_to_long_poll_where_websockets_do_not_pass(mounted):
    server = mounted(EchoSocket(), websocket=False, longpoll=True)
    client = Client(server.ws + "/socket", params=NESTED, long_poll_fallback=1.0, **FAST)
    try:
        client.connect()
        room = client.channel("echo:1")
        assert room.join().wait() == Reply("ok", {"params": ARRIVED, "transport": "longpoll"})
        assert client.transport == "longpoll" and client.connected
    finally:
        client.close()


def test_with_websockets_the_fallback_is_not_taken(mounted):
    server = mounted(EchoSocket(), longpoll=True)
    client = Client(server.ws + "/socket", long_poll_fallback=1.0, **FAST)
    try:
        client.connect()
        assert client.channel("echo:1").join().wait().response["transport"] == "websocket"
        wait_until(lambda: client.core.primary_passed_health_check, TIMEOUT, "the ping's answer")
        assert client.transport == "websocket"
    finally:
        client.close()


# -- history recovery (docs/recovery.md) -------------------------------------------------------


def test_recover_sends_since_and_tracks_offsets_from_the_ref_slot():
    h = Harness(heartbeat_interval=0)
    h.open()
    ch = h.core.channel("room:1", lambda: {"presence": True}, recover=True, last=50)
    ch.join()
    h.pump()
    (join,) = h.take()
    assert join[4] == {"presence": True, "since": None, "last": 50}
    h.recv(*ok_frame(join[0], join[1], response={"recovered": True}))
    assert ch.recovered is True and ch.offset is None
    h.recv(None, "kqzrbm4a-1", "room:1", "new_msg", {"n": 1})
    h.recv(None, None, "room:1", "presence_diff", {})  # not kept: no offset
    h.recv(join[0], join[0], "room:1", "phx_error", {})  # phx_* frames carry refs, not offsets
    assert ch.offset == "kqzrbm4a-1"
    h.core.transport_opened()  # (already open: ignored)
    h.tick(1)  # the rejoin after phx_error
    (rejoin,) = h.take()
    assert rejoin[4] == {"presence": True, "since": "kqzrbm4a-1"}
    h.recv(*ok_frame(rejoin[0], rejoin[1], response={"recovered": False}))
    assert ch.recovered is False
    with pytest.raises(TypeError, match="must be a dict"):
        h.core.channel("room:2", ["not", "a", "dict"], recover=True)
    with pytest.raises(ValueError, match="number of messages"):
        h.core.channel("room:2", recover=True, last=0)


@pytest.fixture
def two_clients(example):
    made = [Client(example.ws + "/socket", params={"user": user}, **FAST) for user in ("sam", "rita")]
    for client in made:
        client.connect()
    yield made
    for client in made:
        client.close()


def test_a_client_that_was_away_recovers_exactly_what_it_missed(two_clients):
    sender_client, reader_client = two_clients
    sender = sender_client.channel("room:pyrec")
    assert sender.join().wait().status == "ok"
    for n in range(3):
        assert sender.push("new_msg", {"body": f"before {n}"}).wait().status == "ok"
    reader = reader_client.channel("room:pyrec", {"presence": False}, recover=True, last=2)
    events = Events(reader, "new_msg")
    assert reader.join().wait().response["recovered"] is True
    backlog = events.wait("new_msg", 2)
    assert [p["body"] for _, p, _ in backlog] == ["before 1", "before 2"]
    wait_until(lambda: reader.offset is not None and reader.offset.endswith("-3"), TIMEOUT, "the backlog's offset")
    reader_client.disconnect()
    wait_until(lambda: not reader_client.connected, TIMEOUT, "the disconnect")
    for n in range(2):
        assert sender.push("new_msg", {"body": f"missed {n}"}).wait().status == "ok"
    reader_client.connect()
    got = events.wait("new_msg", 4)
    assert [p["body"] for _, p, _ in got[2:]] == ["missed 0", "missed 1"]
    wait_until(lambda: reader.state == JOINED and reader.recovered is True, TIMEOUT, "recovered")
    assert reader.offset is not None and reader.offset.endswith("-5")
    # An offset the history cannot serve: the join says so, the app refetches.
    reader_client.disconnect()
    wait_until(lambda: not reader_client.connected, TIMEOUT, "the disconnect")
    reader.offset = "zzzzzzzz-1"
    reader_client.connect()
    wait_until(lambda: reader.state == JOINED and reader.recovered is False, TIMEOUT, "recovered: false")
    assert len(events.of("new_msg")) == 4
