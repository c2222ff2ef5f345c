"""Upgrades answered without Flask's full dispatch (transports/fastpath.py) keep Flask's semantics.

The fast path is taken only when nothing of the app would run differently;
``connect`` still runs inside a request context (``request``, ``g``,
``current_app``, ``session``), and an app hook (``before_request``,
``after_request``) sends the upgrade through Flask as before.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, current_app, g, request, session

from phx_gevent import Endpoint, Socket
from phx_gevent.transports import fastpath
from tests.rawws import RawWS

SEEN: list[dict[str, Any]] = []


class InspectingSocket(Socket):
    def connect(self, params: dict, socket: Any, connect_info: dict):
        g.phx = "set in connect"
        SEEN.append({"path": request.path, "app": current_app.name, "ua": request.headers.get("User-Agent")})
        if params.get("remember"):
            session["remembered"] = params["remember"]
        return socket


def make_app(middleware: bool = False) -> tuple[Flask, list[str]]:
    app = Flask("fastpath_app")
    app.config["SECRET_KEY"] = "test-secret"
    if middleware:  # WSGI middleware installed before the endpoint: upgrades must still pass through it
        inner = app.wsgi_app

        def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
            environ["HTTP_USER_AGENT"] = "via-middleware"
            return inner(environ, start_response)

        app.wsgi_app = wrapped  # type: ignore[method-assign]
    Endpoint(app).socket("/socket", InspectingSocket)
    dispatched: list[str] = []
    full = app.full_dispatch_request

    def counting() -> Any:
        dispatched.append(request.path)
        return full()

    app.full_dispatch_request = counting  # type: ignore[method-assign]
    torn_down: list[Any] = []
    app.teardown_request(lambda exc: torn_down.append(g.get("phx")))
    app.config["TORN_DOWN"] = torn_down
    return app, dispatched


def test_upgrade_skips_flask_dispatch_and_connect_keeps_the_request_context(live_server):
    SEEN.clear()
    app, dispatched = make_app()
    srv = live_server(app)
    ws = RawWS(srv.port, "/socket/websocket?vsn=2.0.0", headers={"User-Agent": "ua-1"})
    assert ws.status == 101
    assert "set-cookie" not in ws.headers  # the session was never read: nothing to save
    assert isinstance(fastpath.install(app), fastpath.UpgradeFastPath)  # the app's (innermost) fast path
    assert dispatched == []  # answered by the fast path
    assert SEEN == [{"path": "/socket/websocket", "app": "fastpath_app", "ua": "ua-1"}]
    assert app.config["TORN_DOWN"] == ["set in connect"]  # teardown ran in the same context
    ws.send_json([None, "1", "phoenix", "heartbeat", {}])
    assert ws.recv_json()[3] == "phx_reply"
    ws.close()


def test_a_session_written_in_connect_is_saved_on_the_101(live_server):
    app, dispatched = make_app()
    srv = live_server(app)
    ws = RawWS(srv.port, "/socket/websocket?vsn=2.0.0&remember=yes")
    assert ws.status == 101
    assert "session=" in ws.headers.get("set-cookie", "")
    assert dispatched == []
    ws.close()


def test_app_hooks_send_upgrades_through_flask(live_server):
    app, dispatched = make_app()
    calls: list[str] = []

    @app.before_request
    def count() -> None:
        calls.append(request.path)

    @app.after_request
    def tag(resp: Any) -> Any:
        resp.headers["X-Seen"] = "yes"
        return resp

    srv = live_server(app)
    ws = RawWS(srv.port, "/socket/websocket?vsn=2.0.0")
    assert ws.status == 101
    assert ws.headers.get("x-seen") == "yes"
    assert calls == ["/socket/websocket"]
    assert dispatched == ["/socket/websocket"]
    ws.close()


def test_refusals_and_bad_requests_still_get_flask_answers(live_server):
    app, dispatched = make_app()
    srv = live_server(app)
    bad = RawWS(srv.port, "/socket/websocket?vsn=9.9.9")  # unsupported vsn: a plain refusal
    assert bad.status == 403
    old = RawWS(srv.port, "/socket/websocket?vsn=2.0.0", headers={"Sec-WebSocket-Version": "8"})
    assert old.status == 426 and old.headers.get("sec-websocket-version") == "13"
    assert dispatched == []


def test_middleware_installed_before_the_endpoint_keeps_the_flask_path(live_server):
    SEEN.clear()
    app, dispatched = make_app(middleware=True)
    srv = live_server(app)
    ws = RawWS(srv.port, "/socket/websocket?vsn=2.0.0")
    assert ws.status == 101
    assert fastpath.install(app) is None
    assert dispatched == ["/socket/websocket"]
    assert SEEN[-1]["ua"] == "via-middleware"
    ws.close()
