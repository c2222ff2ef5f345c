"""``connect_info=["session"]``: the Flask session, only with the page's CSRF token (PROTOCOL.md 3.5).

A page on another site can make the browser open a WebSocket to us with our
cookies (origin checks aside), but cannot read the token rendered into our
pages; without it, ``connect`` sees ``session = None``.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import pytest
from flask import Flask, session

from phx_gevent import Channel, Endpoint, Socket, channel, csrf_token, ok
from tests import httpclient as http


class WhoChannel(Channel):
    def join(self, topic: str, payload: Any, socket: Any):
        return ok({"session": socket.assigns["session"]})


class SessionSocket(Socket):
    channels = [channel("who:*", WhoChannel)]

    def connect(self, params: dict, socket: Any, connect_info: dict):
        return socket.assign(session=connect_info["session"])


def make_app(**socket_opts: Any) -> Flask:
    app = Flask("session_app")
    app.config["SECRET_KEY"] = "test-secret"
    endpoint = Endpoint(app)
    endpoint.socket("/socket", SessionSocket, connect_info=["session"], longpoll=True, **socket_opts)

    @app.post("/login")
    def login():
        session["user"] = "alice"
        return {"csrf_token": csrf_token()}

    return app


def login(server: Any) -> tuple[str, str]:
    """(Cookie header, CSRF token) of a logged-in session."""
    resp = http.post(server.http + "/login")
    assert resp.status == 200
    cookie = resp.headers["set-cookie"].split(";", 1)[0]
    return cookie, resp.json()["csrf_token"]


def joined_session(js: Any, server: Any, params: dict[str, Any], cookie: str | None) -> Any:
    opts = {"cookie": cookie} if cookie is not None else {}
    sid = js.open_socket(server.ws + "/socket", params, **opts)
    cid = js.channel(sid, "who:me")
    reply = js.join(cid)
    assert reply["status"] == "ok", reply
    return reply["response"]["session"]


def test_the_session_reaches_connect_only_with_the_csrf_token(live_server, js):
    server = live_server(make_app())
    cookie, token = login(server)
    got = joined_session(js, server, {"_csrf_token": token}, cookie)
    assert got["user"] == "alice"
    # Same cookie, no token or a wrong one (a cross-site page): no session.
    assert joined_session(js, server, {}, cookie) is None
    assert joined_session(js, server, {"_csrf_token": token[:-1] + "x"}, cookie) is None
    assert joined_session(js, server, {"_csrf_token": ["a", "b"]}, cookie) is None
    # The token without the cookie: no session either.
    assert joined_session(js, server, {"_csrf_token": token}, None) is None


def test_check_csrf_false_and_a_custom_token_key(live_server, js):
    server = live_server(make_app(check_csrf=False))
    cookie, _ = login(server)
    assert joined_session(js, server, {}, cookie)["user"] == "alice"
    server = live_server(make_app(csrf_token_key="csrf"))
    cookie, token = login(server)
    assert joined_session(js, server, {"csrf": token}, cookie)["user"] == "alice"
    assert joined_session(js, server, {"_csrf_token": token}, cookie) is None


def test_long_poll_sessions_get_the_session_too(live_server):
    server = live_server(make_app())
    cookie, token = login(server)

    def create(params: dict[str, Any], cookie: str | None) -> Any:
        headers = {"Cookie": cookie} if cookie else {}
        query = urlencode({"vsn": "2.0.0", **params})
        resp = http.get(f"{server.http}/socket/longpoll?{query}", headers=headers)
        body = resp.json()
        assert body["status"] == 410, body
        # Join over the new session and read the reply from the next poll.
        token_q = urlencode({"vsn": "2.0.0", "token": body["token"]})
        join = json.dumps(["1", "1", "who:me", "phx_join", {}])
        assert http.post(f"{server.http}/socket/longpoll?{token_q}", join.encode(), headers=headers).status == 200
        polled = http.get(f"{server.http}/socket/longpoll?{token_q}", headers=headers).json()
        [reply] = [json.loads(m) for m in polled["messages"] if json.loads(m)[3] == "phx_reply"]
        return reply[4]["response"]["session"]

    assert create({"_csrf_token": token}, cookie)["user"] == "alice"
    assert create({}, cookie) is None


def test_both_checks_off_is_refused_and_bad_options():
    app = Flask("x")
    endpoint = Endpoint(app, check_origin=False)
    with pytest.raises(ValueError, match="cross-site"):
        endpoint.socket("/socket", SessionSocket, check_csrf=False)
    with pytest.raises(ValueError, match="csrf_token_key"):
        Endpoint(Flask("y")).socket("/socket", SessionSocket, csrf_token_key="")


def test_csrf_token_is_stable_within_a_session_and_needs_a_request():
    app = Flask("z")
    app.config["SECRET_KEY"] = "k"
    with app.test_request_context():
        first = csrf_token()
        assert csrf_token() == first and len(first) >= 32
    with pytest.raises(RuntimeError):
        csrf_token()
