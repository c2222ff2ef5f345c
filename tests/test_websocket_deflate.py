"""permessage-deflate (RFC 7692), ``websocket={"compress": True}``: negotiation, both directions, limits.

Raw frames check the bits on the wire; phoenix.js over ``ws`` (which offers
permessage-deflate by default, as browsers do) checks it end to end.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest
from flask import Flask

from phx_gevent import Endpoint
from phx_gevent.transports.frames import COMPRESS_THRESHOLD, negotiate_deflate
from tests.rawws import RawWS
from tests.test_websocket_raw import UserSocket  # the echo channel on room:*

OFFER = "permessage-deflate; client_max_window_bits"
ANSWER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


@pytest.fixture
def server(live_server):
    def start(**websocket_opts: Any):
        app = Flask(__name__)
        endpoint = Endpoint(app)
        mount = endpoint.socket("/socket", UserSocket, websocket={"compress": True, **websocket_opts})
        srv = live_server(app)
        srv.endpoint, srv.mount = endpoint, mount
        return srv

    return start


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def recv_message(ws: RawWS) -> tuple[bool, Any]:
    """(compressed?, decoded JSON) of the next text message."""
    b0, data = ws.recv_raw_frame()
    assert b0 & 0x0F == 0x1 and b0 & 0x80, hex(b0)
    compressed = bool(b0 & 0x40)
    if compressed:
        data = zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff")
    return compressed, json.loads(data)


def connect(server: Any, offer: str | None = OFFER) -> RawWS:
    ws = RawWS(server.port, headers={"Sec-WebSocket-Extensions": offer} if offer else None)
    assert ws.status == 101
    return ws


def join(ws: RawWS, topic: str = "room:1") -> None:
    ws.send_json(["1", "1", topic, "phx_join", {}])
    _, reply = recv_message(ws)
    assert reply[3] == "phx_reply" and reply[4]["status"] == "ok", reply


@pytest.mark.parametrize(
    ("offer", "accepted"),
    [
        ("permessage-deflate", True),
        (OFFER, True),
        ("permessage-deflate; client_max_window_bits=10; server_no_context_takeover", True),
        ("x-webkit-deflate-frame, permessage-deflate", True),
        ("permessage-deflate; server_max_window_bits=10", False),
        ("permessage-deflate; server_max_window_bits=10, permessage-deflate", True),
        ("permessage-deflate; unknown_param", False),
        ("permessage-deflate; client_no_context_takeover; client_no_context_takeover", False),
        ("permessage-deflate; client_max_window_bits=99", False),
        ("", False),
        (None, False),
    ],
)
def test_negotiation(offer, accepted):
    assert negotiate_deflate(offer) == (ANSWER if accepted else None)


def test_no_extension_unless_compress_is_on(live_server):
    app = Flask(__name__)
    Endpoint(app).socket("/socket", UserSocket)
    ws = RawWS(live_server(app).port, headers={"Sec-WebSocket-Extensions": OFFER})
    assert ws.status == 101 and "sec-websocket-extensions" not in ws.headers
    # And a compressed frame there is a protocol error.
    ws.send_frame(0x1, deflate(b'["1","1","room:1","phx_join",{}]'), rsv=4)
    assert ws.expect_close()[0] == 1002


def test_large_messages_compressed_both_ways_small_ones_not(server):
    srv = server()
    ws = connect(srv)
    assert ws.headers["sec-websocket-extensions"] == ANSWER
    join(ws)
    big = {"body": "hello phoenix " * 500}
    # A compressed push from the client, a compressed reply from the server.
    ws.send_frame(0x1, deflate(json.dumps(["1", "2", "room:1", "ping", big]).encode()), rsv=4)
    compressed, reply = recv_message(ws)
    assert compressed and reply[4] == {"status": "ok", "response": big}
    # A plain (uncompressed) message on the same connection is fine too; a small reply stays plain.
    ws.send_json(["1", "3", "room:1", "ping", {"x": 1}])
    compressed, reply = recv_message(ws)
    assert not compressed and reply[4]["response"] == {"x": 1}
    # A fragmented compressed message: RSV1 on the first frame only.
    data = deflate(json.dumps(["1", "4", "room:1", "ping", big]).encode())
    ws.send_frame(0x1, data[:100], fin=False, rsv=4)
    ws.send_frame(0x0, data[100:])
    compressed, reply = recv_message(ws)
    assert compressed and reply[4]["response"] == big


def test_broadcasts_are_compressed_for_deflate_connections_only(server):
    srv = server()
    deflating, plain = connect(srv), connect(srv, offer=None)
    assert "sec-websocket-extensions" not in plain.headers
    for ws in (deflating, plain):
        join(ws, "room:b")
    payload = {"text": "x" * (2 * COMPRESS_THRESHOLD)}
    srv.endpoint.broadcast("room:b", "big", payload)
    srv.endpoint.broadcast("room:b", "small", {"text": "y"})
    got = {name: [recv_message(ws), recv_message(ws)] for name, ws in (("deflate", deflating), ("plain", plain))}
    assert [c for c, _ in got["deflate"]] == [True, False]
    assert [c for c, _ in got["plain"]] == [False, False]
    assert [m for _, m in got["deflate"]] == [m for _, m in got["plain"]]
    assert got["plain"][0][1][4] == payload


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        # A small "zip bomb": 2 MB of zeros inflate past max_frame_size (1 MB here).
        ([(0x1, deflate(b"0" * (2 * 1024 * 1024)), True, 4)], 1009),
        ([(0x1, b"\xff\xff\xff\xff not deflate", True, 4)], 1007),
        # RSV1 on a continuation frame, on a control frame, RSV2/RSV3.
        ([(0x1, b"[", False, 0), (0x0, b"]", True, 4)], 1002),
        ([(0x9, b"", True, 4)], 1002),
        ([(0x1, deflate(b"{}"), True, 2)], 1002),
        ([(0x1, deflate(b"{}"), True, 6)], 1002),
    ],
)
def test_bad_compressed_input_closes_with_the_right_code(server, frames, code):
    srv = server(max_frame_size=1024 * 1024)
    ws = connect(srv)
    join(ws)
    for op, data, fin, rsv in frames:
        ws.send_frame(op, data, fin=fin, rsv=rsv)
    assert ws.expect_close()[0] == code
    # The server is fine: a new connection works.
    other = connect(srv)
    join(other)


def test_phoenix_js_over_ws_negotiates_and_round_trips_large_messages(server, js):
    srv = server()
    url = srv.ws + "/socket"
    a_sid = js.open_socket(url, {"user": "a"})
    a = js.channel(a_sid, "room:js")
    assert js.join(a)["status"] == "ok"
    [conn] = list(srv.mount.connections)
    assert conn.transport.deflate  # ws offered permessage-deflate, we accepted
    big = {"body": "phoenix over deflate " * 400}
    reply = js.push(a, "ping", big)
    assert reply["status"] == "ok" and reply["response"] == big
    b_sid = js.open_socket(url, {"user": "b"})
    b = js.channel(b_sid, "room:js")
    assert js.join(b)["status"] == "ok"
    since = js.mark()
    srv.endpoint.broadcast("room:js", "big", big)
    for cid in (a, b):
        assert js.wait(ev="chan", channel=cid, event="big", since=since)["payload"] == big
