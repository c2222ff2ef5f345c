"""The Python client (phx_gevent.client.Client) against the example app: every event of its contract.

The server runs in this process (``example`` fixture); the client's thread
is a greenlet here (gevent's patching), and one test runs it in a separate,
unpatched interpreter. Waits are on conditions with timeouts.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from phx_gevent.client import CLOSED, JOINED, Client, LongPollClient, Presence, Reply
from phx_gevent.transports.longpoll import BINARY_REFUSED
from tests.servers import ROOT, OutputLog, free_port, wait_until

TIMEOUT = 10.0
_users = itertools.count(1)
# Fast reconnects and rejoins keep the tests short; the schedules themselves are unit-tested.
FAST: dict[str, Any] = {"reconnect_after": lambda tries: 0.05, "rejoin_after": lambda tries: 0.1}


class Events:
    """Everything a channel receives, in order: (event, payload, join_ref)."""

    def __init__(self, channel: Any, *events: str) -> None:
        self.got: list[tuple[str, Any, Any]] = []
        for event in events:
            channel.on(event, lambda payload, ref, join_ref, event=event: self.got.append((event, payload, join_ref)))

    def of(self, event: str) -> list[tuple[str, Any, Any]]:
        return [g for g in self.got if g[0] == event]

    def wait(self, event: str, count: int = 1, timeout: float = TIMEOUT) -> list[tuple[str, Any, Any]]:
        wait_until(lambda: len(self.of(event)) >= count, timeout, f"{count} {event!r} (got {self.got[-5:]})")
        return self.of(event)


@pytest.fixture
def clients() -> Iterator[Any]:
    """``clients(url, user, **options)``: connected clients, closed after the test."""
    made: list[Client] = []

    def make(url: str, user: str | None = None, **options: Any) -> Client:
        client = Client(url, params={"user": user or f"py{next(_users)}"}, **{**FAST, **options})
        made.append(client)
        client.connect()
        return client

    yield make
    for client in made:
        client.close()


def test_welcome_new_msg_and_ping_in_text_and_binary(example, clients):
    url = example.ws + "/socket"
    alice, bob = clients(url, "alice"), clients(url, "bob", auth_token="s3cret/+=")
    rooms = [c.channel("room:py") for c in (alice, bob)]
    seen = [Events(room, "welcome", "new_msg") for room in rooms]
    for room in rooms:
        assert room.join().wait() == Reply("ok", {"user": room._client.params["user"]})
    for room, events in zip(rooms, seen, strict=True):
        (welcome,) = events.wait("welcome")
        assert welcome[1] == {"user": room._client.params["user"], "node": example.endpoint.node_name}
        assert welcome[2] == room.join_ref  # a push of this join
    assert rooms[0].push("new_msg", {"body": "hello from python"}).wait() == Reply("ok", {})
    for events in seen:
        ((_, payload, _jr),) = events.wait("new_msg")
        assert payload == {"user": "alice", "body": "hello from python"}
    assert rooms[1].push("ping", {"n": [1, "é"]}).wait() == Reply("ok", {"n": [1, "é"]})
    assert rooms[1].push("ping", b"\x00\xff\x10binary").wait() == Reply("ok", b"\x00\xff\x10binary")
    assert rooms[1].push("nope", {}).wait() == Reply("error", {"reason": "unknown event"})
    refused = alice.channel("room:secret")
    assert refused.join().wait() == Reply("error", {"reason": "unauthorized"})


def test_crash_rejoins_and_stop_closes_for_good(example, clients):
    client = clients(example.ws + "/socket")
    room = client.channel("room:crash")
    events = Events(room, "welcome", "phx_error", "phx_close")
    assert room.join().wait().status == "ok"
    first = room.join_ref
    room.push("crash", {})
    ((_, payload, jr),) = events.wait("phx_error")
    assert (payload, jr) == ({"reason": "channel_crash"}, first)
    welcomes = events.wait("welcome", 2)
    assert welcomes[1][2] == room.join_ref != first  # rejoined with a new join_ref
    wait_until(lambda: room.state == JOINED, TIMEOUT, "rejoined")
    assert room.push("stop", {}).wait() == Reply("ok", {})
    events.wait("phx_close")
    assert room.state == CLOSED
    # Removed from the socket with no rejoin scheduled: it never comes back.
    assert room._channel not in client.core.channels
    assert ("rejoin", id(room._channel)) not in client.core.timers


def test_disconnect_by_socket_id_then_reconnect_and_rejoin(example, clients):
    client = clients(example.ws + "/socket", "carol")
    closes: list[Any] = []
    client.on_close(lambda code, reason: closes.append(code))
    room = client.channel("room:dc")
    events = Events(room, "welcome")
    assert room.join().wait().status == "ok"
    example.endpoint.broadcast("user_socket:carol", "disconnect", {})
    wait_until(lambda: closes, TIMEOUT, "the close")
    assert closes[0] == 1001
    events.wait("welcome", 2)
    wait_until(lambda: room.state == JOINED and client.connected, TIMEOUT, "rejoined")
    assert room.push("ping", {"back": True}).wait() == Reply("ok", {"back": True})


def test_heartbeats_are_answered_and_keep_the_connection(example, clients):
    client = clients(example.ws + "/socket", heartbeat_interval=0.05)
    replies: list[Any] = []
    client.on_message(lambda m: replies.append(m) if m.topic == "phoenix" else None)
    closes: list[Any] = []
    client.on_close(lambda code, reason: closes.append(code))
    wait_until(lambda: len(replies) >= 5, TIMEOUT, "5 heartbeat replies")
    assert all(m.event == "phx_reply" and m.payload == {"status": "ok", "response": {}} for m in replies)
    assert len({m.ref for m in replies}) == len(replies) and closes == []


def test_presence_of_the_example_room(example, clients):
    url = example.ws + "/socket"
    views = []
    for user in ("erin", "frank"):
        room = clients(url, user).channel("room:presence", {"presence": True})
        presence = Presence(room)
        views.append((room, presence))
        assert room.join().wait().status == "ok"
    for _, presence in views:
        wait_until(lambda p=presence: sorted(p.state) == ["erin", "frank"], TIMEOUT, "both users")
    views[1][0].leave()
    wait_until(lambda: sorted(views[0][1].state) == ["erin"], TIMEOUT, "frank gone")
    (metas,) = views[0][1].list(lambda key, p: p["metas"])
    assert metas[0]["node"] == example.endpoint.node_name and "phx_ref" in metas[0]


def test_many_clients_in_one_gevent_process(example, clients):
    # Under gevent's patching each client's thread is a greenlet: a load test is one process.
    url = example.ws + "/socket"
    many = [clients(url) for _ in range(40)]
    rooms = [c.channel("room:many") for c in many]
    pushes = [room.join() for room in rooms]
    assert {p.wait().status for p in pushes} == {"ok"}
    seen = [Events(room, "new_msg") for room in rooms]
    assert rooms[0].push("new_msg", {"body": "to all"}).wait() == Reply("ok", {})
    for events in seen:
        assert events.wait("new_msg")[0][1]["body"] == "to all"


def test_the_long_poll_client(example, clients):
    url = example.ws + "/socket"
    lp = LongPollClient(url, params={"user": "gina"}, auth_token="tok", **FAST)
    lp.connect()
    try:
        closes: list[Any] = []
        lp.on_close(lambda code, reason: closes.append(code))
        room = lp.channel("room:lp")
        events = Events(room, "welcome", "new_msg")
        assert room.join().wait() == Reply("ok", {"user": "gina"})
        events.wait("welcome")
        assert room.push("ping", {"n": 1}).wait() == Reply("ok", {"n": 1})
        # Binary goes up (a base64 line); the binary reply cannot come down over long-poll.
        assert room.push("ping", b"\x00bin").wait() == Reply("error", BINARY_REFUSED)
        ws_room = clients(url, "hank").channel("room:lp")
        assert ws_room.join().wait().status == "ok"
        assert ws_room.push("new_msg", {"body": "to long-poll"}).wait().status == "ok"
        assert events.wait("new_msg")[0][1] == {"user": "hank", "body": "to long-poll"}
        # Disconnect by socket id: the session is gone (3410), the client comes back and rejoins.
        example.endpoint.broadcast("user_socket:gina", "disconnect", {})
        wait_until(lambda: closes, TIMEOUT, "the long-poll close")
        assert closes[0] == 3410
        events.wait("welcome", 2)
        wait_until(lambda: room.state == JOINED, TIMEOUT, "rejoined")
        assert room.push("ping", {"back": 1}).wait() == Reply("ok", {"back": 1})
    finally:
        lp.close()


class ExampleProcess:
    """``python app_example.py`` on a fixed port, so it can be killed and started again there."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PORT": str(self.port), "PYTHONUNBUFFERED": "1"}
        env.pop("REDIS_URL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "app_example.py"], cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        # serve() writes "phx_gevent: serving on http://HOST:PORT" once it listens.
        OutputLog(self.proc.stdout).wait(r"phx_gevent: serving on http://", timeout=20)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def test_the_client_comes_back_by_itself_after_a_server_restart():
    server = ExampleProcess()
    server.start()
    # phoenix.js's own reconnect schedule (no FAST): the restart is quick.
    client = Client(f"ws://127.0.0.1:{server.port}/socket", params={"user": "dave"})
    try:
        client.connect()
        room = client.channel("room:restart")
        events = Events(room, "welcome")
        assert room.join().wait().status == "ok"
        first_node = events.wait("welcome")[0][1]["node"]
        server.kill()
        wait_until(lambda: not client.connected, TIMEOUT, "the client to notice")
        pushed = room.push("ping", {"buffered": True})  # waits for the rejoin
        server.start()
        welcomes = events.wait("welcome", 2, timeout=20)
        assert welcomes[1][1]["node"] != first_node  # a new server process
        assert pushed.wait(15) == Reply("ok", {"buffered": True})
    finally:
        client.close()
        server.kill()


SCRIPT = """
import sys, threading
from gevent import monkey
from phx_gevent.client import Client
with Client(sys.argv[1], params={"user": "plain"}) as client:
    client.connect()
    room = client.channel("room:plain")
    print(room.join().wait(10).status, flush=True)
    print(room.push("ping", {"n": 1}).wait(10).response, flush=True)
    print(room.push("ping", b"bin").wait(10).response, flush=True)
    # Real threads sharing the client: every push gets its own reply.
    results = []
    def pings(t):
        results.extend(room.push("ping", {"t": t, "i": i}).wait(10).response == {"t": t, "i": i} for i in range(50))
    threads = [threading.Thread(target=pings, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    print(len(results), all(results), flush=True)
assert not monkey.is_anything_patched()
"""


def test_the_client_works_in_an_unpatched_interpreter(example):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, example.ws + "/socket"],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["ok", "{'n': 1}", "b'bin'", "200 True"]
