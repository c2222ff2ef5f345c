"""End to end: the real phoenix.js client (Node + ws) against the example app over WebSocket."""

from __future__ import annotations

import gevent
import gevent.event
from flask import Flask

from phx_gevent import Channel, Endpoint, Socket, channel, ok
from tests import httpclient as http
from tests.jsclient import b64, unb64

FAST = {"reconnectAfterMs": 50, "rejoinAfterMs": 50}


def url(server) -> str:
    return server.ws + "/socket"


def test_join_push_reply_and_welcome_after_the_join_reply(example, js):
    sid, cid = js.join_room(url(example), "alice", "room:lobby")
    welcome = js.wait(ev="chan", channel=cid, event="welcome")
    assert welcome["payload"] == {"user": "alice", "node": example.endpoint.node_name}
    # The socket-level "frame" event of a message follows its channel event.
    js.wait(ev="frame", socket=sid, pred=lambda e: e["msg"]["event"] == "welcome")
    frames = [e["msg"] for e in js.find(ev="frame", socket=sid) if e["msg"]["topic"] == "room:lobby"]
    assert frames[0]["event"] == "phx_reply" and frames[0]["payload"]["response"] == {"user": "alice"}
    assert frames[1]["event"] == "welcome"
    reply = js.push(cid, "ping", {"n": [1, "two", None], "nested": {"é": "/"}})
    assert reply["status"] == "ok" and reply["response"] == {"n": [1, "two", None], "nested": {"é": "/"}}


def test_new_msg_broadcasts_to_every_client_and_validates_the_body(example, js):
    _, alice = js.join_room(url(example), "alice", "room:1")
    _, bob = js.join_room(url(example), "bob", "room:1")
    assert js.push(alice, "new_msg", {"body": "hello", "extra": 1})["status"] == "ok"
    got = js.wait(ev="chan", channel=bob, event="new_msg")
    assert got["payload"] == {"user": "alice", "body": "hello"}
    js.wait(ev="chan", channel=alice, event="new_msg")
    for bad in [{}, {"body": ""}, {"body": 5}, {"body": "x" * 2001}, "text", [1]]:
        reply = js.push(alice, "new_msg", bad)
        assert (reply["status"], reply["response"]) == ("error", {"reason": "invalid body"}), bad


def test_intercepted_announce_goes_through_handle_out_per_client(example, js):
    _, alice = js.join_room(url(example), "alice", "room:2")
    _, bob = js.join_room(url(example), "bob", "room:2")
    resp = http.post(example.http + "/broadcast", {"topic": "room:2", "event": "announce", "payload": {"text": "hi"}})
    assert resp.status == 204
    assert js.wait(ev="chan", channel=alice, event="announce")["payload"] == {"text": "hi", "to": "alice"}
    assert js.wait(ev="chan", channel=bob, event="announce")["payload"] == {"text": "hi", "to": "bob"}


def test_binary_push_gets_a_binary_reply_with_the_same_bytes(example, js):
    _, cid = js.join_room(url(example), "alice", "room:bin")
    data = bytes(range(256)) * 3
    reply = js.push(cid, "ping", b64(data))
    assert reply["status"] == "ok" and unb64(reply["response"]) == data


def test_binary_broadcast_reaches_the_client_as_an_arraybuffer(example, js):
    sid, cid = js.join_room(url(example), "alice", "room:bin2")
    example.endpoint.broadcast("room:bin2", "blob", b"\x00\x01\xff")
    got = js.wait(ev="chan", channel=cid, event="blob")
    assert unb64(got["payload"]) == b"\x00\x01\xff"


def test_refused_join_and_unmatched_topic(example, js):
    sid = js.open_socket(url(example), {"user": "alice"})
    secret = js.join(js.channel(sid, "room:secret"))
    assert (secret["status"], secret["response"]) == ("error", {"reason": "unauthorized"})
    nowhere = js.join(js.channel(sid, "nowhere:1"))
    assert (nowhere["status"], nowhere["response"]) == ("error", {"reason": "unmatched topic"})


def test_refused_connect_never_opens(example, js):
    since = js.mark()
    sid = js.socket(url(example), {"user": ""}, **FAST)
    js.wait(ev="error", socket=sid, since=since)
    js.wait(ev="close", socket=sid, since=since)
    assert not js.find(since=since, ev="open", socket=sid)


def test_heartbeats_are_answered(example, js):
    sid = js.open_socket(url(example), {"user": "alice"}, heartbeatIntervalMs=100)
    for _ in range(3):
        js.wait(ev="frame", socket=sid, pred=lambda e: e["msg"]["topic"] == "phoenix", since=js.mark())
    frame = js.find(ev="frame", socket=sid)[-1]["msg"]
    assert frame["event"] == "phx_reply" and frame["join_ref"] is None
    assert frame["payload"] == {"status": "ok", "response": {}}
    assert not js.find(ev="close", socket=sid)


def test_leave_replies_ok_then_closes_the_channel(example, js):
    _, cid = js.join_room(url(example), "alice", "room:3")
    assert js.leave(cid)["status"] == "ok"
    js.wait(ev="chan_close", channel=cid)


