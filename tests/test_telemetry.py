"""Every telemetry event's payload, the Phoenix-style log lines, and receivers that cannot hurt the server."""

from __future__ import annotations

import logging
import socket
import time
import weakref
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from flask import Flask

from phx_gevent import Channel, Endpoint, Presence, Socket, channel, error, ok, telemetry
from phx_gevent.flow import FlowControl
from phx_gevent.options import DrainerOptions
from phx_gevent.runtime import runtime
from phx_gevent.serializers import V2
from phx_gevent.testing import ChannelTest
from phx_gevent.worker import drain_all
from tests import httpclient as http
from tests.rawws import RawWS
from tests.servers import RedisServer, redis_server, wait_until  # noqa: F401

PRESENCE: dict[str, Presence] = {}


class RoomChannel(Channel):
    def join(self, topic: str, payload: Any, socket: Any) -> Any:
        if topic == "room:secret":
            return error({"reason": "nope"})
        if payload.get("track"):
            socket.channel_pid.send("track")
        return ok()

    def handle_info(self, message: Any, socket: Any) -> None:
        if message == "track":
            PRESENCE["p"].track(socket, socket.assigns["user"], {})

    def handle_in(self, event: str, payload: Any, socket: Any) -> Any:
        return ok(payload)


class UserSocket(Socket):
    channels = [channel("room:*", RoomChannel)]

    def connect(self, params: dict, socket: Any, connect_info: dict) -> Any:
        if params.get("user") in (None, "nobody"):
            return None
        return socket.assign(user=params["user"])

    def id(self, socket: Any) -> str:
        return f"user:{socket.assigns['user']}"


class Recorder:
    """Records ``(sender, measurements, metadata)`` of one signal."""

    def __init__(self, signal: Any) -> None:
        self.signal = signal
        self.events: list[tuple[Any, dict[str, Any], dict[str, Any]]] = []
        signal.connect(self, weak=False)

    def __call__(self, sender: Any, measurements: Any, metadata: Any) -> None:
        self.events.append((sender, dict(measurements), dict(metadata)))

    def wait(self, count: int = 1, timeout: float = 10.0) -> list[tuple[Any, dict[str, Any], dict[str, Any]]]:
        wait_until(lambda: len(self.events) >= count, timeout, f"{count} {self.signal.name} event(s)")
        return self.events


@pytest.fixture
def record() -> Iterator[Any]:
    recorders: list[Recorder] = []

    def start(signal: Any) -> Recorder:
        r = Recorder(signal)
        recorders.append(r)
        return r

    yield start
    for r in recorders:
        r.signal.disconnect(r)


def make(log: str | bool = "info", **opts: Any) -> tuple[Flask, Endpoint, Any]:
    app = Flask(__name__)
    endpoint = Endpoint(app, **opts)
    mount = endpoint.socket("/socket", UserSocket, longpoll=True, log=log)
    return app, endpoint, mount


def test_socket_connected_accepted_and_refused_over_both_transports(live_server, record, caplog):
    app, endpoint, _ = make()
    srv = live_server(app)
    rec = record(telemetry.socket_connected)
    with caplog.at_level(logging.INFO, logger="phx_gevent"):
        ws = RawWS(srv.port, "/socket/websocket?vsn=2.0.0&user=alice")
        assert ws.status == 101
        assert RawWS(srv.port, "/socket/websocket?vsn=2.0.0&user=nobody").status == 403
        assert http.get(srv.http + "/socket/longpoll?vsn=2.0.0&user=bob").json()["status"] == 410
    (s1, m1, ok_), (s2, m2, refused), (s3, m3, lp) = rec.wait(3)
    assert s1 is endpoint and s2 is endpoint and s3 is endpoint
    assert ok_ == {
        "endpoint": endpoint,
        "mount": "/socket",
        "handler": "UserSocket",
        "transport": "websocket",
        "serializer": "2.0",
        "result": "ok",
        "socket_id": "user:alice",
        "params": ["user", "vsn"],
    }
    assert (refused["result"], refused["socket_id"], refused["transport"]) == ("error", None, "websocket")
    assert (lp["result"], lp["socket_id"], lp["transport"]) == ("ok", "user:bob", "longpoll")
    for m in (m1, m2, m3):
        assert set(m) == {"duration"} and 0 <= m["duration"] < 5
    lines = [r.getMessage() for r in caplog.records if r.name == "phx_gevent.mount"]  # SocketMount.connect logs
    assert any(line.startswith("CONNECTED TO UserSocket in ") and "transport websocket" in line for line in lines)
    assert any(line.startswith("REFUSED CONNECTION TO UserSocket in ") for line in lines)
    assert not any("alice" in line for line in lines)  # param names only, never values
    ws.close()


