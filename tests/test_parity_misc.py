"""Phoenix parity: ChannelTest helpers, bare replies, leave ordering, drain scope, assign(fn), serializers."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from flask import Flask

from phx_gevent import CLOSED, Channel, Endpoint, Reply, Socket, channel, ok
from phx_gevent.serializers import V2
from phx_gevent.testing import ChannelTest, ConnectRefused
from tests.rawws import RawWS
from tests.servers import wait_until

TERMINATED: list[tuple[str, Any]] = []


class Room(Channel):
    intercept = ["shout"]

    def join(self, topic: str, payload: Any, socket: Any) -> Any:
        return ok({"who": socket.assigns.get("user")})

    def handle_in(self, event: str, payload: Any, socket: Any) -> Any:
        if event == "noop":
            return Reply("noop")
        if event == "bare_ok":
            return Reply("ok")
        if event == "say":
            self.broadcast(socket, "said", payload)
            return ok()
        if event == "silent":
            return None
        if event == "count":
            socket.assign(lambda a: {"count": a.get("count", 0) + 1})
            return ok({"count": socket.assigns["count"]})
        return None

    def handle_out(self, event: str, payload: Any, socket: Any) -> Any:
        self.push(socket, event, {**payload, "seen_by": socket.assigns.get("user")})

    def terminate(self, reason: Any, socket: Any) -> None:
        TERMINATED.append((socket.topic, reason))


class RoomSocket(Socket):
    channels = [channel("room:*", Room)]

    def connect(self, params: dict, socket: Any, connect_info: dict) -> Any:
        return socket.assign(user=params.get("user", "anon"))


def make_endpoint(**opts: Any) -> tuple[Flask, Endpoint]:
    app = Flask(__name__)
    endpoint = Endpoint(app)
    endpoint.socket("/socket", RoomSocket, log=False, **opts)
    return app, endpoint


@pytest.fixture(autouse=True)
def _clear():
    TERMINATED.clear()


# -- ChannelTest helpers -------------------------------------------------------------------------


def test_socket_without_connect_and_subscribe_and_join_with_assert_broadcast():
    _, endpoint = make_endpoint()
    client = ChannelTest(endpoint).socket("user:7", {"user": "ann"})
    assert client.socket.id == "user:7" and client.socket.assigns == {"user": "ann"}
    room = client.subscribe_and_join("room:1")
    assert room.reply.response == {"who": "ann"}
    room.assert_reply(room.push("say", {"text": "hi"}), "ok")
    assert room.assert_broadcast("said") == {"text": "hi"}
    room.assert_push("said", {"text": "hi"})
    endpoint.broadcast("room:1", "said", {"text": "from elsewhere"})
    room.assert_broadcast("said", {"text": "from elsewhere"})
    room.refute_broadcast("said")
    with pytest.raises(AssertionError, match="unexpected 'said' broadcast"):
        endpoint.broadcast("room:1", "said", {"x": 1})
        room.refute_broadcast("said")
    plain = ChannelTest(endpoint).socket().join("room:2")
    with pytest.raises(AssertionError, match="subscribe_and_join"):
        plain.assert_broadcast("said")


def test_broadcast_from_reaches_the_channel_but_not_the_test():
    _, endpoint = make_endpoint()
    room = ChannelTest(endpoint).socket(None, {"user": "bo"}).subscribe_and_join("room:1")
    room.broadcast_from("shout", {"n": 1})
    assert room.assert_push("shout") == {"n": 1, "seen_by": "bo"}  # through handle_out
    room.refute_broadcast("shout")


def test_refute_reply_and_close_one_channel():
    _, endpoint = make_endpoint()
    client = ChannelTest(endpoint).connect({"user": "cy"})
    a, b = client.join("room:a"), client.join("room:b")
    a.refute_reply(a.push("silent"))
    with pytest.raises(AssertionError, match="unexpected reply"):
        a.refute_reply(a.push("noop"))
    a.close()
    assert TERMINATED == [("room:a", CLOSED)]
    assert not a.channel_pid.alive and "room:a" not in client.conn.channels
    a.refute_push("phx_close")  # closing is the connection going away for that channel: no frame
    b.assert_reply(b.push("bare_ok"), "ok", {})  # the other channel is untouched


# -- wire and lifecycle -------------------------------------------------------------------------


def test_a_bare_status_reply_sends_an_empty_object():
    _, endpoint = make_endpoint()
    room = ChannelTest(endpoint).connect().join("room:1")
    assert room.assert_reply(room.push("noop"), "noop") == {}
    raw = [f for f in room.client.transport.frames if '"noop"' in f]
    assert json.loads(raw[0])[4] == {"status": "noop", "response": {}}


def test_bare_replies_through_phoenix_js(live_server, js):
    app, _ = make_endpoint()
    server = live_server(app)
    sid = js.open_socket(server.ws + "/socket")
    cid = js.channel(sid, "room:1")
    js.join(cid)
    assert js.push(cid, "bare_ok")["response"] == {}
    since = js.mark()
    js.push_nowait(cid, "noop")
    frame = js.wait(ev="frame", since=since, pred=lambda e: e["msg"]["event"] == "phx_reply")
    assert frame["msg"]["payload"] == {"status": "noop", "response": {}}


def test_no_broadcast_follows_the_leave_reply_in_process():
    """A broadcast sent the moment the leave reply is written must not reach the client."""
    _, endpoint = make_endpoint()
    client = ChannelTest(endpoint).connect()
    room = client.join("room:1")
    transport = client.transport
    record = transport.record
    leave_ref: list[str] = []

    def hooked(frame: Any) -> None:
        record(frame)
        if isinstance(frame, str) and leave_ref and f'"{leave_ref[0]}","room:1","phx_reply"' in frame:
            endpoint.broadcast("room:1", "late", {})

    transport.record = hooked
    leave_ref.append(room.client.next_ref())
    client.conn.handle(
        client.conn.serializer.decode(json.dumps([room.join_ref, leave_ref[0], "room:1", "phx_leave", {}]))
    )
    room.assert_reply(leave_ref[0], "ok")
    room.assert_close()
    assert [m.event for m in transport.messages() if m.topic == "room:1"][-2:] == ["phx_reply", "phx_close"]
    room.refute_push("late")


def test_no_broadcast_follows_the_leave_reply_on_the_wire(live_server):
    app, endpoint = make_endpoint()
    server = live_server(app)
    ws = RawWS(server.port, "/socket/websocket?vsn=2.0.0")
    ws.send_json(["1", "1", "room:1", "phx_join", {}])
    assert ws.recv_json()[4]["status"] == "ok"
    ws.send_json(["1", "2", "room:1", "phx_leave", {}])
    assert ws.recv_json()[:4] == ["1", "2", "room:1", "phx_reply"]
    endpoint.broadcast("room:1", "late", {})  # right after the client has the reply
    ws.send_json([None, "3", "phoenix", "heartbeat", {}])
    frames = []
    while True:
        frame = ws.recv_json()
        frames.append(frame)
        if frame[3] == "phx_reply" and frame[1] == "3":
            break
    assert [f[3] for f in frames] == ["phx_close", "phx_reply"], frames
    ws.close()


def test_drain_all_drains_only_connections_with_channels(live_server, js, monkeypatch):
    import weakref

    import phx_gevent.endpoint
    from phx_gevent.server import drain_all

    app, endpoint = make_endpoint()
    mount = endpoint.mounts[0]
    server = live_server(app)
    with_channel = js.join_room(server.ws + "/socket", "a", "room:1")[0]
    idle = js.open_socket(server.ws + "/socket", {"user": "b"})
    wait_until(lambda: len(mount.connections) == 2, 10, "2 connections")
    monkeypatch.setattr(phx_gevent.endpoint, "endpoints", weakref.WeakSet([endpoint]))
    server.server.close()
    since = js.mark()
    assert drain_all(time.monotonic() + 10) == 1
    assert js.wait(ev="close", socket=with_channel, since=since)["code"] == 1012
    assert len(mount.connections) == 1 and not next(iter(mount.connections)).channels
    assert not js.find(since=since, ev="close", socket=idle)


# -- smaller -----------------------------------------------------------------------------------


def test_assign_with_a_function_and_a_dict():
    _, endpoint = make_endpoint()
    room = ChannelTest(endpoint).socket(None, {"user": "x"}).join("room:1")
    assert room.assert_reply(room.push("count"), "ok") == {"count": 1}
    assert room.assert_reply(room.push("count"), "ok") == {"count": 2}
    socket = room.socket
    assert socket.assign({"a": 1}).assign(lambda a: {"b": a["a"] + 1}).assigns["b"] == 2
    with pytest.raises(TypeError, match="mapping"):
        socket.assign(lambda a: 3)


def test_the_serializer_list_is_configurable(live_server):
    app, endpoint = make_endpoint(serializers=[V2])
    server = live_server(app)
    assert RawWS(server.port, "/socket/websocket?vsn=1.0.0").status == 403
    ok_ws = RawWS(server.port, "/socket/websocket?vsn=2.0.0")
    assert ok_ws.status == 101
    ok_ws.close()
    with pytest.raises(ConnectRefused):
        ChannelTest(endpoint).connect(vsn="1.0.0")
    with pytest.raises(ValueError, match="vsn"):
        ChannelTest(endpoint).socket(vsn="1.0.0")
    with pytest.raises(TypeError, match="serializers"):
        Endpoint(Flask(__name__)).socket("/s", RoomSocket, serializers=[])


def test_local_broadcast_from_skips_the_sender():
    _, endpoint = make_endpoint()
    a = ChannelTest(endpoint).socket(None, {"user": "a"}).join("room:1")
    b = ChannelTest(endpoint).socket(None, {"user": "b"}).join("room:1")
    endpoint.local_broadcast_from(a.socket, "room:1", "said", {"n": 1})
    assert b.assert_push("said") == {"n": 1}
    a.refute_push("said")
    endpoint.local_broadcast_from(a.channel_pid, "room:1", "shout", {"n": 2})  # a channel_pid works too
    assert b.assert_push("shout") == {"n": 2, "seen_by": "b"}
    a.refute_push("shout")
