"""Refusing a connection with a reason (Phoenix's ``{:error, reason}`` and transport ``:error_handler``).

The same connect path serves the WebSocket handshake, long-poll and
phx_gevent.testing; these tests go through all three, and through phoenix.js.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask, Response, request

from phx_gevent import CallbackReturnError, Channel, Endpoint, Socket, channel, error, ok, refuse
from phx_gevent.testing import ChannelTest, ConnectRefused
from tests import httpclient as http
from tests.rawws import RawWS
from tests.servers import wait_until

FAST = {"reconnectAfterMs": 50, "rejoinAfterMs": 50}


# -- the example app's contract ----------------------------------------------------------------


@pytest.mark.parametrize("user", ["blocked", "blockedbob", "blocked" + "x" * 57])
def test_example_refuses_blocked_users_with_401_and_www_authenticate(example, user):
    ws = RawWS(example.port, f"/socket/websocket?vsn=2.0.0&user={user}")
    assert ws.status == 401
    assert ws.headers["www-authenticate"].startswith("Bearer")
    ws.close()
    body = http.get(example.http + f"/socket/longpoll?vsn=2.0.0&user={user}")
    assert body.status == 200 and body.json() == {"status": 403, "reason": "blocked"}


@pytest.mark.parametrize("query", ["", "&user=", "&user=" + "blocked" + "x" * 58])
def test_example_without_a_valid_user_stays_a_plain_403(example, query):
    ws = RawWS(example.port, f"/socket/websocket?vsn=2.0.0{query}")
    assert ws.status == 403 and "www-authenticate" not in ws.headers
    ws.close()
    assert http.get(example.http + f"/socket/longpoll?vsn=2.0.0{query}").json() == {"status": 403}


@pytest.mark.parametrize("user", ["Blocked", "alice", "xblocked", "BLOCKED"])
def test_example_accepts_every_other_user(example, user):
    ws = RawWS(example.port, f"/socket/websocket?vsn=2.0.0&user={user}")
    assert ws.status == 101
    ws.close()
    body = http.get(example.http + f"/socket/longpoll?vsn=2.0.0&user={user}").json()
    assert body["status"] == 410 and body["token"]


def test_example_refusals_through_channel_test():
    import app_example

    endpoint = app_example.create_app()[1]
    with pytest.raises(ConnectRefused) as refused:
        ChannelTest(endpoint).connect({"user": "blocked_user"})
    assert refused.value.reason == "blocked"
    with pytest.raises(ConnectRefused) as plain:
        ChannelTest(endpoint).connect({})
    assert plain.value.reason is None
    assert ChannelTest(endpoint).connect({"user": "Blocked"}).socket.assigns == {"user": "Blocked"}


def test_phoenix_js_sees_the_refusals_and_keeps_retrying(example, js):
    """What the client sees: WebSocket onerror then close 1006; long-poll close 1008 "forbidden"; both retry."""
    attempts: list[str] = []
    original = example.endpoint.mounts[0].connect

    def counting(transport: str, params: dict[str, Any], info: dict[str, Any]) -> Any:
        attempts.append(transport)
        return original(transport, params, info)

    example.endpoint.mounts[0].connect = counting
    since = js.mark()
    ws = js.socket(example.ws + "/socket", {"user": "blocked"}, **FAST)
    js.wait(ev="error", socket=ws, since=since)
    close = js.wait(ev="close", socket=ws, since=since)
    assert close["code"] == 1006
    wait_until(lambda: attempts.count("websocket") >= 3, 10, "phoenix.js to retry the WebSocket")
    js.send(cmd="disconnect", socket=ws)
    lp = js.socket(example.http + "/socket", {"user": "blocked"}, longpoll=True, **FAST)
    close = js.wait(ev="close", socket=lp, since=since)
    assert (close["code"], close["reason"]) == (1008, "forbidden")
    wait_until(lambda: attempts.count("longpoll") >= 3, 10, "phoenix.js to retry the long-poll")
    js.send(cmd="disconnect", socket=lp)
    assert not js.find(since=since, ev="open")


# -- the mechanism ---------------------------------------------------------------------------


class Room(Channel):
    def join(self, topic: str, payload: Any, socket: Any) -> Any:
        return ok({})


class ReasonSocket(Socket):
    channels = [channel("room:*", Room)]

    def connect(self, params: dict, socket: Any, connect_info: dict) -> Any:
        how = params.get("how")
        if how == "refuse":
            return refuse({"code": "rate_limited", "retry_in": 5})
        if how == "error":
            return error("via error()")
        if how == "opaque":
            return refuse(object())  # not JSON: long-poll sends the bare 403
        if how == "nan":
            return refuse(float("nan"))  # not JSON either
        if how == "garbage":
            return {"not": "a socket"}
        if how == "none":
            return None
        return socket


class RateLimitSocket(ReasonSocket):
    def handle_error(self, reason: Any) -> Any:
        assert request.path.endswith("/websocket")  # runs inside the handshake's request
        if isinstance(reason, dict) and reason.get("code") == "rate_limited":
            return "slow down", 429, {"Retry-After": str(reason["retry_in"])}
        return Response(json.dumps({"refused": str(reason)}), status=400, mimetype="application/json")


def serve(live_server: Any, handler: Any, **opts: Any) -> Any:
    app = Flask(__name__)
    endpoint = Endpoint(app)
    endpoint.socket("/socket", handler, longpoll=True, log=False, **opts)
    return live_server(app)


def handshake(server: Any, how: str) -> RawWS:
    ws = RawWS(server.port, f"/socket/websocket?vsn=2.0.0&how={how}")
    ws.close()
    return ws


def test_default_error_handler_is_an_empty_403(live_server):
    server = serve(live_server, ReasonSocket)
    for how in ("refuse", "error", "none"):
        ws = handshake(server, how)
        assert ws.status == 403 and ws.headers.get("content-length") == "0", how


def test_socket_handle_error_shapes_the_http_answer(live_server):
    server = serve(live_server, RateLimitSocket)
    ws = handshake(server, "refuse")
    assert ws.status == 429 and ws.headers["retry-after"] == "5"
    assert handshake(server, "error").status == 400  # error(reason) is refuse(reason)
    assert handshake(server, "none").status == 403  # a plain refusal skips the error handler
    assert handshake(server, "ok").status == 101


def test_error_handler_option_overrides_the_socket_method(live_server):
    seen: list[Any] = []

    def handler(reason: Any) -> Response:
        seen.append(reason)
        return Response("nope", status=401, headers={"WWW-Authenticate": "Bearer"})

    server = serve(live_server, RateLimitSocket, error_handler=handler)
    ws = handshake(server, "refuse")
    assert ws.status == 401 and ws.headers["www-authenticate"] == "Bearer"
    assert seen == [{"code": "rate_limited", "retry_in": 5}]
    with pytest.raises(TypeError, match="error_handler must be callable"):
        Endpoint(Flask(__name__)).socket("/s", ReasonSocket, error_handler="nope")


def test_long_poll_answers_403_with_the_reason_when_json_can_carry_it(live_server):
    server = serve(live_server, RateLimitSocket)

    def lp(how: str) -> Any:
        resp = http.get(server.http + f"/socket/longpoll?vsn=2.0.0&how={how}")
        assert resp.status == 200
        return resp.json()

    assert lp("refuse") == {"status": 403, "reason": {"code": "rate_limited", "retry_in": 5}}
    assert lp("error") == {"status": 403, "reason": "via error()"}
    assert lp("opaque") == {"status": 403}
    assert lp("nan") == {"status": 403}
    assert lp("none") == {"status": 403}
    assert lp("ok")["status"] == 410


def test_an_error_handler_returning_nothing_names_what_was_expected(live_server, caplog):
    server = serve(live_server, ReasonSocket, error_handler=lambda reason: None)
    assert handshake(server, "refuse").status == 500
    errors = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert any(isinstance(e, CallbackReturnError) and "must return a Flask response" in str(e) for e in errors)


def test_a_wrong_connect_return_names_what_was_expected(live_server):
    server = serve(live_server, ReasonSocket)
    assert handshake(server, "garbage").status == 500
    assert http.get(server.http + "/socket/longpoll?vsn=2.0.0&how=garbage").status == 500
    endpoint = Endpoint(Flask(__name__))
    endpoint.socket("/socket", ReasonSocket)
    with pytest.raises(CallbackReturnError, match=r"refuse\(reason\)") as exc:
        ChannelTest(endpoint).connect({"how": "garbage"})
    assert "None (refuse with 403)" in str(exc.value) and "{'not': 'a socket'}" in str(exc.value)


def test_channel_test_connect_reports_the_reason():
    endpoint = Endpoint(Flask(__name__))
    endpoint.socket("/socket", ReasonSocket)
    with pytest.raises(ConnectRefused) as refused:
        ChannelTest(endpoint).connect({"how": "refuse"})
    assert refused.value.reason == {"code": "rate_limited", "retry_in": 5}
    with pytest.raises(ConnectRefused) as plain:
        ChannelTest(endpoint).connect({"how": "none"})
    assert plain.value.reason is None
