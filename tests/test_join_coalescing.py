"""A join reply and the pushes of its ``after_join`` leave in one ``send()`` (channels/joining.py, Writer.hold).

Phoenix's usual pattern (``send(self(), :after_join)`` in ``join``, pushes in
``handle_info``) makes a reply and one or more pushes within the same hub
turn. The connection's output is held from the reply until the hub has run
the channel's mailbox once, so they share one system call and one TCP
segment. The hold never delays the reply behind a ``handle_info`` that blocks,
and frames keep their order.
"""

from __future__ import annotations

from typing import Any

import gevent
import pytest
from gevent.event import Event

from phx_gevent import Channel, Socket, channel, ok
from phx_gevent.transports.writer import Writer
from tests.rawws import RawWS

GATE = Event()


class AfterJoinChannel(Channel):
    def join(self, topic: str, payload: Any, socket: Any):
        socket.channel_pid.send(payload.get("mode", "push"))
        return ok({"joined": topic})

    def handle_info(self, message: Any, socket: Any):
        if message == "block":
            # Waits for the test, which must first have read the join reply.
            if not GATE.wait(5):
                self.push(socket, "gate_timeout", {})
                return None
        self.push(socket, "welcome", {"n": 1})
        self.push(socket, "state", {"n": 2})
        return None


class AfterJoinSocket(Socket):
    channels = [channel("room:*", AfterJoinChannel)]

    def connect(self, params: dict, socket: Any, connect_info: dict):
        return socket


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every ``send()`` a Writer makes (the bytes handed to the kernel), in order."""
    seen: list[bytes] = []
    real = Writer._send

    def spy(self: Writer, data: Any) -> int | None:
        seen.append(bytes(data))
        return real(self, data)

    monkeypatch.setattr(Writer, "_send", spy)
    return seen


def test_the_reply_and_the_after_join_pushes_share_one_send(mounted, sends):
    srv = mounted(AfterJoinSocket)
    ws = RawWS(srv.port, "/socket/websocket?vsn=2.0.0")
    ws.send_json(["1", "1", "room:a", "phx_join", {}])
    frames = [ws.recv_json() for _ in range(3)]
    assert [f[3] for f in frames] == ["phx_reply", "welcome", "state"]  # in order
    assert frames[0][4] == {"status": "ok", "response": {"joined": "room:a"}}
    joined = [s for s in sends if b"phx_reply" in s]
    assert len(joined) == 1 and b"welcome" in joined[0] and b"state" in joined[0], sends
    # Output is not held any more: a heartbeat reply goes out on its own, at once.
    before = len(sends)
    ws.send_json([None, "2", "phoenix", "heartbeat", {}])
    assert ws.recv_json()[3] == "phx_reply"
    assert len(sends) == before + 1
    ws.close()


def test_a_blocking_after_join_does_not_hold_the_reply(mounted, sends):
    GATE.clear()
    srv = mounted(AfterJoinSocket)
    ws = RawWS(srv.port, "/socket/websocket?vsn=2.0.0")
    ws.send_json(["1", "1", "room:b", "phx_join", {"mode": "block"}])
    reply = ws.recv_json()  # arrives while handle_info still waits for the gate
    assert reply[3] == "phx_reply" and reply[4]["status"] == "ok"
    GATE.set()
    assert [ws.recv_json()[3] for _ in range(2)] == ["welcome", "state"]
    ws.close()


def test_a_join_without_after_join_is_answered_at_once(mounted, sends):
    class PlainChannel(Channel):
        def join(self, topic: str, payload: Any, socket: Any):
            return ok({})

    class PlainSocket(Socket):
        channels = [channel("room:*", PlainChannel)]

        def connect(self, params: dict, socket: Any, connect_info: dict):
            return socket

    srv = mounted(PlainSocket)
    ws = RawWS(srv.port, "/socket/websocket?vsn=2.0.0")
    ws.send_json(["1", "1", "room:c", "phx_join", {}])
    assert ws.recv_json()[3] == "phx_reply"
    assert len([s for s in sends if b"phx_reply" in s]) == 1
    # Nothing held: a broadcast right after reaches the client.
    srv.endpoint.broadcast("room:c", "news", {"x": 1})
    assert ws.recv_json()[3:5] == ["news", {"x": 1}]
    gevent.sleep(0)
    ws.close()


def test_reads_of_joined_connections_are_served_from_the_poll_others_behind_the_callbacks(monkeypatch):
    # A reconnect storm makes thousands of new connections readable in one poll; their joins are
    # served from the hub's callback queue (a few ms per turn), so that the reads of connections
    # already joined (heartbeats) are not held behind all of them.
    from types import SimpleNamespace

    from gevent import socket as gsocket

    from phx_gevent.options import WebSocketOptions
    from phx_gevent.serializers import V2
    from phx_gevent.transports import websocket

    served: list[Any] = []
    monkeypatch.setattr(websocket, "reader_pool", lambda: SimpleNamespace(run_from_hub=served.append))
    a, b = gsocket.socketpair()
    try:
        transport = websocket.WebSocketTransport(a, WebSocketOptions(), V2)
        transport._watcher = gevent.get_hub().loop.io(a.fileno(), 1)
        transport.conn = SimpleNamespace(channels={"room:1": object()})
        transport._readable()
        assert served == [transport._wakeup]  # at once, from the watcher's callback
        served.clear()
        transport.conn = SimpleNamespace(channels={})
        transport._readable()
        assert served == []  # not yet: queued behind the callbacks
        gevent.sleep(0)
        assert served == [transport._wakeup]
        served.clear()
        transport._readable()
        transport._watcher = None  # the connection ended before its turn: nothing is served
        gevent.sleep(0)
        assert served == []
    finally:
        a.close()
        b.close()
