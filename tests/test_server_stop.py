"""``Server.stop()`` closes the WebSockets that server accepted with 1001 (going away), channels terminated.

Watched connections have no greenlet in the server's pool (docs/scaling-connections.md),
so gevent's own stop() would leave them open; the drains (SIGTERM, gunicorn) are tested in
test_serve_drain.py and test_gunicorn.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from phx_gevent import Channel, Endpoint, Socket, channel, make_server, ok
from phx_gevent.transports import websocket
from tests.rawws import RawWS, join
from tests.servers import wait_until

TERMINATED: list[tuple[str, Any]] = []


class Room(Channel):
    def join(self, topic: str, payload: Any, socket: Any):
        return ok({})

    def terminate(self, reason: Any, socket: Any) -> None:
        TERMINATED.append((socket.topic, reason))


class RoomSocket(Socket):
    channels = [channel("room:*", Room)]


def serve() -> Any:
    app = Flask(__name__)
    endpoint = Endpoint(app)
    endpoint.socket("/socket", RoomSocket, log=False)
    server = make_server(app, "127.0.0.1", 0)
    server.start()
    server.phx_endpoint = endpoint
    return server


def test_stop_closes_phoenix_js_sockets_with_1001(js):
    TERMINATED.clear()
    server = serve()
    other = serve()  # another server in the same process keeps its connection
    try:
        url = f"ws://127.0.0.1:{server.server_port}/socket"
        sid, _ = js.join_room(url, "a", "room:1", reconnectAfterMs=60_000)
        idle = js.open_socket(url, {"user": "b"}, reconnectAfterMs=60_000)  # no channel: closed too
        keeper, _ = js.join_room(f"ws://127.0.0.1:{other.server_port}/socket", "c", "room:2", reconnectAfterMs=60_000)
        since = js.mark()
        server.stop(timeout=3)
        assert js.wait(ev="close", socket=sid, since=since, timeout=10)["code"] == 1001
        assert js.wait(ev="close", socket=idle, since=since, timeout=10)["code"] == 1001
        assert server.phx_endpoint.mounts[0].connections == set()
        assert [t for t, _ in TERMINATED] == ["room:1"]
        assert not js.find(since=since, ev="close", socket=keeper)
        assert len(other.phx_endpoint.mounts[0].connections) == 1
    finally:
        server.stop(timeout=1)
        other.stop(timeout=1)


@pytest.mark.parametrize("watched", [True, False])
def test_stop_closes_raw_websockets_with_1001_then_tcp(monkeypatch, watched):
    monkeypatch.setattr(websocket, "WATCH_READS", watched)  # False: a reader greenlet per connection
    server = serve()
    ws = RawWS(server.server_port, "/socket/websocket?vsn=2.0.0")
    join(ws)
    mount = server.phx_endpoint.mounts[0]
    wait_until(lambda: len(mount.connections) == 1, 5)
    server.stop(timeout=3)
    assert ws.expect_close() == (1001, "server stopping")
    ws.expect_eof()
    assert mount.connections == set()
    ws.close()
