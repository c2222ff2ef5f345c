"""The WebSocket transport against a raw client: handshake outcomes, limits, close codes, bad input."""

from __future__ import annotations

import functools
import json
import socket
import struct

import gevent
import pytest

from phx_gevent import BroadcastTimeout
from phx_gevent.flow import flow
from tests import httpclient as http
from tests.handlers import UserSocket
from tests.rawws import Closed, RawWS, join
from tests.servers import wait_until


@pytest.fixture
def server(mounted):
    """``server(endpoint_opts=None, **socket_opts)``: tests.handlers.UserSocket on a fresh app."""
    return functools.partial(mounted, UserSocket)


# -- handshake -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_wrong_methods_get_400(server, method):
    srv = server()
    assert http.request(method, srv.http + "/socket/websocket?vsn=2.0.0", b"").status == 400
    assert RawWS(srv.port, method=method).status == 400  # even with upgrade headers


def test_plain_get_without_upgrade_is_400(server):
    assert http.get(server().http + "/socket/websocket?vsn=2.0.0&user=a").status == 400


def test_refused_connect_and_bad_vsn_are_403(server):
    srv = server()
    assert RawWS(srv.port, "/socket/websocket?vsn=2.0.0&user=nobody").status == 403
    assert RawWS(srv.port, "/socket/websocket?vsn=2.1.0&user=a").status == 403
    assert RawWS(srv.port, "/socket/websocket?vsn=junk&user=a").status == 403


def test_missing_vsn_means_the_v1_serializer(server):
    ws = RawWS(server().port, "/socket/websocket?user=a")
    assert ws.status == 101
    ws.send_json({"topic": "room:1", "event": "phx_join", "payload": {}, "ref": "1"})
    assert ws.recv_json() == {
        "topic": "room:1",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": "1",
    }


def test_origin_check_is_on_by_default(server):
    srv = server()
    assert RawWS(srv.port, headers={"Origin": "http://127.0.0.1:1234"}).status == 101
    assert RawWS(srv.port, headers={"Origin": "https://evil.example"}).status == 403
    assert RawWS(srv.port, headers={"Origin": "null"}).status == 403
    assert RawWS(srv.port).status == 101  # no Origin: a native client


def test_subprotocol_phoenix_is_echoed_and_unknown_ones_refused(server):
    srv = server(auth_token=True)
    ws = RawWS(srv.port, headers={"Sec-WebSocket-Protocol": "phoenix, base64url.bearer.phx.dG9r"})
    assert ws.status == 101 and ws.headers["sec-websocket-protocol"] == "phoenix"
    assert RawWS(srv.port, headers={"Sec-WebSocket-Protocol": "phoenix"}).headers["sec-websocket-protocol"] == "phoenix"
    assert RawWS(srv.port, headers={"Sec-WebSocket-Protocol": "mqtt"}).status == 403
    assert "sec-websocket-protocol" not in RawWS(srv.port).headers


def test_malformed_upgrades(server):
    srv = server()
    assert RawWS(srv.port, headers={"Sec-WebSocket-Key": "short"}).status == 400
    bad_version = RawWS(srv.port, headers={"Sec-WebSocket-Version": "8"})
    assert bad_version.status == 426 and bad_version.headers["sec-websocket-version"] == "13"


def test_upgrade_response_is_a_clean_101_and_tcp_nodelay_is_set(server):
    srv = server()
    ws = RawWS(srv.port)
    assert ws.status == 101
    assert "content-type" not in ws.headers and "content-length" not in ws.headers
    wait_until(lambda: srv.mount.connections)
    conn = next(iter(srv.mount.connections))
    assert conn.transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


# -- frames ----------------------------------------------------------------------------------


def test_oversize_frame_is_refused_on_its_header_with_1009(server):
    ws = RawWS(server(websocket={"max_frame_size": 1000}).port)
    ws.send_frame(0x1, b"", length=5_000_000)  # announce 5 MB, send nothing
    assert ws.expect_close()[0] == 1009


def test_oversize_fragmented_message_is_1009(server):
    ws = RawWS(server(websocket={"max_frame_size": 1000}).port)
    ws.send_frame(0x1, b"[" + b" " * 600, fin=False)
    ws.send_frame(0x0, b" " * 600, fin=True)
    assert ws.expect_close()[0] == 1009


def test_default_max_frame_size_is_8_mib(server):
    ws = RawWS(server().port)
    ws.send_frame(0x2, b"", length=8 * 1024 * 1024 + 1)
    assert ws.expect_close()[0] == 1009


def test_invalid_utf8_text_is_1007(server):
    ws = RawWS(server().port)
    ws.send_frame(0x1, b'["1","1","room:1","phx_join",{"a":"\xff"}]')
    assert ws.expect_close()[0] == 1007


