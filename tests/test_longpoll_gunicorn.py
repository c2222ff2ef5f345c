"""Long-poll under gunicorn with two workers and Redis: requests land on both workers, no sticky sessions.

The phoenix.js LongPoll client talks to gunicorn through a proxy that opens
a fresh connection for every request, so the kernel hands requests of one
session to either worker. gunicorn's access log (with the worker pid) shows
that both workers served polls and posts of the same session; the client
never lost its session (a request that could not reach the session's owner
would have been answered 410, and phoenix.js would have reported
``session_gone``).
"""

from __future__ import annotations

import time

from tests.jsclient import b64
from tests.servers import Gunicorn, gunicorn, redis_server  # noqa: F401
from tests.test_longpoll import RoundRobinProxy

LOG_FORMAT = "lp-access %(p)s %(m)s %(U)s %(s)s"


def served(server: Gunicorn, method: str) -> set[int]:
    """Pids of the workers that answered ``method`` requests to the long-poll path."""
    assert server.log is not None
    return {int(m.group(1)) for m in server.log.find(rf"^lp-access <(\d+)> {method} /socket/longpoll 200")}


def test_longpoll_sessions_work_across_two_gunicorn_workers(redis_server, gunicorn, js):  # noqa: F811
    server = gunicorn(
        workers=2,
        env={"REDIS_URL": redis_server.url, "SECRET_KEY": "gunicorn-longpoll-test"},
        args=["--access-logformat", LOG_FORMAT],
    )
    workers = set(server.ready_pids())
    assert len(workers) == 2
    proxy = RoundRobinProxy([server.port])  # one backend; a new connection per request
    try:
        url = f"ws://127.0.0.1:{proxy.port}/socket"
        sid = js.open_socket(url, {"user": "ann"}, longpoll=True)
        ann = js.channel(sid, "room:gunicorn")
        assert js.join(ann)["status"] == "ok"
        js.wait(ev="chan", channel=ann, event="welcome")
        # Keep the session busy until both workers have served its polls and posts.
        deadline = time.monotonic() + 30
        i = 0
        while not (served(server, "GET") == workers and served(server, "POST") == workers):
            assert time.monotonic() < deadline, (served(server, "GET"), served(server, "POST"))
            assert js.push(ann, "ping", {"i": i})["response"] == {"i": i}
            i += 1
        # Broadcasts cross workers both ways: a WebSocket client straight to gunicorn.
        _, bob = js.join_room(server.ws + "/socket", "bob", "room:gunicorn")
        since = js.mark()
        assert js.push(bob, "new_msg", {"body": "from ws"})["status"] == "ok"
        assert js.wait(ev="chan", channel=ann, event="new_msg", since=since)["payload"] == {
            "user": "bob",
            "body": "from ws",
        }
        assert js.push(ann, "new_msg", {"body": "from lp"})["status"] == "ok"
        got = js.wait(
            ev="chan", channel=bob, event="new_msg", since=since, pred=lambda e: e["payload"]["user"] == "ann"
        )
        assert got["payload"]["body"] == "from lp"
        # The binary ping over long-poll gets the documented error reply, from whichever worker owns the session.
        assert js.push(ann, "ping", b64(b"\x00\x01\x02"))["response"] == {
            "reason": "binary payloads are not supported over long-poll"
        }
        # One session all along: no session_gone, no transport error.
        assert len(js.find(ev="open", socket=sid)) == 1
        assert not js.find(ev="close", socket=sid) and not js.find(ev="error", socket=sid)
    finally:
        proxy.stop()
