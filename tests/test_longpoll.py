"""The long-poll transport (PROTOCOL.md section 4): HTTP-level checks and the real phoenix.js LongPoll client.

HTTP tests speak the wire format by hand (statuses, headers, limits, token
locations, preflight, origin, expiry). End-to-end tests drive phoenix.js in
Node with ``transport: LongPoll`` (or ``longPollFallbackMs``), against the
example app and small apps of their own, including two nodes joined by a
MemoryBus behind a round-robin proxy (no sticky sessions).
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import time
from collections import Counter
from typing import Any
from urllib.parse import urlencode

import gevent
import pytest
from flask import Flask
from gevent import pywsgi

from phx_gevent import DISCONNECTED, DRAINING, INACTIVE, LEFT, Channel, Endpoint, Socket, channel, error, ok
from phx_gevent.flow import flow
from phx_gevent.pubsub.memory import MemoryBus
from phx_gevent.transports.longpoll import BINARY_REFUSED, DEFAULTS
from tests.jsclient import b64, unb64
from tests.servers import wait_until

FAST = {"reconnectAfterMs": 50, "rejoinAfterMs": 50}
NDJSON = {"Content-Type": "application/x-ndjson"}


# -- a small app of our own -----------------------------------------------------------------


class Record:
    """What the server saw, for assertions: terminate reasons and connect_info."""

    def __init__(self) -> None:
        self.terminated: list[tuple[str, Any]] = []
        self.connect_info: list[dict[str, Any]] = []


class RoomChannel(Channel):
    def join(self, topic, payload, socket):
        if topic == "room:slow":
            gevent.sleep(payload["seconds"])  # a join that takes longer than the POST window
        return ok({"user": socket.assigns["user"]})

    def handle_in(self, event, payload, socket):
        if event == "echo":
            return ok(payload)
        if event == "size":
            # Binary from the client arrives as bytes.
            return ok({"type": type(payload).__name__, "size": len(payload)})
        if event == "bin_reply":
            return ok(b"\x01\x02")
        if event == "bin_push":
            self.push(socket, "blob", b"\x00\x01")
            self.push(socket, "after_blob", {})
            return ok({})
        return error({"reason": "unknown"})

    def terminate(self, reason, socket):
        socket.endpoint.record.terminated.append((socket.assigns["user"], reason))


class UserSocket(Socket):
    channels = [channel("room:*", RoomChannel)]

    def connect(self, params, socket, connect_info):
        user = params.get("user")
        if not isinstance(user, str) or not user:
            return None
        socket.endpoint.record.connect_info.append(connect_info)
        return socket.assign(user=user)

    def id(self, socket):
        return "user_socket:" + socket.assigns["user"]


_names = itertools.count()


def make_app(secret: str | None = "test-secret", pubsub: Any = None, **socket_opts: Any) -> tuple[Flask, Endpoint]:
    """A Flask app with ``/socket`` served by UserSocket; ``socket_opts`` go to ``endpoint.socket``."""
    app = Flask(f"lp_test_{next(_names)}")
    if secret is not None:
        app.config["SECRET_KEY"] = secret
    endpoint = Endpoint(app, pubsub=pubsub)
    endpoint.record = Record()
    socket_opts.setdefault("longpoll", {"window_ms": 1000})
    endpoint.socket("/socket", UserSocket, **socket_opts)
    return app, endpoint


def longpoll_of(endpoint: Endpoint) -> Any:
    return endpoint.mounts[0].longpoll


# -- raw HTTP -------------------------------------------------------------------------------


class Resp:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        assert self.status == 200, (self.status, self.body)
        assert self.headers["content-type"] == "application/json; charset=utf-8"
        return json.loads(self.body)


class LP:
    """A hand-driven long-poll client for one server."""

    def __init__(self, server: Any, params: dict[str, str] | None = None, path: str = "/socket/longpoll") -> None:
        self.port = server.port
        self.path = path
        self.params = {"user": "bob", "vsn": "2.0.0"} if params is None else params
        self.token: str | None = None

    def request(
        self,
        method: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
        query: dict[str, str] | None = None,
        timeout: float = 15.0,
    ) -> Resp:
        params = dict(self.params if query is None else query)
        if token is not None:
            params["token"] = token
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, f"{self.path}?{urlencode(params)}", body=body, headers=headers or {})
            resp = conn.getresponse()
            return Resp(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def open(self) -> str:
        data = self.request("GET").json()
        assert data["status"] == 410 and data["messages"] == [], data
        self.token = data["token"]
        return self.token

    def poll(self, **kw: Any) -> dict[str, Any]:
        return self.request("GET", token=self.token, **kw).json()

    def post(self, *lines: str, **kw: Any) -> Resp:
        return self.request("POST", "\n".join(lines).encode(), NDJSON, token=self.token, **kw)

    def poll_frames(self) -> list[list[Any]]:
        data = self.poll()
        assert data["status"] == 200, data
        return [json.loads(m) for m in data["messages"]]

    def collect(self, count: int, timeout: float = 10.0) -> list[list[Any]]:
        """Poll until ``count`` frames arrived."""
        frames: list[list[Any]] = []
        deadline = time.monotonic() + timeout
        while len(frames) < count:
            assert time.monotonic() < deadline, f"got only {frames}"
            data = self.poll()
            assert data["status"] in (200, 204), data
            frames += [json.loads(m) for m in data["messages"]]
        return frames


def join_line(topic: str = "room:1", ref: str = "1") -> str:
    return json.dumps([ref, ref, topic, "phx_join", {}])


# -- HTTP: statuses and headers ---------------------------------------------------------------


def test_session_creation_poll_and_post_statuses_and_headers(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 500})
    lp = LP(live_server(app))
    resp = lp.request("GET")
    assert resp.status == 200
    assert resp.headers["cache-control"] == "no-store"
    assert resp.headers["access-control-allow-origin"] == "*"
    created = resp.json()
    assert created["status"] == 410 and isinstance(created["token"], str) and created["messages"] == []
    lp.token = created["token"]
    # Nothing buffered: the poll is held for window_ms, then 204 with the same token.
    empty = lp.poll()
    assert empty == {"status": 204, "token": lp.token, "messages": []}
    # A POST is acknowledged with 200; replies come with the next poll, never in the POST response.
    posted = lp.post(join_line(), json.dumps(["1", "2", "room:1", "echo", {"a": "/é"}]))
    assert posted.json() == {"status": 200}
    assert posted.headers["cache-control"] == "no-store"
    frames = lp.collect(2)
    assert frames == [
        ["1", "1", "room:1", "phx_reply", {"status": "ok", "response": {"user": "bob"}}],
        ["1", "2", "room:1", "phx_reply", {"status": "ok", "response": {"a": "/é"}}],
    ]
    # Socket-level rules as on a WebSocket: heartbeat, unmatched topic, stale join_ref.
    lp.post(
        json.dumps([None, "3", "phoenix", "heartbeat", {}]),
        json.dumps([None, "4", "nowhere", "echo", {}]),
        json.dumps(["stale", "5", "room:1", "echo", {}]),
        json.dumps(["1", "6", "room:1", "echo", {"n": 6}]),
    ).json()
    assert [f[1] for f in lp.collect(3)] == ["3", "4", "6"]


def test_token_is_accepted_from_the_header_and_the_query_param(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 500})
    lp = LP(live_server(app))
    token = lp.open()
    via_header = lp.request("POST", join_line().encode(), {**NDJSON, "X-Phoenix-Longpoll-Token": token})
    assert via_header.json() == {"status": 200}
    data = lp.request("GET", headers={"X-Phoenix-Longpoll-Token": token}).json()
    assert data["status"] == 200 and data["token"] == token
    assert json.loads(data["messages"][0])[3] == "phx_reply"
    assert len(longpoll_of(endpoint).sessions) == 1


def test_bad_expired_or_dead_tokens(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 30_000, "max_age": 1})
    server = live_server(app)
    lp = LP(server)
    token = lp.open()
    # A token that does not verify: GET starts a new session, POST is 410.
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert lp.request("POST", join_line().encode(), NDJSON, token=forged).json() == {"status": 410}
    fresh = lp.request("GET", token=forged).json()
    assert fresh["status"] == 410 and fresh["token"] not in (token, forged)
    # A token signed with another SECRET_KEY is just as invalid.
    other_app, _ = make_app(secret="another-secret")
    other = LP(live_server(other_app)).open()
    assert lp.request("POST", join_line().encode(), NDJSON, token=other).json() == {"status": 410}
    # An expired token (max_age 1 s; itsdangerous counts whole seconds).
    wait_until(lambda: lp.request("POST", b"", NDJSON, token=token).json()["status"] == 410, 5, "token expiry")


def test_refused_connect_and_bad_vsn_are_403(live_server):
    app, endpoint = make_app()
    server = live_server(app)
    assert LP(server, {"vsn": "2.0.0"}).request("GET").json() == {"status": 403}
    assert LP(server, {"user": "bob", "vsn": "3.0.0"}).request("GET").json() == {"status": 403}
    assert LP(server, {"user": "bob", "vsn": "2.1.0"}).request("GET").json() == {"status": 403}
    assert not longpoll_of(endpoint).sessions


def test_origin_check_runs_first_even_for_preflight(live_server):
    app, endpoint = make_app(check_origin=["//good.example"])
    lp = LP(live_server(app))
    for method in ("GET", "POST", "OPTIONS"):
        resp = lp.request(method, headers={"Origin": "https://evil.example"})
        assert resp.json() == {"status": 403}, method
        assert resp.headers["access-control-allow-origin"] == "*"
    ok_resp = lp.request("GET", headers={"Origin": "https://good.example"}).json()
    assert ok_resp["status"] == 410


def test_cors_preflight_and_other_methods(live_server):
    app, endpoint = make_app()
    lp = LP(live_server(app))
    pre = lp.request("OPTIONS", headers={"Access-Control-Request-Headers": "content-type, x-phoenix-longpoll-token"})
    assert pre.status == 200 and pre.body == b""
    assert pre.headers["access-control-allow-headers"] == "content-type, x-phoenix-longpoll-token"
    assert pre.headers["access-control-allow-methods"] == "get, post, options"
    assert pre.headers["access-control-max-age"] == "3600"
    assert pre.headers["access-control-allow-origin"] == "*"
    for method in ("PUT", "DELETE", "PATCH"):
        resp = lp.request(method)
        assert resp.status == 400 and resp.body == b"", method
    assert not longpoll_of(endpoint).sessions


def test_auth_token_header_reaches_connect_info(live_server):
    app, endpoint = make_app(auth_token=True, connect_info=["user_agent"])
    lp = LP(live_server(app))
    lp.request("GET", headers={"X-Phoenix-AuthToken": "s3cr3t", "User-Agent": "lp-test"}).json()
    assert endpoint.record.connect_info[-1] == {"auth_token": "s3cr3t", "user_agent": "lp-test"}


def test_option_validation():
    with pytest.raises(ValueError, match="unknown longpoll option"):
        make_app(longpoll={"windowms": 10})
    for bad in ({"window_ms": 0}, {"max_lines": -1}, {"max_age": "x"}, {"path": "longpoll"}, {"max_sessions": True}):
        with pytest.raises(ValueError):
            make_app(longpoll=bad)
    with pytest.raises(ValueError, match="connect_info"):
        make_app(longpoll={"connect_info": ["cookies"]})
    assert DEFAULTS["window_ms"] == 10_000 and DEFAULTS["pubsub_timeout_ms"] == 2_000
    assert DEFAULTS["max_age"] == 1_209_600 and DEFAULTS["max_lines"] == 100


# -- HTTP: POST bodies --------------------------------------------------------------------------


def test_binary_lines_from_the_client_and_binary_replies(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 500})
    lp = LP(live_server(app))
    lp.open()
    # Kind 0 push: join_ref "1", ref "2", topic "room:1", event "size", payload 5 bytes.
    frame = bytes([0, 1, 1, 6, 4]) + b"1" + b"2" + b"room:1" + b"size" + b"\x00\xff\x10\x20\x30"
    lp.post(join_line(), base64.b64encode(frame).decode()).json()
    frames = lp.collect(2)
    assert frames[1] == ["1", "2", "room:1", "phx_reply", {"status": "ok", "response": {"type": "bytes", "size": 5}}]
    # A binary reply becomes an error reply for the same ref.
    lp.post(json.dumps(["1", "3", "room:1", "bin_reply", {}])).json()
    assert lp.collect(1) == [["1", "3", "room:1", "phx_reply", {"status": "error", "response": BINARY_REFUSED}]]
    # A binary push is not sent (the next JSON push is).
    lp.post(json.dumps(["1", "4", "room:1", "bin_push", {}])).json()
    frames = lp.collect(2)
    assert [f[3] for f in frames] == ["after_blob", "phx_reply"]


def test_legacy_content_type_is_one_text_frame_and_crlf_is_accepted(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 500})
    lp = LP(live_server(app))
    lp.open()
    assert lp.request("POST", join_line().encode(), {"Content-Type": "text/plain"}, token=lp.token).json() == {
        "status": 200
    }
    lp.collect(1)
    body = json.dumps(["1", "2", "room:1", "echo", {}]) + "\r\n" + json.dumps(["1", "3", "room:1", "echo", {}])
    resp = lp.request("POST", body.encode(), {"Content-Type": "application/x-ndjson; charset=utf-8"}, token=lp.token)
    assert resp.json() == {"status": 200}
    assert [f[1] for f in lp.collect(2)] == ["2", "3"]


def test_undecodable_lines_are_a_plain_400_and_end_the_session(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 500})
    lp = LP(live_server(app))
    for bad in ("not base64 !!", json.dumps({"topic": "v1 object"}), "[1, 2]", base64.b64encode(b"\x07junk").decode()):
        lp.open()
        resp = lp.post(join_line(), bad)
        assert resp.status == 400 and resp.headers["content-type"].startswith("text/plain"), bad
        assert lp.token is not None
        wait_until(lambda: not longpoll_of(endpoint).sessions, 5, "session end")
        assert lp.post(join_line()).json() == {"status": 410}


def test_post_not_acknowledged_within_the_window_is_408(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 1000})
    lp = LP(live_server(app))
    lp.open()
    slow = json.dumps(["1", "1", "room:slow", "phx_join", {"seconds": 1.5}])
    after = json.dumps(["1", "2", "room:slow", "echo", {}])
    assert lp.post(slow, after).json() == {"status": 408}
    # The join still completes (its reply comes with a poll); the line after it was never processed.
    frames = lp.collect(1)
    assert frames == [["1", "1", "room:slow", "phx_reply", {"status": "ok", "response": {"user": "bob"}}]]
    assert lp.poll()["status"] == 204


# -- HTTP: limits ---------------------------------------------------------------------------------


def test_body_size_limit_is_a_plain_413(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 500, "max_body_bytes": 1000})
    lp = LP(live_server(app))
    lp.open()
    big = json.dumps(["1", "2", "room:1", "echo", {"x": "y" * 2000}])
    resp = lp.post(big)
    assert resp.status == 413 and not resp.body.startswith(b"{")
    # The session is still usable.
    assert lp.post(join_line()).json() == {"status": 200}


def test_lines_past_max_lines_are_dropped(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 500, "max_lines": 3})
    lp = LP(live_server(app))
    lp.open()
    lines = [join_line()] + [json.dumps(["1", str(i), "room:1", "echo", {"i": i}]) for i in range(2, 8)]
    assert lp.post(*lines).json() == {"status": 200}
    frames = lp.collect(3)
    assert [f[1] for f in frames] == ["1", "2", "3"]
    assert lp.poll()["status"] == 204


def test_max_sessions_is_a_plain_503(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 500, "max_sessions": 2})
    server = live_server(app)
    for lp in (LP(server), LP(server)):
        lp.open()
        lp.poll()  # sessions that polled are never evicted to make room (see test_reliability.py)
    resp = LP(server).request("GET")
    assert resp.status == 503 and not resp.body.startswith(b"{")
    assert len(longpoll_of(endpoint).sessions) == 2


def test_buffer_is_bounded_and_counted_in_flow_control(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 500, "max_buffer_bytes": 5000})
    lp = LP(live_server(app))
    lp.open()
    (session,) = longpoll_of(endpoint).sessions.values()
    # No greenlet switch between these lines: the deltas are exact.
    before = flow.queued
    # A frame is buffered as its JSON string literal in UTF-8: the quotes count.
    session.send("x" * 998)
    session.send("y" * 998)
    assert flow.queued - before == 2000 and session.qbytes == 2000
    data = lp.poll()
    assert data["messages"] == ["x" * 998, "y" * 998]
    assert session.qbytes == 0
    # Past max_buffer_bytes the session ends (the client reconnects) and its bytes are released.
    before = flow.queued
    session.send("z" * 3000)
    session.send("z" * 3000)
    assert session.closed and flow.queued == before
    assert lp.poll()["status"] == 410  # a new session: the client's token is dead


# -- HTTP: session lifetime -----------------------------------------------------------------------


def test_inactive_session_expires_and_channels_terminate(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 300})
    lp = LP(live_server(app), {"user": "idle", "vsn": "2.0.0"})
    lp.open()
    lp.post(join_line()).json()
    lp.collect(1)
    # Expiry comes 1.5-3 windows after the last poll (15-30 s with the default window).
    wait_until(lambda: endpoint.record.terminated, 10, "terminate")
    assert endpoint.record.terminated == [("idle", INACTIVE)]
    assert not longpoll_of(endpoint).sessions and not endpoint.mounts[0].connections
    assert lp.post(join_line()).json() == {"status": 410}


def test_polling_keeps_a_session_alive(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 250})
    lp = LP(live_server(app))
    lp.open()
    session = next(iter(longpoll_of(endpoint).sessions.values()))
    deadline = time.monotonic() + 1.25  # five windows
    while time.monotonic() < deadline:
        assert lp.poll()["status"] == 204
    assert not session.closed


def test_a_held_poll_is_answered_at_once_when_the_session_ends(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 30_000})
    lp = LP(live_server(app), {"user": "held", "vsn": "2.0.0"})
    lp.open()
    lp.post(join_line()).json()
    assert lp.poll()["status"] == 200
    held = gevent.spawn(lp.poll, timeout=20)
    session = next(iter(longpoll_of(endpoint).sessions.values()))
    wait_until(lambda: session.waiter is not None, 5, "the poll to be held")
    endpoint.broadcast("user_socket:held", "disconnect", {})
    result = held.get(timeout=10)  # well within the 30 s window
    assert result["status"] == 410
    wait_until(lambda: endpoint.record.terminated, 5, "terminate")
    assert endpoint.record.terminated == [("held", DISCONNECTED)]


def test_a_newer_poll_replaces_the_held_one(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 30_000})
    lp = LP(live_server(app))
    lp.open()
    session = next(iter(longpoll_of(endpoint).sessions.values()))
    first = gevent.spawn(lp.poll, timeout=20)
    wait_until(lambda: session.waiter is not None, 5, "the poll to be held")
    waiter = session.waiter
    second = gevent.spawn(lp.poll, timeout=20)
    wait_until(lambda: session.waiter is not waiter, 5, "the second poll")
    assert first.get(timeout=10)["status"] == 204
    session.send('["x"]')
    assert second.get(timeout=10) == {"status": 200, "token": lp.token, "messages": ['["x"]']}


def test_drain_ends_long_poll_sessions(live_server):
    app, endpoint = make_app()
    lp = LP(live_server(app), {"user": "drained", "vsn": "2.0.0"})
    lp.open()
    lp.post(join_line()).json()
    lp.collect(1)
    (conn,) = endpoint.mounts[0].connections
    conn.drain()  # what the gunicorn worker does to every connection on SIGTERM
    assert lp.poll()["status"] == 410
    wait_until(lambda: endpoint.record.terminated, 5, "terminate")
    assert endpoint.record.terminated == [("drained", DRAINING)]


def test_without_secret_key_it_works_in_one_process_and_warns(live_server, caplog):
    app, endpoint = make_app(secret=None, longpoll={"window_ms": 500})
    lp = LP(live_server(app))
    with caplog.at_level("WARNING", logger="phx_gevent.transports.longpoll"):
        lp.open()
        lp.post(join_line()).json()
        assert lp.collect(1)[0][3] == "phx_reply"
    warnings = [r for r in caplog.records if "SECRET_KEY" in r.getMessage()]
    assert len(warnings) == 1


# -- end to end with phoenix.js -------------------------------------------------------------------


def lp_url(server: Any) -> str:
    return server.ws + "/socket"


@pytest.fixture
def example_lp(example):
    """The example app with a 1 s poll window (so held polls do not slow the server's shutdown)."""
    example.endpoint.mounts[0].longpoll.window = 1.0
    return example


def test_e2e_join_push_reply_and_broadcast_with_websocket_clients(example_lp, js):
    example = example_lp
    sid = js.open_socket(lp_url(example), {"user": "ann"}, longpoll=True)
    assert js.find(ev="open", socket=sid)[0]["transport"] == "longpoll"
    ann = js.channel(sid, "room:lobby")
    joined = js.join(ann)
    assert (joined["status"], joined["response"]) == ("ok", {"user": "ann"})
    welcome = js.wait(ev="chan", channel=ann, event="welcome")
    assert welcome["payload"]["user"] == "ann"
    reply = js.push(ann, "ping", {"n": [1, "two"], "é": "/"})
    assert reply["status"] == "ok" and reply["response"] == {"n": [1, "two"], "é": "/"}
    # A WebSocket client in the same room.
    _, bob = js.join_room(lp_url(example), "bob", "room:lobby")
    assert js.push(bob, "new_msg", {"body": "from ws"})["status"] == "ok"
    assert js.wait(ev="chan", channel=ann, event="new_msg")["payload"] == {"user": "bob", "body": "from ws"}
    assert js.push(ann, "new_msg", {"body": "from lp"})["status"] == "ok"
    got = js.wait(ev="chan", channel=bob, event="new_msg", pred=lambda e: e["payload"]["user"] == "ann")
    assert got["payload"] == {"user": "ann", "body": "from lp"}
    # Intercepted events go through handle_out for the long-poll client too.
    example.endpoint.broadcast("room:lobby", "announce", {"text": "hi"})
    assert js.wait(ev="chan", channel=ann, event="announce")["payload"] == {"text": "hi", "to": "ann"}


def test_e2e_binary_ping_gets_the_error_reply_and_binary_broadcasts_are_skipped(example_lp, js):
    example = example_lp
    sid = js.open_socket(lp_url(example), {"user": "ann"}, longpoll=True)
    ann = js.channel(sid, "room:bin")
    assert js.join(ann)["status"] == "ok"
    reply = js.push(ann, "ping", b64(b"\x00\x01\x02"))
    assert (reply["status"], reply["response"]) == ("error", BINARY_REFUSED)
    _, bob = js.join_room(lp_url(example), "bob", "room:bin")
    since = js.mark()
    example.endpoint.broadcast("room:bin", "blob", b"\xff\x00")
    example.endpoint.broadcast("room:bin", "after", {})
    assert unb64(js.wait(ev="chan", channel=bob, event="blob", since=since)["payload"]) == b"\xff\x00"
    js.wait(ev="chan", channel=ann, event="after", since=since)
    assert not js.find(since=since, ev="chan", channel=ann, event="blob")
    assert not js.find(since=since, ev="error")


def test_e2e_binary_push_from_the_client_and_leave(live_server, js):
    app, endpoint = make_app()
    server = live_server(app)
    sid = js.open_socket(lp_url(server), {"user": "cy"}, longpoll=True)
    cid = js.channel(sid, "room:x")
    assert js.join(cid)["status"] == "ok"
    reply = js.push(cid, "size", b64(bytes(range(256)) * 4))
    assert reply["status"] == "ok" and reply["response"] == {"type": "bytes", "size": 1024}
    reply = js.push(cid, "echo", {"many": list(range(50))})
    assert reply["response"] == {"many": list(range(50))}
    left = js.leave(cid)
    assert left["status"] == "ok"
    js.wait(ev="chan_close", channel=cid)
    wait_until(lambda: endpoint.record.terminated, 5, "terminate")
    assert endpoint.record.terminated == [("cy", LEFT)]


def test_e2e_many_pushes_in_one_tick_keep_their_order(live_server, js):
    app, endpoint = make_app()
    server = live_server(app)
    sid = js.open_socket(lp_url(server), {"user": "dee"}, longpoll=True)
    cid = js.channel(sid, "room:batch")
    assert js.join(cid)["status"] == "ok"
    reqs = [js.push_nowait(cid, "echo", {"i": i}) for i in range(150)]
    replies = [js.wait(ev="reply", req=req) for req in reqs]
    assert [r["response"] for r in replies] == [{"i": i} for i in range(150)]


def test_e2e_session_expiry_runs_terminate(live_server, js):
    app, endpoint = make_app(longpoll={"window_ms": 400})
    server = live_server(app)
    sid = js.open_socket(lp_url(server), {"user": "eve"}, longpoll=True)
    cid = js.channel(sid, "room:exp")
    assert js.join(cid)["status"] == "ok"
    assert len(longpoll_of(endpoint).sessions) == 1
    js.send(cmd="disconnect", socket=sid)  # the client stops polling without telling the server
    js.wait(ev="disconnected", socket=sid)
    wait_until(lambda: endpoint.record.terminated, 10, "terminate")
    assert endpoint.record.terminated == [("eve", INACTIVE)]
    assert not longpoll_of(endpoint).sessions


def test_e2e_disconnect_by_socket_id_and_automatic_reconnect(example_lp, js):
    example = example_lp
    since = js.mark()
    sid = js.open_socket(lp_url(example), {"user": "carl"}, longpoll=True, **FAST)
    cid = js.channel(sid, "room:dc")
    assert js.join(cid)["status"] == "ok"
    js.wait(ev="chan", channel=cid, event="welcome", since=since)
    mark = js.mark()
    example.endpoint.broadcast("user_socket:carl", "disconnect", {})
    closed = js.wait(ev="close", socket=sid, since=mark)
    assert closed["code"] == 3410 and closed["reason"] == "session_gone"
    js.wait(ev="open", socket=sid, since=mark)
    # The channel rejoins on the new session: its join runs again (welcome is pushed after each join).
    js.wait(ev="chan", channel=cid, event="welcome", since=mark)
    assert js.push(cid, "ping", {"again": True})["response"] == {"again": True}


def test_e2e_fallback_to_long_poll_when_websocket_is_disabled(live_server, js):
    app, endpoint = make_app(websocket=False)
    server = live_server(app)
    sid = js.open_socket(lp_url(server), {"user": "fay"}, longPollFallbackMs=300, timeout=5000, **FAST)
    assert js.find(ev="open", socket=sid)[0]["transport"] == "longpoll"
    cid = js.channel(sid, "room:fb")
    assert js.join(cid)["status"] == "ok"
    assert js.push(cid, "echo", {"via": "fallback"})["response"] == {"via": "fallback"}
    assert len(longpoll_of(endpoint).sessions) == 1


def test_e2e_auth_token_over_long_poll(live_server, js):
    app, endpoint = make_app(auth_token=True)
    server = live_server(app)
    js.open_socket(lp_url(server), {"user": "gus"}, longpoll=True, authToken="tok/+=en")
    assert endpoint.record.connect_info[-1] == {"auth_token": "tok/+=en"}


# -- two nodes, no sticky sessions ------------------------------------------------------------------


class RoundRobinProxy:
    """A tiny HTTP proxy that sends each request to the next backend in turn."""

    _HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        # Each method alternates on its own, so both nodes get polls and posts.
        self.turns: dict[str, Any] = {}
        self.server = pywsgi.WSGIServer(("127.0.0.1", 0), self, log=None)
        self.server.start()
        self.port = self.server.server_port

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        turn = self.turns.setdefault(environ["REQUEST_METHOD"], itertools.count())
        port = self.ports[next(turn) % len(self.ports)]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else None
        headers = {
            key[5:].replace("_", "-").lower(): value
            for key, value in environ.items()
            if key.startswith("HTTP_") and key not in ("HTTP_HOST", "HTTP_CONNECTION")
        }
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = environ["CONTENT_TYPE"]
        path = environ["PATH_INFO"] + ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else "")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request(environ["REQUEST_METHOD"], path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in self._HOP]
        finally:
            conn.close()
        start_response(f"{resp.status} {resp.reason}", out)
        return [data]

    def stop(self) -> None:
        self.server.stop(timeout=2)