@pytest.mark.parametrize("text", ["nope", '{"a": 1}', '["1", "1", "room:1"]', "[1, 2, 3, 4, 5]"])
def test_undecodable_frames_close_with_1011(server, text):
    ws = RawWS(server().port)
    ws.send_text(text)
    assert ws.expect_close()[0] == 1011


@pytest.mark.parametrize(
    "kwargs",
    [{"mask": False}, {"rsv": 4}, {"opcode": 0x3}, {"opcode": 0x0}, {"opcode": 0x9, "fin": False}],
)
def test_protocol_violations_close_with_1002(server, kwargs):
    ws = RawWS(server().port)
    opcode = kwargs.pop("opcode", 0x1)
    ws.send_frame(opcode, b"[]", **kwargs)
    assert ws.expect_close()[0] == 1002


def test_ping_is_answered_with_pong_and_fragments_are_reassembled(server):
    ws = RawWS(server().port)
    ws.send_frame(0x9, b"are you there")
    assert ws.recv_frame() == (0xA, b"are you there")
    text = json.dumps(["1", "1", "room:1", "phx_join", {}]).encode()
    ws.send_frame(0x1, text[:5], fin=False)
    ws.send_frame(0x9, b"x")  # control frames may come between fragments
    ws.send_frame(0x0, text[5:10], fin=False)
    ws.send_frame(0x0, text[10:], fin=True)
    assert ws.recv_frame() == (0xA, b"x")
    assert ws.recv_json()[4]["status"] == "ok"


def test_large_binary_message_round_trip(server):
    ws = RawWS(server().port)
    join(ws)
    payload = bytes(range(256)) * 4096  # 1 MiB
    header = bytes([0, 1, 1, 6, 4]) + b"1" + b"2" + b"room:1" + b"ping"
    ws.send_frame(0x2, header + payload)
    op, data = ws.recv_frame()
    assert op == 0x2 and data[0] == 1 and data.endswith(payload)


def test_client_close_is_echoed_and_the_connection_cleaned_up(server):
    srv = server()
    ws = RawWS(srv.port)
    join(ws)
    wait_until(lambda: srv.mount.connections)
    ws.send_frame(0x8, struct.pack("!H", 1000) + b"bye")
    assert ws.expect_close() == (1000, "")
    ws.expect_eof()
    wait_until(lambda: not srv.mount.connections)
    assert "room:1" not in srv.endpoint.pubsub.topics


def test_abrupt_disconnect_cleans_up(server):
    srv = server()
    ws = RawWS(srv.port)
    join(ws)
    ws.send_frame(0x1, b"[", length=100)  # half a frame, then vanish
    ws.close()
    wait_until(lambda: not srv.mount.connections)
    assert "room:1" not in srv.endpoint.pubsub.topics


def test_idle_timeout_closes_with_1001(server):
    ws = RawWS(server(websocket={"timeout": 0.3}).port)
    assert ws.expect_close() == (1001, "idle timeout")


def test_disconnect_broadcast_closes_with_1001(server):
    srv = server()
    ws = RawWS(srv.port, "/socket/websocket?vsn=2.0.0&user=zed")
    join(ws)
    srv.endpoint.broadcast("user:zed", "disconnect", {})
    assert ws.expect_close() == (1001, "disconnected")


def test_a_flood_of_heartbeats_is_answered_in_order(server):
    ws = RawWS(server().port)
    n = 3000
    for i in range(n):
        ws.send_json([None, str(i), "phoenix", "heartbeat", {}])
    refs = [ws.recv_json()[1] for _ in range(n)]
    assert refs == [str(i) for i in range(n)]


def test_bad_client_does_not_affect_another(server):
    srv = server()
    good = RawWS(srv.port, "/socket/websocket?vsn=2.0.0&user=good")
    join(good)
    bad = RawWS(srv.port, "/socket/websocket?vsn=2.0.0&user=bad")
    bad.send_text("garbage")
    assert bad.expect_close()[0] == 1011
    srv.endpoint.broadcast("room:1", "still", {"here": True})
    assert good.recv_until(lambda m: m[3] == "still")[4] == {"here": True}


# -- overload --------------------------------------------------------------------------------


def test_a_client_that_stops_reading_is_dropped_and_readers_get_everything(server):
    srv = server(
        endpoint_opts={
            "max_connection_queue_bytes": 64 * 1024,
            "slow_client_timeout": 0.5,
            "sndbuf": 16 * 1024,
            "max_queued_bytes": 64 * 1024 * 1024,
        }
    )
    reader = RawWS(srv.port, "/socket/websocket?vsn=2.0.0&user=reader")
    stuck = RawWS(srv.port, "/socket/websocket?vsn=2.0.0&user=stuck")
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    join(reader)
    join(stuck)
    wait_until(lambda: len(srv.mount.connections) == 2)
    received: list[int] = []

    def read_all():
        while len(received) < 3000:
            msg = reader.recv_json()
            if msg[3] == "blob":
                received.append(msg[4]["n"])

    g = gevent.spawn(read_all)
    filler = "x" * 1000
    for n in range(3000):
        srv.endpoint.broadcast("room:1", "blob", {"n": n, "fill": filler})
        if n % 50 == 0:
            gevent.sleep(0.01)  # let the reader run; the stuck client never does
    g.join(timeout=30)
    assert received == list(range(3000))
    wait_until(lambda: len(srv.mount.connections) == 1, timeout=10)
    stuck.sock.settimeout(5)
    # The stuck client finds its connection closed (1008 if the close frame fit, else reset).
    try:
        stuck.expect_close()
    except (Closed, ConnectionResetError):
        pass


