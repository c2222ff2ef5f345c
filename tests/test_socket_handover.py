"""An upgraded connection outlives its WSGI handler's greenlet (transports/handshake.py ``_detach``).

On phx_gevent's own servers the handler's socket object is kept as it is
(``PacedAccept.phx_keep``: the server skips its close); on any other gevent
WSGI server (our handler, gevent's plain ``WSGIServer``) the descriptor is
detached and wrapped anew. Either way the connection keeps working after
the handler has returned, and it is closed exactly once, when it ends.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask
from gevent import pywsgi

from phx_gevent import Endpoint, Socket
from phx_gevent.server import WebSocketHandler
from tests.rawws import RawWS
from tests.servers import wait_until


class EchoSocket(Socket):
    def connect(self, params: dict, socket: Any, connect_info: dict):
        return socket


def make_app() -> tuple[Flask, Endpoint]:
    app = Flask("handover")
    endpoint = Endpoint(app)
    endpoint.socket("/socket", EchoSocket)
    return app, endpoint


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def heartbeat(ws: RawWS, ref: str) -> None:
    ws.send_json([None, ref, "phoenix", "heartbeat", {}])
    reply = ws.recv_json()
    assert reply[:4] == [None, ref, "phoenix", "phx_reply"] and reply[4]["status"] == "ok"


def test_our_server_keeps_the_handlers_socket_and_closes_it_once_at_the_end(live_server):
    app, endpoint = make_app()
    srv = live_server(app)
    before = open_fds()
    ws = RawWS(srv.port, "/socket/websocket?vsn=2.0.0")
    assert ws.status == 101
    # The handler greenlet is done once the 101 is out; the server forgot the kept socket then.
    wait_until(lambda: not srv.server._phx_kept, what="the handler's end")
    assert srv.server._phx_kept == set()
    for ref in ("1", "2", "3"):
        heartbeat(ws, ref)  # served by the read watcher, on the same socket object
    assert endpoint.connection_count() == 1
    ws.close()
    wait_until(lambda: endpoint.connection_count() == 0, what="the connection's end")
    wait_until(lambda: open_fds() <= before, what="the server's descriptor closed")


def test_a_plain_gevent_server_with_our_handler_detaches_the_socket():
    app, endpoint = make_app()
    server = pywsgi.WSGIServer(("127.0.0.1", 0), app, handler_class=WebSocketHandler, log=None)
    server.start()
    try:
        assert not hasattr(server, "phx_keep")
        ws = RawWS(server.server_port, "/socket/websocket?vsn=2.0.0")
        assert ws.status == 101
        for ref in ("1", "2"):
            heartbeat(ws, ref)  # gevent closed its object for this connection: ours still reads
        assert endpoint.connection_count() == 1
        ws.close()
        wait_until(lambda: endpoint.connection_count() == 0, what="the connection's end")
    finally:
        server.stop(timeout=2)
