"""Long-poll requests of live sessions served before Flask's dispatch, remembered tokens, batched poll replies.

The polls and POSTs of a session this process owns are answered by the WSGI
layer in front of the app (``LongPollRoutes``), not by the Flask view; the
wire format is the same (the HTTP tests in test_longpoll.py run through it).
These tests pin what changes: which requests reach Flask and its hooks, that
everything buffered between two polls comes in one reply (end to end with
phoenix.js), that a frame that cannot be UTF-8 costs only itself, and that
remembered tokens still expire and follow ``SECRET_KEY``.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Flask, request

from phx_gevent.transports.longpoll import SessionTokens
from phx_gevent.transports.longpoll import tokens as tokens_module
from tests.servers import wait_until
from tests.test_longpoll import LP, join_line, longpoll_of, lp_url, make_app


def test_polls_and_posts_of_a_live_session_do_not_reach_flask(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 300})
    seen: list[tuple[str, bool]] = []

    @app.before_request
    def record() -> None:
        seen.append((request.method, "token" in request.args))

    lp = LP(live_server(app))
    lp.open()
    assert seen == [("GET", False)]  # creating the session runs connect inside Flask
    assert lp.post(join_line()).json() == {"status": 200}
    frames = lp.collect(1)
    assert frames[0][3] == "phx_reply" and frames[0][4]["status"] == "ok"
    assert lp.poll() == {"status": 204, "token": lp.token, "messages": []}
    assert seen == [("GET", False)]  # the session's own POST and polls never did
    # Anything else still goes through Flask: a preflight, a bad token (a new session).
    assert lp.request("OPTIONS").status == 200
    assert lp.request("GET", token="not-a-token").json()["status"] == 410
    assert seen == [("GET", False), ("OPTIONS", False), ("GET", True)]
    # A session that ended is not served outside Flask: its token makes a new session there.
    session = next(s for s in longpoll_of(endpoint).sessions.values() if s.token == lp.token)
    session.end()
    assert lp.poll()["status"] == 410
    assert seen[-1] == ("GET", True)


def test_a_frame_that_cannot_be_utf8_is_dropped_alone(live_server):
    app, endpoint = make_app(longpoll={"window_ms": 300})
    lp = LP(live_server(app))
    lp.open()
    (session,) = longpoll_of(endpoint).sessions.values()
    session.send('["before"]')
    session.send('["lone \ud800 surrogate"]')  # only server code can make one (client data is checked)
    session.send('["after"]')
    assert lp.poll()["messages"] == ['["before"]', '["after"]']


def test_e2e_messages_buffered_between_polls_come_in_one_reply(live_server, js):
    app, endpoint = make_app(longpoll={"window_ms": 2000})
    replies: list[dict[str, Any]] = []
    inner = app.wsgi_app

    def capture(environ: dict[str, Any], start_response: Any) -> Any:
        # In front of everything: what phoenix.js receives for each GET.
        result = inner(environ, start_response)
        if environ["REQUEST_METHOD"] != "GET" or not environ["PATH_INFO"].endswith("/longpoll"):
            return result
        body = b"".join(result)
        replies.append(json.loads(body))
        return [body]

    app.wsgi_app = capture  # type: ignore[method-assign]
    server = live_server(app)
    sid = js.open_socket(lp_url(server), {"user": "flo"}, longpoll=True)
    cid = js.channel(sid, "room:batch")
    assert js.join(cid)["status"] == "ok"
    mount_lp = longpoll_of(endpoint)
    (session,) = mount_lp.sessions.values()
    wait_until(lambda: session.waiter is not None, 5, "phoenix.js's poll to be held")
    since = js.mark()
    # No greenlet switch between the broadcasts: the held poll wakes once, with all of them.
    for i in range(5):
        endpoint.broadcast("room:batch", "news", {"i": i})
    js.wait(ev="chan", channel=cid, event="news", since=since, pred=lambda e: e["payload"] == {"i": 4})
    news = js.find(since=since, ev="chan", channel=cid, event="news")
    assert [e["payload"] for e in news] == [{"i": i} for i in range(5)]  # all, once each, in order
    carrying = [r for r in replies if any('"news"' in m for m in r.get("messages", []))]
    assert len(carrying) == 1, carrying
    (reply,) = carrying
    assert reply["status"] == 200 and reply["token"]
    assert [json.loads(m)[4] for m in reply["messages"]] == [{"i": i} for i in range(5)]
    assert not js.find(since=since, ev="error") and not js.find(since=since, ev="close")


def test_remembered_tokens_expire_and_follow_the_secret_key(monkeypatch):
    app = Flask("tokens_test")
    app.config["SECRET_KEY"] = "one"
    tokens = SessionTokens("salt", max_age=60)
    token = tokens.sign("node-a", "sid-1", app)
    assert tokens.verify(token, app) == ("node-a", "sid-1")
    assert tokens.verify(token, app) == ("node-a", "sid-1")  # remembered: no HMAC this time
    assert tokens.verify(token[:-2] + "xx", app) is None
    # A token another process signed with the same key is verified in full once, then remembered.
    other = SessionTokens("salt", max_age=60).sign("node-b", "sid-2", app)
    assert tokens.verify(other, app) == ("node-b", "sid-2")
    assert tokens.verify(other, app) == ("node-b", "sid-2")
    # Remembered tokens still expire max_age after they were signed.
    now = tokens_module._time()
    monkeypatch.setattr(tokens_module, "_time", lambda: now + 61)
    assert tokens.verify(token, app) is None and tokens.verify(other, app) is None
    monkeypatch.setattr(tokens_module, "_time", lambda: now)
    # A new SECRET_KEY: what the old one signed is no longer valid, remembered or not.
    fresh = tokens.sign("node-a", "sid-3", app)
    assert tokens.verify(fresh, app) == ("node-a", "sid-3")
    app.config["SECRET_KEY"] = "two"
    assert tokens.verify(fresh, app) is None
    # A session's end forgets its token; a full verification still accepts it (the session decides).
    app.config["SECRET_KEY"] = "one"
    tokens.forget(fresh)
    assert tokens.verify(fresh, app) == ("node-a", "sid-3")


def test_a_failure_outside_flask_is_a_logged_500_and_the_server_goes_on(live_server, monkeypatch, caplog):
    app, endpoint = make_app(longpoll={"window_ms": 300})
    lp = LP(live_server(app))
    lp.open()
    mount_lp = longpoll_of(endpoint)

    def broken(*args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(mount_lp, "_poll", broken)
    resp = lp.request("GET", token=lp.token)
    assert resp.status == 500 and resp.headers["connection"] == "close"
    assert any("long-poll request" in r.getMessage() and r.exc_info for r in caplog.records)
    monkeypatch.undo()
    assert lp.poll() == {"status": 204, "token": lp.token, "messages": []}