def test_broadcast_waits_at_the_high_water_mark_then_raises(server):
    srv = server(
        endpoint_opts={
            "max_queued_bytes": 32 * 1024,
            "broadcast_timeout": 0.3,
            "max_connection_queue_bytes": 10**9,
            "slow_client_timeout": 60,
            "sndbuf": 8 * 1024,
        }
    )
    stuck = RawWS(srv.port, "/socket/websocket?vsn=2.0.0&user=stuck")
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    join(stuck)
    filler = "y" * 2000
    with pytest.raises(BroadcastTimeout):
        for n in range(10_000):
            srv.endpoint.broadcast("room:1", "blob", {"n": n, "fill": filler})
    assert flow.queued < 32 * 1024 + 10_000  # bounded: at most one broadcast over the mark
    stuck.close()
    wait_until(lambda: flow.queued < 32 * 1024, timeout=10)


@pytest.mark.parametrize("direct_send", [True, False])
def test_both_write_paths_deliver_everything_in_order(server, direct_send):
    srv = server(endpoint_opts={"direct_send": direct_send})
    clients = [RawWS(srv.port, f"/socket/websocket?vsn=2.0.0&user=c{i}") for i in range(3)]
    for ws in clients:
        join(ws)
    for n in range(500):
        srv.endpoint.broadcast("room:1", "seq", {"n": n})
        if n % 100 == 0:
            gevent.sleep(0)
    for ws in clients:
        got = [ws.recv_until(lambda m: m[3] == "seq")[4]["n"] for _ in range(500)]
        assert got == list(range(500))


# -- reads served by watchers (issue 14) -----------------------------------------------------


def _live_greenlets() -> int:
    import gc

    import greenlet

    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and o and not o.dead)


def test_idle_joined_connections_hold_no_greenlet(server):
    from phx_gevent.transports import websocket

    assert websocket.WATCH_READS
    srv = server()
    first = RawWS(srv.port)
    join(first)
    before = _live_greenlets()
    clients = []
    for i in range(30):
        ws = RawWS(srv.port, path=f"/socket/websocket?vsn=2.0.0&user=u{i}")
        join(ws)
        clients.append(ws)
    wait_until(lambda: len(srv.mount.connections) == 31)
    # 30 more joined connections, and no greenlet each: reads wake a worker only while data arrives.
    assert _live_greenlets() - before < 10
    for ws in clients:  # and every one of them still answers
        ws.send_json([None, "hb", "phoenix", "heartbeat", {}])
        assert ws.recv_until(lambda m: m[1] == "hb")[4]["status"] == "ok"
    clients[0].close()
    wait_until(lambda: len(srv.mount.connections) == 30)


def test_a_fragmented_message_is_reassembled_across_wakeups(server):
    ws = RawWS(server().port)
    text = json.dumps(["1", "1", "room:1", "phx_join", {}]).encode()
    ws.send_frame(0x1, text[:7], fin=False)
    ws.send_frame(0x9, b"a")
    assert ws.recv_frame() == (0xA, b"a")  # the server has read everything sent so far
    ws.send_frame(0x0, text[7:12], fin=False)
    ws.send_frame(0x9, b"b")
    assert ws.recv_frame() == (0xA, b"b")
    # The last fragment's bytes one by one: each may be a wake-up of its own.
    mask = b"\x00\x00\x00\x00"
    rest = text[12:]
    raw = bytes([0x80, 0x80 | len(rest)]) + mask + rest
    for i in range(len(raw)):
        ws.sock.sendall(raw[i : i + 1])
    assert ws.recv_json()[4]["status"] == "ok"


def test_gunicorn_style_access_log_line_waits_for_the_end_of_the_connection(server):
    srv = server()
    ws = RawWS(srv.port)
    join(ws)
    wait_until(lambda: srv.mount.connections)
    (conn,) = list(srv.mount.connections)
    handler = conn.transport._handler
    assert handler is not None and handler.phx_log_deferred  # not logged while open
    ws.send_frame(0x8, struct.pack("!H", 1000))
    assert ws.expect_close() == (1000, "")
    wait_until(lambda: not handler.phx_log_deferred)
    assert handler.time_finish >= handler.time_start