def test_e2e_two_nodes_behind_a_round_robin_proxy(live_server, js):
    bus = MemoryBus()
    nodes = []
    hits: Counter[tuple[str, str]] = Counter()
    for name in ("a", "b"):
        app, endpoint = make_app(pubsub=bus.adapter(f"node-{name}"), longpoll={"window_ms": 1000})
        endpoint.pubsub.start()

        # Counted in front of the app: the owner serves its own sessions' polls before Flask's hooks.
        def count(environ: dict[str, Any], start_response: Any, name: str = name, inner: Any = app.wsgi_app) -> Any:
            if environ["PATH_INFO"].endswith("/longpoll"):
                hits[(name, environ["REQUEST_METHOD"])] += 1
            return inner(environ, start_response)

        app.wsgi_app = count  # type: ignore[method-assign]
        nodes.append((live_server(app), endpoint))
    (server_a, ep_a), (server_b, ep_b) = nodes
    proxy = RoundRobinProxy([server_a.port, server_b.port])
    try:
        url = f"ws://127.0.0.1:{proxy.port}/socket"
        sid = js.open_socket(url, {"user": "lp"}, longpoll=True)
        cid = js.channel(sid, "room:multi")
        assert js.join(cid)["status"] == "ok"
        for i in range(6):
            assert js.push(cid, "echo", {"i": i})["response"] == {"i": i}
        # WebSocket clients on each node see the long-poll client's broadcasts and it sees theirs.
        for server, endpoint in nodes:
            ws_sid = js.open_socket(server.ws + "/socket", {"user": "ws"})
            ws_cid = js.channel(ws_sid, "room:multi")
            assert js.join(ws_cid)["status"] == "ok"
            since = js.mark()
            endpoint.broadcast("room:multi", "news", {"from": server.port})
            assert js.wait(ev="chan", channel=cid, event="news", since=since)["payload"] == {"from": server.port}
            js.wait(ev="chan", channel=ws_cid, event="news", since=since)
        # One session in total, owned by one node, yet both nodes served its polls and posts.
        sessions = len(longpoll_of(ep_a).sessions) + len(longpoll_of(ep_b).sessions)
        assert sessions == 1
        for name in ("a", "b"):
            assert hits[(name, "GET")] >= 2 and hits[(name, "POST")] >= 2, hits
        assert not js.find(ev="close", socket=sid) and not js.find(ev="error", socket=sid)
    finally:
        proxy.stop()


