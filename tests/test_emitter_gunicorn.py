"""The Emitter and the command line end to end: gunicorn -w 2 + Redis, phoenix.js clients on both workers.

One redis-server and one ``gunicorn -w 2 app_example:app`` (``REDIS_URL``)
serve every test of this module; each test uses its own topics and users.
The emitting side is always a separate Python process that is not
monkey-patched (it checks so itself).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from phx_gevent.pubsub.history import history_keys
from tests.servers import ROOT, Gunicorn, RedisServer, wait_until
from tests.test_gunicorn import ACCESS, FAST, Client, spread

_runs = itertools.count(1)

# Run in a plain interpreter: broadcasts N messages in order (or from T threads, each in order).
EMIT = """
import sys, threading
from gevent import monkey
from phx_gevent import Emitter
url, topic, run, n, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
with Emitter(url) as emitter:
    def send(t):
        for i in range(n):
            emitter.broadcast(topic, "new_msg", {"run": run, "t": t, "i": i})
    workers = [threading.Thread(target=send, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
assert not monkey.is_anything_patched()
"""

# A short-lived script with a serving library's Endpoint: broadcasts and exits at once (no close()).
ENDPOINT_SCRIPT = """
import sys
from gevent import monkey
monkey.patch_all()
from phx_gevent import Endpoint
Endpoint(pubsub=sys.argv[1]).broadcast(sys.argv[2], "new_msg", {"run": sys.argv[3], "t": 0, "i": 0})
"""


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[RedisServer, Gunicorn]]:
    """One redis-server and one gunicorn -w 2 for the whole module."""
    redis = RedisServer().start()
    # One SECRET_KEY for both workers: long-poll tokens signed by one are checked by the other.
    server = Gunicorn(workers=2, env={"REDIS_URL": redis.url, "SECRET_KEY": "emitter-tests"}, args=ACCESS)
    try:
        server.start()
        yield redis, server
    finally:
        try:
            server.stop(timeout=15)
        finally:
            server.kill()
            redis.close()


def python(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, *args], cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done


def received(js: Any, clients: list[Client], since: int, run: str, count: int, timeout: float = 60.0) -> dict:
    """Per client, the ``(t, i)`` of every ``new_msg`` of ``run`` in arrival order, once each has ``count``."""
    got: dict[str, list[tuple[int, int]]] = {c.cid: [] for c in clients}
    index = since

    def scan() -> bool:
        nonlocal index
        events = js.events
        end = len(events)
        while index < end:
            e = events[index]
            index += 1
            if e.get("ev") == "chan" and e.get("event") == "new_msg" and e["channel"] in got:
                p = e["payload"]
                if p.get("run") == run:
                    got[e["channel"]].append((p["t"], p["i"]))
        return all(len(v) >= count for v in got.values())

    wait_until(scan, timeout, f"{count} messages of run {run} on every client", interval=0.1)
    return got


def test_10000_broadcasts_from_an_unpatched_process_reach_every_client_in_order(stack, js):
    redis, server = stack
    clients = spread(js, server, "room:emit")
    assert len({c.pid for c in clients}) == 2
    run = f"r{next(_runs)}"
    since = js.mark()
    python("-c", EMIT, redis.url, "room:emit", run, "10000", "1")
    got = received(js, clients, since, run, 10_000)
    for c in clients:
        assert got[c.cid] == [(0, i) for i in range(10_000)], c.cid
    # The example keeps new_msg history on room:*: the emitter went through the servers' append
    # script (offset, stream and PUBLISH in one step), so the topic's counter saw every message.
    meta, _stream = history_keys("phx", "room:emit")
    assert int(redis.command("HGET", meta, "s")) == 10_000


def test_an_emitter_shared_by_threads_keeps_each_threads_order(stack, js):
    redis, server = stack
    clients = spread(js, server, "room:threads")
    run = f"r{next(_runs)}"
    since = js.mark()
    python("-c", EMIT, redis.url, "room:threads", run, "300", "4")
    got = received(js, clients, since, run, 1200)
    for c in clients:
        assert len(got[c.cid]) == 1200
        for t in range(4):
            assert [i for tt, i in got[c.cid] if tt == t] == list(range(300))


def test_scripts_that_broadcast_and_exit_at_once_are_delivered(stack, js):
    redis, server = stack
    clients = spread(js, server, "room:once")
    for script in (EMIT, ENDPOINT_SCRIPT):
        run = f"r{next(_runs)}"
        since = js.mark()
        python("-c", script, redis.url, "room:once", run, "1", "1")
        got = received(js, clients, since, run, 1)
        assert all(v == [(0, 0)] for v in got.values())


def test_the_command_line_broadcasts_to_both_workers_and_disconnects_by_socket_id(stack, js):
    redis, server = stack
    clients = spread(js, server, "room:cli")
    since = js.mark()
    done = python(
        "-m", "phx_gevent", "broadcast", "--redis", redis.url, "room:cli", "new_msg", '{"run": "cli", "t": 0, "i": 7}'
    )
    assert (done.stdout, done.stderr) == ("", "")
    assert all(v == [(0, 7)] for v in received(js, clients, since, "cli", 1).values())

    # "erin" on both workers over WebSocket, and once over long-poll.
    erins = spread(js, server, "room:cli", user="erin")
    lp_since = js.mark()
    lp_sid = js.socket(server.ws + "/socket", {"user": "erin"}, longpoll=True, **FAST)
    lp_cid = js.channel(lp_sid, "room:cli")
    js.send(cmd="join", channel=lp_cid, req="lp-join")
    assert js.wait(ev="reply", req="lp-join", since=lp_since, timeout=15)["status"] == "ok"
    js.wait(ev="chan", channel=lp_cid, event="welcome", since=lp_since, timeout=15)
    assert not js.find(ev="close", socket=lp_sid, since=lp_since)  # a stable session until now
    since = js.mark()
    done = python("-m", "phx_gevent", "disconnect", "--redis", redis.url, "user_socket:erin")
    assert (done.stdout, done.stderr) == ("", "")
    for c in erins:
        assert js.wait(ev="close", socket=c.sid, since=since, timeout=15)["code"] == 1001
        assert c.rejoined(since) in {c.pid for c in clients}
    # The long-poll session is gone too: its next poll fails and the client comes back.
    js.wait(ev="close", socket=lp_sid, since=since, timeout=25)
    js.wait(ev="chan", channel=lp_cid, event="welcome", since=since, timeout=25)
    others = [c for c in clients if c.user != "erin"]
    assert not any(js.find(ev="close", socket=c.sid, since=since) for c in others)


def test_python_clients_on_both_transports_get_the_command_lines_broadcast(stack):
    from phx_gevent.client import Client, LongPollClient, Reply

    redis, server = stack
    received: list[tuple[str, dict]] = []
    made = [
        Client(server.ws + "/socket", params={"user": "py-ws"}),
        LongPollClient(server.ws + "/socket", params={"user": "py-lp"}),
    ]
    try:
        for client in made:
            client.connect()
            room = client.channel("room:pyclients")
            kind = type(client).__name__
            room.on("new_msg", lambda payload, ref, jr, kind=kind: received.append((kind, payload)))
            assert room.join().wait() == Reply("ok", {"user": client.params["user"]})
        python("-m", "phx_gevent", "broadcast", "--redis", redis.url, "room:pyclients", "new_msg", '{"body": "both"}')
        wait_until(lambda: len(received) >= 2, 15, f"both Python clients (got {received})")
        assert sorted(received) == [("Client", {"body": "both"}), ("LongPollClient", {"body": "both"})]
    finally:
        for client in made:
            client.close()