def test_channel_joined_and_refused_with_the_reason_in_the_log(record, caplog):
    _, endpoint, _ = make()
    rec = record(telemetry.channel_joined)
    client = ChannelTest(endpoint).connect({"user": "alice"})
    with caplog.at_level(logging.INFO, logger="phx_gevent"):
        assert client.join("room:1").reply.status == "ok"
        assert client.join("room:secret").reply.status == "error"
    (s1, m1, joined), (s2, m2, refused) = rec.wait(2)
    assert s1 is endpoint and s2 is endpoint
    assert {k: v for k, v in joined.items() if k != "socket"} == {
        "topic": "room:1",
        "route": "room:*",
        "channel": "RoomChannel",
        "result": "ok",
    }
    assert joined["socket"].topic == "room:1" and joined["socket"].assigns["user"] == "alice"
    assert (refused["topic"], refused["result"]) == ("room:secret", "error")
    assert m1["duration"] >= 0 and m2["duration"] >= 0
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("JOINED room:1 in ") and line.endswith("(RoomChannel)") for line in lines)
    assert any(line.startswith("REFUSED JOIN room:secret in ") and "'reason': 'nope'" in line for line in lines)


def test_channel_handled_in_and_its_debug_log(record, caplog):
    _, endpoint, _ = make(log="debug")
    rec = record(telemetry.channel_handled_in)
    room = ChannelTest(endpoint).connect({"user": "alice"}).join("room:1")
    with caplog.at_level(logging.DEBUG, logger="phx_gevent"):
        ref = room.push("ping", {"x": 1})
        room.assert_reply(ref, "ok", {"x": 1})
    ((sender, measurements, metadata),) = rec.wait(1)
    assert sender is endpoint
    assert set(measurements) == {"duration"} and 0 <= measurements["duration"] < 5
    assert {k: v for k, v in metadata.items() if k != "socket"} == {
        "event": "ping",
        "topic": "room:1",
        "channel": "RoomChannel",
        "ref": ref,
    }
    assert metadata["socket"].topic == "room:1"
    assert any(r.getMessage().startswith("HANDLED ping INCOMING ON room:1 (RoomChannel) in ") for r in caplog.records)


def test_broadcast_is_one_event_per_broadcast_with_subscribers_and_frame_size(record):
    _, endpoint, _ = make(log=False)
    rec = record(telemetry.broadcast)
    rooms = [ChannelTest(endpoint).connect({"user": f"u{i}"}).join("room:b") for i in range(3)]
    endpoint.broadcast("room:b", "news", {"a": 1})
    endpoint.broadcast("room:nobody", "news", {"a": 1})
    for room in rooms:
        room.assert_push("news", {"a": 1})
    events = [e for e in rec.events if e[0] is endpoint.pubsub]
    assert len(events) == 2
    frame = V2.encode_broadcast("room:b", "news", {"a": 1})
    assert events[0][1] == {"subscribers": 3, "bytes": len(frame)}
    assert events[0][2] == {"topic": "room:b", "event": "news", "node": endpoint.node_name}
    assert events[1][1] == {"subscribers": 0, "bytes": 0}


