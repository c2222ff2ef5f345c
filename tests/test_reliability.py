"""Hostile clients and failing parts (issue 17): each attack of the review as a test.

Every test here failed before its fix. They use the raw clients (tests/rawws.py,
plain sockets) because well-behaved clients never send what they send.
"""

from __future__ import annotations

import functools
import json
import socket
import struct

import gevent
import pytest
from flask import Flask

from phx_gevent import Channel, Endpoint, Socket, channel, ok
from phx_gevent.flow import flow
from phx_gevent.runtime import runtime
from tests.handlers import UserSocket
from tests.rawws import RawWS, join
from tests.servers import wait_until


@pytest.fixture
def server(mounted):
    """``server(endpoint_opts=None, **socket_opts)``: tests.handlers.UserSocket on a fresh app."""
    return functools.partial(mounted, UserSocket)


class _SettingsOwner:
    """Holds runtime settings for a test without an endpoint (an owner must be weakly referenceable)."""


def closed_by_server(ws: RawWS) -> bool:
    """True once the server closed (close frame, FIN or reset); reads without blocking long."""
    ws.sock.settimeout(2)
    try:
        while True:
            chunk = ws.sock.recv(1 << 20)
            if not chunk:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except OSError:
        return False


# -- 1. slow readers cannot hold the process's budget hostage ------------------------------------


def test_ten_slow_readers_with_big_replies_do_not_stall_broadcasts(server):
    """Ten clients that never read each get a reply above the per-connection soft cap and keep
    sending unsolicited PONGs: broadcasts to the others never wait, and the ten are dropped on a
    timer (no write to them is needed)."""
    srv = server(
        endpoint_opts={
            "max_connection_queue_bytes": 64 * 1024,
            "max_queued_bytes": 1024 * 1024,
            "broadcast_timeout": 0.5,
            "slow_client_timeout": 0.5,
            "sndbuf": 8 * 1024,
        }
    )
    reader = RawWS(srv.port, "/socket/websocket?vsn=2.0.0&user=reader")
    join(reader)
    hostile = []
    for i in range(10):
        ws = RawWS(srv.port, f"/socket/websocket?vsn=2.0.0&user=h{i}")
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        join(ws, "room:h", "1")
        # ~200 KB reply each: above the 64 KB soft cap, under the 256 KB hard cap.
        ws.send_json(["1", "2", "room:h", "ping", {"blob": "z" * 200_000}])
        hostile.append(ws)
    wait_until(lambda: len(srv.mount.connections) == 11, what="all connected")

    stop = False

    def pong_forever():
        while not stop:
            for ws in hostile:
                try:
                    ws.send_frame(0xA, b"alive")
                except OSError:
                    pass
            gevent.sleep(0.05)

    ponger = gevent.spawn(pong_forever)
    try:
        # The replies were queued: broadcasts must not wait for them (timeout 0.5 s would raise).
        for n in range(200):
            srv.endpoint.broadcast("room:1", "tick", {"n": n})
            assert reader.recv_until(lambda m: m[3] == "tick")[4]["n"] == n
        # The hostile ones go although nothing more is written to them and they keep PONGing.
        wait_until(lambda: len(srv.mount.connections) == 1, timeout=10, what="hostile connections dropped")
    finally:
        stop = True
        ponger.join(timeout=2)
    assert flow.queued < 64 * 1024


def test_replies_are_flow_controlled_per_connection(server, caplog):
    """A client that asks for replies faster than it reads them stops being read (TCP pushes back)
    instead of piling replies up to the hard cap; it is dropped on the timer if it never drains."""
    srv = server(
        endpoint_opts={"max_connection_queue_bytes": 64 * 1024, "slow_client_timeout": 0.5, "sndbuf": 8 * 1024}
    )
    ws = RawWS(srv.port, "/socket/websocket?vsn=2.0.0&user=greedy")
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    join(ws)

    def send_all():
        for i in range(40):
            ws.send_json(["1", str(i + 10), "room:1", "echo", {"blob": "q" * 20_000}])

    sender = gevent.spawn(send_all)
    try:
        wait_until(lambda: not srv.mount.connections, timeout=10, what="greedy client dropped")
    finally:
        sender.kill()
    # Without reply flow control all 40 replies (~800 KB) are queued and the hard cap (256 KB)
    # drops the connection at once; with it, the reader stops at the soft cap and the drain
    # timer drops the connection.
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "hard cap" in m], messages
    assert [m for m in messages if "drained nothing" in m], messages


# -- 4. JSON that decodes but cannot be re-encoded ------------------------------------------------