def test_requests_for_a_session_on_another_node_are_routed_to_its_owner(live_server):
    bus = MemoryBus()
    app_a, ep_a = make_app(pubsub=bus.adapter("node-a"), longpoll={"window_ms": 30_000})
    app_b, ep_b = make_app(pubsub=bus.adapter("node-b"), longpoll={"window_ms": 30_000})
    server_a, server_b = live_server(app_a), live_server(app_b)
    token = LP(server_a, {"user": "routed", "vsn": "2.0.0"}).open()
    lp_b = LP(server_b)
    lp_b.token = token
    assert lp_b.post(join_line(), json.dumps(["1", "2", "room:1", "echo", {"via": "b"}])).json() == {"status": 200}
    assert [f[1] for f in lp_b.collect(2)] == ["1", "2"]
    assert len(longpoll_of(ep_a).sessions) == 1 and not longpoll_of(ep_b).sessions
    # A poll held through node b is answered at once when the session ends on node a.
    session = next(iter(longpoll_of(ep_a).sessions.values()))
    held = gevent.spawn(lp_b.poll, timeout=20)
    wait_until(lambda: session.waiter is not None, 5, "the poll to be held on the owner")
    session.send('["pushed"]')
    assert held.get(timeout=10)["messages"] == ['["pushed"]']
    held = gevent.spawn(lp_b.poll, timeout=20)
    wait_until(lambda: session.waiter is not None, 5, "the poll to be held on the owner")
    ep_b.broadcast("user_socket:routed", "disconnect", {})  # from node b, over the bus
    assert held.get(timeout=10)["status"] == 410
    wait_until(lambda: ep_a.record.terminated, 5, "terminate on the owner")
    assert ep_a.record.terminated == [("routed", DISCONNECTED)]
    assert lp_b.post(join_line()).json() == {"status": 410}


def test_a_token_for_a_dead_node_starts_a_new_session_after_pubsub_timeout(live_server):
    bus = MemoryBus()
    app_a, ep_a = make_app(pubsub=bus.adapter("node-a"), longpoll={"window_ms": 200, "pubsub_timeout_ms": 200})
    app_b, ep_b = make_app(pubsub=bus.adapter("node-b"), longpoll={"window_ms": 200, "pubsub_timeout_ms": 200})
    server_a, server_b = live_server(app_a), live_server(app_b)
    token = LP(server_a).open()
    ep_a.pubsub.stop()  # node a leaves the bus
    lp_b = LP(server_b)
    assert lp_b.request("POST", join_line().encode(), NDJSON, token=token).json() == {"status": 410}
    fresh = lp_b.request("GET", token=token).json()
    assert fresh["status"] == 410 and fresh["token"] != token
    assert len(longpoll_of(ep_b).sessions) == 1