def test_overload_wait_and_timeout():
    fc = FlowControl()
    fc.configure(max_queued_bytes=100)
    waits, timeouts = [], []

    def on_wait(sender, measurements, metadata):
        waits.append((sender, measurements, metadata))

    def on_timeout(sender, measurements, metadata):
        timeouts.append((sender, measurements, metadata))

    telemetry.overload_wait.connect(on_wait, sender=fc)
    telemetry.overload_timeout.connect(on_timeout, sender=fc)
    try:
        fc.queued = 300
        gevent.spawn_later(0.05, fc.release, 300)
        fc.wait(timeout=5)
        ((sender, measurements, metadata),) = waits
        assert sender is fc and metadata == {"high_water": 100}
        assert measurements["queued"] == 300 and 0.0 < measurements["duration"] < 5
        fc.queued = 300
        with pytest.raises(Exception, match="bytes queued"):
            fc.wait(timeout=0.05)
        ((sender, measurements, metadata),) = timeouts
        assert sender is fc and measurements["queued"] == 300 and measurements["duration"] >= 0.05
        assert len(waits) == 1
    finally:
        telemetry.overload_wait.disconnect(on_wait)
        telemetry.overload_timeout.disconnect(on_timeout)


def test_slow_client_drop(live_server, record, request):
    # The overload settings are this endpoint's own while it lives (phx_gevent.runtime).
    app, endpoint, mount = make(
        log=False,
        max_connection_queue_bytes=32 * 1024,
        slow_client_timeout=0.2,
        sndbuf=8 * 1024,
        max_queued_bytes=1 << 26,
    )
    request.addfinalizer(lambda: runtime.release(endpoint))  # its settings end with the test
    srv = live_server(app)
    rec = record(telemetry.slow_client_drop)
    stuck = RawWS(srv.port, "/socket/websocket?vsn=2.0.0&user=stuck")
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.send_json(["1", "1", "room:1", "phx_join", {}])
    wait_until(lambda: endpoint.pubsub.subscriber_count("room:1") == 1, 5, "the join")
    filler = "z" * 1000
    deadline = time.monotonic() + 20
    while not rec.events and time.monotonic() < deadline:
        for n in range(50):
            endpoint.broadcast("room:1", "blob", {"n": n, "fill": filler})
        gevent.sleep(0.02)
    ((sender, measurements, metadata),) = rec.wait(1)
    assert metadata["transport"] == "websocket" and metadata["reason"] in ("hard_cap", "stalled")
    assert measurements["queued_bytes"] > 32 * 1024
    assert sender is not None
    wait_until(lambda: not mount.connections, 10, "the stuck connection to go")
    stuck.close()


def test_presence_change(record):
    _, endpoint, _ = make(log=False)
    PRESENCE["p"] = Presence(endpoint)
    rec = record(telemetry.presence_change)
    client = ChannelTest(endpoint).connect({"user": "alice"})
    room = client.join("room:p", {"track": True})
    room.assert_push("presence_diff")
    ((sender, measurements, metadata),) = rec.wait(1)
    assert sender is PRESENCE["p"]
    assert measurements == {"joins": 1, "leaves": 0}
    assert metadata == {"topic": "room:p", "presence": "presence"}
    client.close()
    events = rec.wait(2)
    assert events[1][1] == {"joins": 0, "leaves": 1}


def test_socket_drain_batches(record, monkeypatch, caplog):
    import phx_gevent.endpoint

    _, endpoint, mount = make()
    mount.drainer = DrainerOptions(batch_size=2, batch_interval=0.05, shutdown=5.0)
    monkeypatch.setattr(phx_gevent.endpoint, "endpoints", weakref.WeakSet([endpoint]))
    clients = [ChannelTest(endpoint).connect({"user": f"d{i}"}) for i in range(3)]
    for c in clients:
        assert c.join("room:drain").joined  # only connections holding channels are drained (as Phoenix)
    ChannelTest(endpoint).connect({"user": "idle"})  # no channel: not drained, not counted
    rec = record(telemetry.socket_drain)
    with caplog.at_level(logging.INFO, logger="phx_gevent"):
        assert drain_all(time.monotonic() + 5) == 3
    assert endpoint.draining is True
    assert [(s is endpoint, m, md) for s, m, md in rec.events] == [
        (True, {"count": 2, "total": 3, "index": 0, "rounds": 2}, {"mount": "/socket", "interval": 0.05}),
        (True, {"count": 1, "total": 3, "index": 1, "rounds": 2}, {"mount": "/socket", "interval": 0.05}),
    ]
    assert any("disconnecting 2 of 3 connections (round 1 of 2)" in r.getMessage() for r in caplog.records)
    for c in clients:
        c.close()