def test_crash_sends_phx_error_and_the_client_rejoins(example, js):
    sid, cid = js.join_room(url(example), "alice", "room:4", **FAST)
    since = js.mark()
    js.push_nowait(cid, "crash")
    js.wait(ev="chan_error", channel=cid, since=since)
    error_frame = js.wait(ev="frame", socket=sid, since=since, pred=lambda e: e["msg"]["event"] == "phx_error")
    assert error_frame["msg"]["payload"] == {"reason": "channel_crash"}
    # phoenix.js rejoins on its own; the new join gets a new join_ref and a fresh welcome.
    rejoin = js.wait(
        ev="frame",
        socket=sid,
        since=since,
        timeout=15,
        pred=lambda e: e["msg"]["event"] == "phx_reply" and e["msg"]["payload"]["status"] == "ok",
    )
    assert rejoin["msg"]["join_ref"] != error_frame["msg"]["join_ref"]
    js.wait(ev="chan", channel=cid, event="welcome", since=js.index_of(rejoin))
    assert js.push(cid, "ping", {"alive": True})["response"] == {"alive": True}


def test_stop_replies_then_phx_close_and_no_rejoin(example, js):
    sid, cid = js.join_room(url(example), "alice", "room:5", **FAST)
    since = js.mark()
    assert js.push(cid, "stop")["status"] == "ok"
    js.wait(ev="chan_close", channel=cid, since=since)
    close = js.wait(ev="frame", socket=sid, since=since, pred=lambda e: e["msg"]["event"] == "phx_close")
    assert close["msg"]["join_ref"] == close["msg"]["ref"]
    # A heartbeat round trip later, no rejoin was attempted.
    js.send(cmd="ping", socket=sid, req="hb")
    js.wait(ev="pong", req="hb")
    assert not [
        e
        for e in js.find(since=since, ev="frame", socket=sid)
        if e["msg"]["event"] == "phx_reply"
        and e["msg"]["topic"] == "room:5"
        and e["msg"]["ref"] != close["msg"]["ref"]
        and e["msg"]["payload"].get("response") == {"user": "alice"}
    ]


def test_auth_token_travels_in_the_subprotocol(live_server, js):
    class TokenSocket(Socket):
        channels = [channel("t:*", type("C", (Channel,), {"join": lambda self, t, p, s: ok(s.assigns)}))]

        def connect(self, params, socket, connect_info):
            if connect_info.get("auth_token") != "s3cr3t+/token":
                return None
            return socket.assign(token=connect_info["auth_token"])

    app = Flask(__name__)
    endpoint = Endpoint(app)
    endpoint.socket("/socket", TokenSocket, auth_token=True)
    server = live_server(app)
    sid = js.open_socket(server.ws + "/socket", authToken="s3cr3t+/token")
    assert js.join(js.channel(sid, "t:1"))["response"] == {"token": "s3cr3t+/token"}
    since = js.mark()
    bad = js.socket(server.ws + "/socket", authToken="wrong", **FAST)
    js.wait(ev="close", socket=bad, since=since)
    assert not js.find(since=since, ev="open", socket=bad)


def test_join_reply_comes_before_any_broadcast_and_none_after_it_is_missed(example, js):
    sid = js.open_socket(url(example), {"user": "alice"})
    stop = gevent.event.Event()
    sent = []

    def hammer():
        n = 0
        while not stop.is_set():
            example.endpoint.broadcast("room:race", "tick", {"n": n})
            sent.append(n)
            n += 1
            gevent.sleep(0.001)

    g = gevent.spawn(hammer)
    try:
        cid = js.channel(sid, "room:race")
        assert js.join(cid)["status"] == "ok"
        js.wait(
            ev="chan",
            channel=cid,
            event="tick",
            pred=lambda e: e["payload"]["n"] >= sent[-1] - 1 if sent else False,
            since=js.mark(),
        )
    finally:
        stop.set()
        g.join(timeout=5)
    last = sent[-1]
    js.wait(ev="frame", socket=sid, pred=lambda e: e["msg"]["event"] == "tick" and e["msg"]["payload"]["n"] == last)
    frames = [e["msg"] for e in js.find(ev="frame", socket=sid) if e["msg"]["topic"] == "room:race"]
    assert frames[0]["event"] == "phx_reply", frames[:3]
    ticks = [f["payload"]["n"] for f in frames if f["event"] == "tick"]
    assert ticks == list(range(ticks[0], last + 1))
    welcome = next(i for i, f in enumerate(frames) if f["event"] == "welcome")
    assert welcome > 0


def test_disconnect_by_socket_id_closes_1001_and_the_client_reconnects(example, js):
    sid, cid = js.join_room(url(example), "alice", "room:6", **FAST)
    other_sid, other = js.join_room(url(example), "bob", "room:6", **FAST)
    since = js.mark()
    resp = http.post(example.http + "/disconnect", {"user": "alice"})
    assert resp.status == 204
    close = js.wait(ev="close", socket=sid, since=since)
    assert close["code"] == 1001
    js.wait(ev="open", socket=sid, since=since)
    rejoin = js.wait(
        ev="frame",
        socket=sid,
        since=since,
        pred=lambda e: e["msg"]["event"] == "phx_reply" and e["msg"]["topic"] == "room:6",
    )
    assert rejoin["msg"]["payload"] == {"status": "ok", "response": {"user": "alice"}}
    assert not js.find(since=since, ev="close", socket=other_sid)
    assert not [
        e for e in js.find(since=since, ev="frame", socket=sid) if e["msg"]["event"] in ("phx_close", "phx_error")
    ]
