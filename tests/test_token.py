"""phx_gevent.token (Phoenix.Token), and the example app's optional page token."""

from __future__ import annotations

import re
import time

import pytest
from flask import Flask

from phx_gevent import Endpoint, PhxError, token
from phx_gevent.testing import ChannelTest, ConnectRefused
from tests import httpclient as http
from tests.rawws import RawWS

SECRET = "s" * 32


def app_with_secret(secret: str | None = SECRET) -> Flask:
    app = Flask(__name__)
    app.config["SECRET_KEY"] = secret
    return app


def test_sign_and_verify_round_trip_with_every_context():
    app = app_with_secret()
    endpoint = Endpoint(app)
    data = {"user_id": 42, "roles": ["a"]}
    for context in (SECRET, app, endpoint):
        assert token.verify(context, "user socket", token.sign(context, "user socket", data)) == data
    # The same secret, whatever names it: interchangeable.
    assert token.verify(endpoint, "s", token.sign(SECRET, "s", 7)) == 7
    with app.app_context():
        assert token.verify(None, "s", token.sign(None, "s", "x")) == "x"
    socket = ChannelTest(endpoint_with_socket(app)).socket("u", {}).socket
    assert token.verify(socket, "s", token.sign(app, "s", 1)) == 1


def endpoint_with_socket(app: Flask) -> Endpoint:
    from phx_gevent import Socket

    endpoint = Endpoint(app, name="with_socket")
    endpoint.socket("/socket", Socket)
    return endpoint


def test_missing_invalid_and_expired_are_distinguished():
    good = token.sign(SECRET, "salt", "data")
    for missing in (None, ""):
        with pytest.raises(token.TokenMissing):
            token.verify(SECRET, "salt", missing)
    for bad in (good + "x", good.replace(".", "!", 1), "garbage", 12):
        with pytest.raises(token.TokenInvalid):
            token.verify(SECRET, "salt", bad)
    with pytest.raises(token.TokenInvalid):
        token.verify(SECRET, "other salt", good)
    with pytest.raises(token.TokenInvalid):
        token.verify("t" * 32, "salt", good)
    old = token.sign(SECRET, "salt", "data", signed_at=time.time() - 3600)
    with pytest.raises(token.TokenExpired):
        token.verify(SECRET, "salt", old, max_age=60)
    assert token.verify(SECRET, "salt", old, max_age=7200) == "data"
    assert token.verify(SECRET, "salt", old, max_age=None) == "data"  # Phoenix's max_age: :infinity
    assert issubclass(token.TokenExpired, token.TokenError) and issubclass(token.TokenError, PhxError)


def test_max_age_given_at_signing_is_the_default_and_verify_overrides_it():
    short = token.sign(SECRET, "s", 1, max_age=60, signed_at=time.time() - 120)
    with pytest.raises(token.TokenExpired):
        token.verify(SECRET, "s", short)
    assert token.verify(SECRET, "s", short, max_age=300) == 1
    # Without max_age anywhere: one day, as Phoenix.
    day_old = token.sign(SECRET, "s", 1, signed_at=time.time() - token.DEFAULT_MAX_AGE - 10)
    with pytest.raises(token.TokenExpired):
        token.verify(SECRET, "s", day_old)
    forever = token.sign(SECRET, "s", 1, max_age=None, signed_at=time.time() - 10 * 86400)
    assert token.verify(SECRET, "s", forever) == 1


def test_configuration_errors_raise():
    with pytest.raises(ValueError, match="SECRET_KEY"):
        token.sign(app_with_secret(None), "s", 1)
    with pytest.raises(ValueError, match="salt"):
        token.sign(SECRET, "", 1)
    with pytest.raises(ValueError, match="not attached"):
        token.sign(Endpoint(), "s", 1)
    with pytest.raises(TypeError):
        token.sign(object(), "s", 1)
    with pytest.raises(TypeError):
        token.sign(SECRET, "s", object())


# -- the example app ---------------------------------------------------------------------------


def page_token(example) -> str | None:
    html = http.get(example.http + "/").body.decode()
    m = re.search(r'<meta name="socket-token" content="([^"]+)">', html)
    return m.group(1) if m else None


def test_example_hands_the_page_a_token_only_with_a_secret_key(example):
    assert page_token(example) is None  # no SECRET_KEY: the page works as before, without a token
    example.app.config["SECRET_KEY"] = SECRET
    tok = page_token(example)
    assert tok is not None and token.verify(example.app, "example page", tok) == "index"


def test_example_connect_checks_the_token_when_given(example, js):
    example.app.config["SECRET_KEY"] = SECRET
    tok = page_token(example)
    sid = js.open_socket(example.ws + "/socket", {"user": "alice"}, authToken=tok)
    assert js.join(js.channel(sid, "room:tok"))["status"] == "ok"
    conn = next(c for c in example.endpoint.mounts[0].connections if c.socket.assigns.get("user") == "alice")
    assert conn.socket.assigns["page"] == "index"
    js.open_socket(example.http + "/socket", {"user": "lp"}, longpoll=True, authToken=tok)
    # A forged or expired token is refused with a reason: 401 from the example's handle_error.
    forged = "base64url.bearer.phx." + "Zm9yZ2Vk"  # "forged"
    ws = RawWS(example.port, "/socket/websocket?vsn=2.0.0&user=bob", headers={"Sec-WebSocket-Protocol": forged})
    assert ws.status == 401 and ws.buf.endswith(b"invalid token")
    ws.close()
    old = token.sign(example.app, "example page", "index", signed_at=time.time() - 2 * 86400)
    resp = http.get(example.http + "/socket/longpoll?vsn=2.0.0&user=bob", headers={"X-Phoenix-AuthToken": old}).json()
    assert resp == {"status": 403, "reason": "token expired"}
    # Without a token, everyone connects as before.
    plain = RawWS(example.port, "/socket/websocket?vsn=2.0.0&user=carol")
    assert plain.status == 101
    plain.close()


def test_example_token_through_channel_test():
    import app_example

    app, endpoint = app_example.create_app()
    app.config["SECRET_KEY"] = SECRET
    good = token.sign(app, "example page", "index")
    with app.app_context():
        client = ChannelTest(endpoint).connect({"user": "ann"}, {"auth_token": good})
        assert client.socket.assigns == {"user": "ann", "page": "index"}
        with pytest.raises(ConnectRefused) as refused:
            ChannelTest(endpoint).connect({"user": "ann"}, {"auth_token": "nope"})
        assert refused.value.reason == "invalid token"