def test_pubsub_down_and_up(redis_server, record):  # noqa: F811
    endpoint = Endpoint(pubsub=redis_server.url, pubsub_prefix="tele")
    adapter = endpoint.pubsub.adapter
    down, up = record(telemetry.pubsub_down), record(telemetry.pubsub_up)
    endpoint.pubsub.start()
    try:
        wait_until(lambda: adapter.connected, 10, "Redis connected")
        redis_server.kill()
        ((sender, measurements, metadata),) = [e for e in down.wait(1) if e[0] is adapter]
        assert measurements == {}
        assert metadata["node"] == endpoint.node_name and metadata["adapter"] == repr(adapter)
        assert isinstance(metadata["reason"], str) and metadata["reason"]
        redis_server.start()
        wait_until(lambda: [e for e in up.events if e[0] is adapter], 20, "pubsub_up")
        ((_, measurements, metadata),) = [e for e in up.events if e[0] is adapter]
        assert measurements["duration"] > 0 and metadata == {"node": endpoint.node_name, "adapter": repr(adapter)}
    finally:
        endpoint.pubsub.stop()


def test_a_failing_receiver_is_logged_and_changes_nothing(caplog):
    _, endpoint, _ = make(log=False)

    def broken(sender, measurements, metadata):
        raise RuntimeError("receiver bug")

    telemetry.channel_joined.connect(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="phx_gevent.telemetry"):
            assert ChannelTest(endpoint).connect({"user": "a"}).join("room:1").reply.status == "ok"
        assert any("receiver bug" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    finally:
        telemetry.channel_joined.disconnect(broken)


def test_nothing_is_emitted_without_receivers(monkeypatch):
    # Other tests' metrics may have connected receivers to the shared signals: hide them all.
    for name in telemetry.__all__:
        signal = getattr(telemetry, name)
        if isinstance(signal, telemetry.NamedSignal):
            monkeypatch.setattr(signal, "receivers", {})

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("emit called with no receivers")

    monkeypatch.setattr(telemetry, "emit", never)
    _, endpoint, _ = make(log=False)
    room = ChannelTest(endpoint).connect({"user": "a"}).join("room:1")
    ref = room.push("ping", {})
    room.assert_reply(ref, "ok")
    endpoint.broadcast("room:1", "news", {})
    room.assert_push("news")


def test_slow_client_drop_of_a_long_poll_session(live_server, record):
    from phx_gevent.serializers import Message

    app = Flask(__name__)
    endpoint = Endpoint(app)
    mount = endpoint.socket("/socket", UserSocket, websocket=False, longpoll={"max_buffer_bytes": 2000}, log=False)
    srv = live_server(app)
    rec = record(telemetry.slow_client_drop)
    assert http.get(srv.http + "/socket/longpoll?vsn=2.0.0&user=lp").json()["status"] == 410
    (session,) = mount.longpoll.sessions.values()
    session.conn.handle(Message("1", "1", "room:lp", "phx_join", {}))
    wait_until(lambda: endpoint.pubsub.subscriber_count("room:lp") == 1, 5, "the join")
    for n in range(5):  # nobody polls: the buffer passes max_buffer_bytes
        endpoint.broadcast("room:lp", "blob", {"n": n, "fill": "x" * 1000})
    ((sender, measurements, metadata),) = rec.wait(1)
    assert sender is session
    assert metadata == {"reason": "buffer_full", "transport": "longpoll"}
    assert measurements["queued_bytes"] > 2000