_POISON_V2 = [
    '["1","1","room:1","phx_join",{"a":NaN}]',
    '[NaN,"1","room:1","phx_join",{}]',
    '[null,NaN,"phoenix","heartbeat",{}]',
    '[null,Infinity,"phoenix","heartbeat",{}]',
    '[null,1e400,"phoenix","heartbeat",{}]',
    '[null,"1","phoenix","heartbeat",{"x":-1e999}]',
    '["\\ud800","1","room:1","phx_join",{}]',
    '["1","1","room:1","phx_join",{"body":"\\udfff"}]',
]


def _no_tracebacks(caplog) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelname in ("ERROR", "CRITICAL")]
    assert not bad, [r.getMessage() for r in bad]


@pytest.mark.parametrize("text", _POISON_V2)
def test_unencodable_json_is_refused_at_decode_v2(server, caplog, text):
    srv = server()
    ws = RawWS(srv.port)
    ws.send_text(text)
    # At once (no join timeout), 1011 as for any undecodable frame, and no traceback.
    ws.sock.settimeout(3)
    assert ws.expect_close()[0] == 1011
    _no_tracebacks(caplog)


@pytest.mark.parametrize(
    "text",
    [
        '{"topic":"phoenix","event":"heartbeat","payload":{},"ref":NaN}',
        '{"topic":"room:1","event":"phx_join","payload":{},"ref":"1","join_ref":Infinity}',
        '{"topic":"room:1","event":"phx_join","payload":{"s":"\\ud800"},"ref":"1"}',
    ],
)
def test_unencodable_json_is_refused_at_decode_v1(server, caplog, text):
    srv = server()
    ws = RawWS(srv.port, "/socket/websocket?user=v1")
    ws.send_text(text)
    ws.sock.settimeout(3)
    assert ws.expect_close()[0] == 1011
    _no_tracebacks(caplog)


def test_valid_surrogate_pairs_and_big_finite_numbers_still_pass(server):
    srv = server()
    ws = RawWS(srv.port)
    join(ws)
    ws.send_text('["1","2","room:1","echo",{"s":"\\ud83d\\ude00","f":1.5e300,"i":123456789012345678901234567890}]')
    reply = ws.recv_until(lambda m: m[1] == "2")
    assert reply[4]["response"] == {"s": "\U0001f600", "f": 1.5e300, "i": 123456789012345678901234567890}


def test_one_long_poll_clients_data_never_breaks_anothers_delivery(live_server, caplog):
    from tests.test_longpoll import LP, join_line, make_app

    app, endpoint = make_app(longpoll={"window_ms": 500})
    srv = live_server(app)
    alice, bob = LP(srv, {"user": "alice", "vsn": "2.0.0"}), LP(srv, {"user": "bob", "vsn": "2.0.0"})
    for lp in (alice, bob):
        lp.open()
        assert lp.post(join_line()).json() == {"status": 200}
        assert lp.collect(1)[0][3] == "phx_reply"
    endpoint.broadcast("room:1", "before", {"n": 1})
    # Alice's poison is refused at decode (400), so it never reaches bob's buffer.
    bad = alice.post('["1","2","room:1","echo",{"body":"\\ud800"}]')
    assert bad.status == 400
    endpoint.broadcast("room:1", "after", {"n": 2})
    frames = bob.collect(2)
    assert [f[3] for f in frames] == ["before", "after"]
    _no_tracebacks(caplog)


def test_a_long_poll_response_survives_a_frame_that_cannot_be_encoded(live_server, caplog):
    """Defence in depth: server code that pushes a lone surrogate loses that frame, not the others."""
    from tests.test_longpoll import LP, join_line, make_app

    app, endpoint = make_app(longpoll={"window_ms": 500})
    srv = live_server(app)
    bob = LP(srv)
    bob.open()
    bob.post(join_line())
    bob.collect(1)
    endpoint.broadcast("room:1", "before", {"n": 1})
    endpoint.broadcast("room:1", "poison", {"s": "\ud800"})
    endpoint.broadcast("room:1", "after", {"n": 2})
    data = bob.request("GET", token=bob.token)
    assert data.status == 200
    assert [json.loads(m)[3] for m in data.json()["messages"]] == ["before", "after"]


class CrashChannel(Channel):
    def join(self, topic, payload, socket):
        return ok()

    def handle_in(self, event, payload, socket):
        raise RuntimeError("crash requested by the client")


class CrashSocket(Socket):
    channels = [channel("crash:*", CrashChannel)]

    def connect(self, params, socket, connect_info):
        return socket

    def id(self, socket):
        return None


