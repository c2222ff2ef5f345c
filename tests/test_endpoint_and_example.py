"""The Endpoint API, the example app's HTTP contract, logging, GC hooks, and import hygiene."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from flask import Flask

import phx_gevent
from phx_gevent import BroadcastTimeout, Channel, Endpoint, Socket, channel, memory, ok
from tests import httpclient as http
from tests.fakes import make_connection, msg
from tests.jsclient import ROOT
from tests.rawws import RawWS


class C(Channel):
    def join(self, topic, payload, socket):
        return ok()

    def handle_in(self, event, payload, socket):
        socket.transport_pid.send("garbage_collect")
        return ok()


class S(Socket):
    channels = [channel("c:*", C)]


def test_socket_mounted_before_or_after_init_app(live_server):
    early = Endpoint()
    early.socket("/early", S)
    app = Flask(__name__)
    early.init_app(app)
    late = Endpoint(app, name="late")
    late.socket("/late", S)
    srv = live_server(app)
    assert RawWS(srv.port, "/early/websocket?vsn=2.0.0").status == 101
    assert RawWS(srv.port, "/late/websocket?vsn=2.0.0").status == 101
    assert {r.endpoint for r in app.url_map.iter_rules()} >= {"phx_gevent.socket0_ws_1", "late.socket0_ws_1"}


def test_path_params_become_connect_params(live_server):
    seen = {}

    class P(Socket):
        def connect(self, params, socket, connect_info):
            seen.update(params)
            return socket

    app = Flask(__name__)
    Endpoint(app).socket("/ws/:tenant/:_secret", P)
    srv = live_server(app)
    assert RawWS(srv.port, "/ws/acme/zzz/websocket?vsn=2.0.0&x=1").status == 101
    assert seen == {"tenant": "acme", "x": "1", "vsn": "2.0.0"}


def test_bad_options_are_refused_at_mount_time():
    endpoint = Endpoint()
    with pytest.raises(TypeError):
        endpoint.socket("/s", object)
    with pytest.raises(ValueError):
        endpoint.socket("s", S)
    with pytest.raises(TypeError):
        endpoint.socket("/s", S, websocket={"nope": 1})
    with pytest.raises(ValueError):
        endpoint.socket("/s", S, connect_info=["cookies"])
    with pytest.raises(ValueError):
        endpoint.socket("/s", S, log="loud")


def test_broadcast_validates_its_arguments():
    endpoint = Endpoint()
    with pytest.raises(TypeError):
        endpoint.broadcast("t", "e", [1])
    with pytest.raises(TypeError):
        endpoint.broadcast(1, "e", {})
    with pytest.raises(TypeError):
        endpoint.broadcast("t", None, {})


def test_in_process_listeners_through_blinker_are_isolated():
    endpoint = Endpoint()
    got = []

    def boom(topic, **kw):
        raise RuntimeError("listener bug")

    endpoint.subscribe("news", lambda topic, **kw: got.append((topic, kw["event"], kw["payload"])))
    endpoint.subscribe("news", boom)
    endpoint.pubsub.connect(lambda topic, **kw: got.append(("any", topic)))
    endpoint.broadcast("news", "e", {"a": 1})
    endpoint.local_broadcast("other", "e", {})
    assert ("news", "e", {"a": 1}) in got and ("any", "news") in got and ("any", "other") in got


def test_log_option_controls_socket_action_logs(caplog):
    conn, t, _ = make_connection(S, log="debug")
    with caplog.at_level(logging.DEBUG, logger="phx_gevent"):
        conn.handle(msg("1", "1", "c:1", "phx_join", {}))
        t.wait_event("phx_reply")
    assert any("JOINED c:1" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
    caplog.clear()
    conn2, t2, _ = make_connection(S)  # make_connection uses log=False
    with caplog.at_level(logging.DEBUG, logger="phx_gevent"):
        conn2.handle(msg("1", "1", "c:1", "phx_join", {}))
        t2.wait_event("phx_reply")
    assert not any("JOINED" in r.getMessage() for r in caplog.records)


def test_library_never_configures_logging():
    code = "import logging, phx_gevent, phx_gevent.worker; assert logging.getLogger().handlers == []; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_import_does_not_monkey_patch():
    code = (
        "import phx_gevent, phx_gevent.worker, phx_gevent.server\n"
        "from gevent import monkey\n"
        "assert not monkey.is_module_patched('socket'), 'patched at import'\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_garbage_collect_message_and_fullsweep_after(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "collect", lambda force=False: calls.append(1) or True)
    conn, t, _ = make_connection(S)
    conn.handle(msg("1", "1", "c:1", "phx_join", {}))
    conn.handle(msg("1", "2", "c:1", "gc", {}))
    t.wait_event("phx_reply", ref="2")
    assert calls == [1]


def test_fullsweep_after_runs_collections_over_websocket(live_server, monkeypatch):
    from phx_gevent.transports import websocket as ws_module

    calls = []
    monkeypatch.setattr(ws_module.memory, "collect", lambda force=False: calls.append(1) or True)
    app = Flask(__name__)
    Endpoint(app).socket("/socket", Socket, websocket={"fullsweep_after": 2})
    srv = live_server(app)
    ws = RawWS(srv.port, "/socket/websocket?vsn=2.0.0")
    for i in range(7):
        ws.send_json([None, str(i), "phoenix", "heartbeat", {}])
    for _ in range(7):
        ws.recv_json()
    assert len(calls) == 2  # after the 3rd and the 6th message


def test_memory_collect_is_rate_limited():
    assert memory.collect(force=True) is True
    assert memory.collect() is False


def test_partitions_default_to_usable_cores_and_count_joined_channels():
    conn, t, endpoint = make_connection(S)
    stats = endpoint.mounts[0].partitions.stats()
    assert len(stats) == phx_gevent.channels.pool.default_partitions()
    conn.handle(msg("1", "1", "c:1", "phx_join", {}))
    t.wait_event("phx_reply")
    assert sum(p["joined"] for p in endpoint.mounts[0].partitions.stats()) == 1
    conn2, t2, _ = make_connection(S, partitions=3)
    assert len(conn2.mount.partitions.stats()) == 3


# -- the example app's HTTP contract ---------------------------------------------------------


@pytest.fixture
def example_app():
    import app_example

    app, endpoint = app_example.create_app()
    return app, endpoint


def test_example_broadcast_and_disconnect_statuses(example_app, monkeypatch):
    app, endpoint = example_app
    client = app.test_client()
    local = {"REMOTE_ADDR": "127.0.0.1"}
    assert (
        client.post("/broadcast", json={"topic": "room:1", "event": "e", "payload": {}}, environ_base=local).status_code
        == 204
    )
    assert (
        client.post("/broadcast", data="{bad", content_type="application/json", environ_base=local).status_code == 400
    )
    assert (
        client.post(
            "/broadcast", json={"topic": "room:1", "event": "e", "payload": [1]}, environ_base=local
        ).status_code
        == 400
    )
    assert client.post("/broadcast", json={"event": "e", "payload": {}}, environ_base=local).status_code == 400
    assert client.post("/disconnect", json={"user": "bob"}, environ_base=local).status_code == 204
    assert client.post("/disconnect", json={}, environ_base=local).status_code == 400
    for remote in ("10.1.2.3", "192.168.0.1", "2001:db8::1"):
        env = {"REMOTE_ADDR": remote}
        assert (
            client.post("/broadcast", json={"topic": "t", "event": "e", "payload": {}}, environ_base=env).status_code
            == 403
        )
        assert client.post("/disconnect", json={"user": "x"}, environ_base=env).status_code == 403
    for remote in ("::1", "127.0.0.2", "::ffff:127.0.0.1"):
        env = {"REMOTE_ADDR": remote}
        assert client.post("/disconnect", json={"user": "x"}, environ_base=env).status_code == 204

    def overloaded(*args):
        raise BroadcastTimeout("busy")

    monkeypatch.setattr(endpoint, "broadcast", overloaded)
    assert (
        client.post("/broadcast", json={"topic": "t", "event": "e", "payload": {}}, environ_base=local).status_code
        == 503
    )


def test_example_page_uses_phoenix_js_from_the_npm_package(example):
    page = http.get(example.http + "/")
    assert page.status == 200 and b'from "/assets/phoenix.mjs"' in page.body
    js = http.get(example.http + "/assets/phoenix.mjs")
    assert js.status == 200 and js.headers["content-type"].startswith("text/javascript")
    assert js.body == (ROOT / "node_modules" / "phoenix" / "priv" / "static" / "phoenix.mjs").read_bytes()


def test_example_connect_requires_a_user_of_1_to_64_characters(example):
    for query in ("", "user=", "user=" + "x" * 65, "user[a]=1"):
        assert RawWS(example.port, f"/socket/websocket?vsn=2.0.0&{query}").status == 403, query
    assert RawWS(example.port, "/socket/websocket?vsn=2.0.0&user=" + "x" * 64 + "&other=ignored").status == 101