def test_a_client_that_crashes_its_channels_at_will_gets_one_traceback_per_interval(live_server, caplog):
    app = Flask(__name__)
    Endpoint(app).socket("/socket", CrashSocket)
    srv = live_server(app)
    ws = RawWS(srv.port)
    for i in range(30):
        ref = str(i)
        join(ws, f"crash:{i}", ref)
        ws.send_json([ref, f"x{i}", f"crash:{i}", "boom", {}])
        ws.recv_until(lambda m, ref=ref: m[0] == ref and m[3] == "phx_error")
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]


# -- 3 and 10. partial uploads: token first, timeouts, a process-wide budget ---------------------

_INPUT = ("input_timeout", "max_incomplete")


@pytest.fixture
def restore_input():
    saved = {name: getattr(flow, name) for name in _INPUT}
    yield flow
    for name, value in saved.items():
        setattr(flow, name, value)
    flow.incomplete = 0


def raw_http(port: int, head: str, body: bytes = b"", timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and everything up to EOF (the server must close: raises on timeout)."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def lp_app(**longpoll):
    from tests.test_longpoll import make_app

    return make_app(longpoll={"window_ms": 500, **longpoll})


def post_head(port: int, token: str, length: int) -> str:
    return (
        f"POST /socket/longpoll?vsn=2.0.0&user=bob&token={token} HTTP/1.1\n"
        f"Host: 127.0.0.1:{port}\nContent-Type: application/x-ndjson\nContent-Length: {length}\n"
    )


def test_a_post_announcing_too_much_gets_413_and_is_closed_not_read(live_server):
    app, _ = lp_app()
    srv = live_server(app)
    sock = raw_http(srv.port, post_head(srv.port, "x", 1 << 30), b"a" * 1000)
    status, data = read_response(sock)  # EOF right after the answer: nothing more is read
    assert status == 413 and b"connection: close" in data.lower()


def test_the_long_poll_token_is_checked_before_the_body_is_read(live_server):
    app, _ = lp_app()
    srv = live_server(app)
    # A bad token and a body that never comes: answered at once, connection closed.
    sock = raw_http(srv.port, post_head(srv.port, "forged", 4 << 20), b"[" * 100)
    status, data = read_response(sock)
    assert status == 200 and json.loads(data.split(b"\r\n\r\n", 1)[1]) == {"status": 410}


def test_a_slow_long_poll_body_times_out(live_server, restore_input):
    from tests.test_longpoll import LP

    restore_input.configure(input_timeout=0.5)
    app, _ = lp_app()
    srv = live_server(app)
    lp = LP(srv)
    token = lp.open()
    sock = raw_http(srv.port, post_head(srv.port, token, 100_000), b"[")
    status, _ = read_response(sock)
    assert status == 408
    assert flow.incomplete == 0


def test_a_slow_websocket_frame_times_out(server, restore_input):
    restore_input.configure(input_timeout=0.5)
    srv = server()
    ws = RawWS(srv.port)
    join(ws)
    # A 1 MB frame header, its mask and 100 bytes of payload, then nothing.
    ws.sock.sendall(struct.pack("!BBQ", 0x81, 0x80 | 127, 1_000_000) + b"\x00\x00\x00\x00" + b"x" * 100)
    wait_until(lambda: not srv.mount.connections, timeout=5, what="the slow frame's connection dropped")
    assert closed_by_server(ws)
    assert flow.incomplete == 0


def test_incomplete_inputs_share_a_process_wide_budget(server, live_server, restore_input):
    restore_input.configure(max_incomplete_input_bytes=1_000_000, input_timeout=30)
    srv = server(longpoll={"window_ms": 500})
    first = RawWS(srv.port)
    join(first)
    first.sock.sendall(struct.pack("!BBQ", 0x81, 0x80 | 127, 700_000) + b"\x00\x00\x00\x00" + b"x" * 100)
    wait_until(lambda: flow.incomplete >= 700_000, timeout=5, what="the first frame reserved")
    second = RawWS(srv.port, "/socket/websocket?vsn=2.0.0&user=second")
    join(second)
    second.sock.sendall(struct.pack("!BBQ", 0x81, 0x80 | 127, 700_000) + b"\x00\x00\x00\x00" + b"x" * 100)
    second.sock.settimeout(5)
    assert second.expect_close()[0] == 1013  # try again later
    # The first completes normally and gives its share back.
    first.sock.sendall(b"x" * (700_000 - 100))
    first.sock.settimeout(5)
    assert first.expect_close()[0] == 1011  # 700 KB of "x" is not JSON: decoded, refused, but read in full
    wait_until(lambda: flow.incomplete == 0, timeout=5, what="the budget released")


# -- 8. SIGTERM while a gunicorn worker boots ----------------------------------------------------


def test_a_drain_while_the_server_starts_does_not_break_its_start(monkeypatch):
    import logging
    import types

    from phx_gevent import worker

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    server = worker._Server(listener, application=lambda e, s: [], log=None)
    fake = types.SimpleNamespace(cfg=types.SimpleNamespace(graceful_timeout=2), log=logging.getLogger("t"))
    real_init = server.init_socket

    def init_then_sigterm():
        # gevent's start() can switch greenlets inside init_socket(): SIGTERM's drain runs there
        # (reproduced under gunicorn: 1 boot in 12 crashed with "no attribute 'socket'").
        real_init()
        worker.GeventWebSocketWorker._drain(fake)

    monkeypatch.setattr(server, "init_socket", init_then_sigterm)
    monkeypatch.setattr(worker, "_stopping", False, raising=False)
    try:
        server.start()
        # The drain came first: the server closes as soon as it has started, never accepts.
        assert server.closed
    finally:
        server.close()
        listener.close()


# -- 9. allowed hosts ------------------------------------------------------------------------------


def _hello_app(**endpoint_opts):
    from flask import request

    app = Flask(__name__)
    endpoint = Endpoint(app, **endpoint_opts)
    endpoint.socket("/socket", UserSocket, longpoll=True)

    @app.route("/addr")
    def addr():
        return request.remote_addr or ""

    return app, endpoint


def http_get(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    head = f"GET {path} HTTP/1.1\n" + "".join(f"{k}: {v}\n" for k, v in headers.items()) + "Connection: close\n"
    status, data = read_response(raw_http(port, head))
    return status, data.split(b"\r\n\r\n", 1)[1]


def test_serve_on_loopback_accepts_only_loopback_host_names(live_server):
    app, _ = _hello_app()
    srv = live_server(app)  # make_server on 127.0.0.1, defaults
    assert http_get(srv.port, "/addr", {"Host": f"127.0.0.1:{srv.port}"})[0] == 200
    assert http_get(srv.port, "/addr", {"Host": f"localhost:{srv.port}"})[0] == 200
    assert http_get(srv.port, "/addr", {"Host": "[::1]"})[0] == 200
    # A DNS-rebinding page reaches the app under its own name: refused before any view runs.
    assert http_get(srv.port, "/addr", {"Host": "rebind.attacker.example"})[0] == 400
    # RawWS sends its own Host first: two Host headers are refused too, never guessed from.
    ws = RawWS(srv.port, headers={"Host": "rebind.attacker.example", "Origin": "http://rebind.attacker.example"})
    assert ws.status == 400


def test_endpoint_allowed_hosts_and_explicit_server_settings():
    from phx_gevent import make_server

    app, _ = _hello_app(allowed_hosts=["chat.example", "*.chat.example"])
    server = make_server(app, "127.0.0.1", 0, allowed_hosts=None)  # the server checks nothing itself
    server.start()
    try:
        port = server.server_port
        assert http_get(port, "/addr", {"Host": "chat.example"})[0] == 200
        assert http_get(port, "/addr", {"Host": "eu.chat.example:443"})[0] == 200
        assert http_get(port, "/addr", {"Host": "evil.example"})[0] == 400
        assert http_get(port, "/addr", {"Host": "127.0.0.1"})[0] == 400
    finally:
        server.stop(timeout=1)
    with pytest.raises(ValueError):
        Endpoint(allowed_hosts="chat.example")  # a string, not a list: refused, not split into letters


# -- 5. slowloris: a request head must arrive in time ------------------------------------------


def test_an_incomplete_request_head_is_dropped_after_the_header_timeout():
    from phx_gevent import make_server

    app, _ = _hello_app()
    server = make_server(app, "127.0.0.1", 0, header_timeout=0.5)
    server.start()
    try:
        sock = socket.create_connection(("127.0.0.1", server.server_port), timeout=5)
        sock.sendall(b"GET /addr HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sock.sendall(b"X-Slow: 1")  # a few bytes now and then, never the blank line
        assert sock.recv(1024) == b""  # closed by the server (a recv timeout would raise)
        # A complete request on a fresh connection is served as usual.
        assert http_get(server.server_port, "/addr", {"Host": "127.0.0.1"})[0] == 200
    finally:
        server.stop(timeout=1)


# -- 11. trusted proxies and inbound message rate ------------------------------------------------


def test_trusted_proxies_give_the_real_client_address(live_server):
    app, _ = _hello_app(trusted_proxies=["127.0.0.1"])
    port = live_server(app).port
    headers = {"Host": "127.0.0.1", "X-Forwarded-For": "198.51.100.1, 203.0.113.9"}
    assert http_get(port, "/addr", headers)[1] == b"203.0.113.9"  # the proxy's own view of its client
    untrusted_app, _ = _hello_app()
    port = live_server(untrusted_app).port
    assert http_get(port, "/addr", headers)[1] == b"127.0.0.1"  # not trusted: the header is ignored


def test_a_client_pushing_too_fast_is_throttled(server):
    srv = server(websocket={"max_message_rate": 50, "message_burst": 20})
    ws = RawWS(srv.port)
    for i in range(60):
        ws.send_json([None, str(i), "phoenix", "heartbeat", {}])
    refs = [ws.recv_json()[1] for _ in range(60)]
    assert refs == [str(i) for i in range(60)]  # all answered, in order: throttled, not dropped
    conn = next(iter(srv.mount.connections))
    assert conn.transport.throttled >= 30


# -- 6. long-poll sessions: cheap to evict, per-address creation rate ----------------------------


def test_sessions_that_never_polled_are_evicted_first(live_server):
    from tests.test_longpoll import LP

    app, endpoint = lp_app(max_sessions=5)
    srv = live_server(app)
    abandoned = [LP(srv) for _ in range(5)]
    for lp in abandoned:
        lp.open()  # created, never polled
    fresh = LP(srv)
    fresh.open()  # at the cap: the oldest never-polled session makes room instead of a 503
    assert fresh.poll()["status"] == 204
    assert len(longpoll_sessions(endpoint)) == 5
    assert abandoned[0].poll()["status"] == 410  # evicted: told its session is gone


def longpoll_sessions(endpoint):
    return endpoint.mounts[0].longpoll.sessions


def test_session_creation_is_rate_limited_per_address(live_server):
    from tests.test_longpoll import LP

    app, endpoint = lp_app(address_rate=0.001, address_burst=3)
    srv = live_server(app)
    for _ in range(3):
        LP(srv).open()
    assert LP(srv).request("GET").status == 429


def test_a_thousand_long_poll_clients_from_loopback_pass_the_default_limits(live_server):
    from tests.test_longpoll import LP

    app, endpoint = lp_app(window_ms=10_000)
    srv = live_server(app)
    tokens = {LP(srv).open() for _ in range(1000)}  # each open() asserts a 410 with a new token
    assert len(tokens) == 1000 and len(longpoll_sessions(endpoint)) == 1000


# -- 2. hub callbacks survive a failure ------------------------------------------------------------


class _BadRaw:
    """A raw socket whose send() fails with something that is not an OSError (a bug)."""

    def send(self, data):
        raise RuntimeError("a bug in a send path")

    def fileno(self):
        return -1

    def shutdown(self, how):
        pass

    def setsockopt(self, *args):
        pass


class _GoodRaw(_BadRaw):
    def __init__(self):
        self.sent = b""

    def send(self, data):
        self.sent += bytes(data)
        return len(data)


def test_the_flusher_survives_a_failing_writer(request):
    from phx_gevent import supervise
    from phx_gevent.transports.writer import Writer

    owner = _SettingsOwner()
    runtime.claim(owner, direct_send=False)
    request.addfinalizer(lambda: runtime.release(owner))
    before = supervise.counters.get("writer flusher", {}).get("failures", 0)
    bad = Writer(_BadRaw(), None)
    good = Writer(_GoodRaw(), None)
    bad.write(b"one")
    good.write(b"two")
    wait_until(lambda: good.raw.sent == b"two", timeout=5, what="the good writer flushed")
    # And later bursts still go out: the flusher was not left armed and dead.
    good.write(b"three")
    wait_until(lambda: good.raw.sent == b"twothree", timeout=5, what="the next burst flushed")
    assert bad.state == 2  # CLOSED: only the broken connection paid
    assert supervise.counters.get("writer flusher", {}).get("failures", 0) == before


def test_replies_wait_while_the_process_is_over_its_high_water_mark(server):
    srv = server(endpoint_opts={"broadcast_timeout": 30})
    ws = RawWS(srv.port)
    join(ws)
    over = flow.high_water + 1
    flow.queued += over  # as if other connections held more than the high-water mark
    try:
        ws.send_json(["1", "7", "room:1", "echo", {"n": 7}])
        ws.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            ws.recv_frame()  # the reply waits, as a broadcast would
    finally:
        flow.release(over)
    ws.sock.settimeout(5)
    assert ws.recv_until(lambda m: m[1] == "7")[4]["response"] == {"n": 7}
