"""End to end under gunicorn: two gevent workers joined by Redis, with the real phoenix.js client.

Each test starts its own redis-server and ``gunicorn -w 2 -k
phx_gevent.worker.GeventWebSocketWorker app_example:app`` (tests/servers.py).
The example's ``welcome`` push names the node that serves the client, and a
node name carries the worker's pid, so tests know which worker holds which
client. Waits are on events with timeouts.
"""

from __future__ import annotations

import itertools
import signal
import time
from typing import Any

import gevent
from flask import Flask

from phx_gevent import Channel, Endpoint, Socket, channel, ok
from phx_gevent.worker import drain_all
from tests import httpclient as http
from tests.servers import Gunicorn, RedisServer, gunicorn, redis_server, wait_until  # noqa: F401

# Fast reconnects and rejoins, so the tests do not wait on phoenix.js's backoff.
FAST = {"reconnectAfterMs": 50, "rejoinAfterMs": 50}
# The access log names the worker (%(p)s is "<pid>") that served each request.
ACCESS = ["--access-logformat", '%(p)s "%(r)s" %(s)s']
_users = itertools.count(1)


def pid_of(node: str) -> int:
    """The pid in a node name (``host:pid:random``)."""
    return int(node.split(":")[-2])


class Client:
    """One phoenix.js socket joined to a room of the example app."""

    def __init__(self, js: Any, sid: str, cid: str, user: str, pid: int) -> None:
        self.js = js
        self.sid, self.cid, self.user, self.pid = sid, cid, user, pid

    def wait(self, event: str, since: int, timeout: float = 15.0, **payload: Any) -> dict[str, Any]:
        def pred(e: dict[str, Any]) -> bool:
            return all(e["payload"].get(k) == v for k, v in payload.items())

        return self.js.wait(ev="chan", channel=self.cid, event=event, since=since, pred=pred, timeout=timeout)

    def rejoined(self, since: int, timeout: float = 20.0) -> int:
        """The pid of the worker that welcomed this client again after ``since``."""
        welcome = self.js.wait(ev="chan", channel=self.cid, event="welcome", since=since, timeout=timeout)
        return pid_of(welcome["payload"]["node"])


def spread(
    js: Any, server: Gunicorn, topic: str, user: str | None = None, batches: int = 10, presence: bool = False
) -> list[Client]:
    """Open clients, a few at a time, until both workers hold at least one; returns them all.

    ``presence``: join with ``{"presence": true}`` and attach phoenix.js's Presence.

    Connections opened together race for the workers' accept(), which spreads
    them; one at a time, the worker that served the last one often wins again.
    """
    clients: list[Client] = []
    for _ in range(batches):
        since = js.mark()
        batch = []
        for _ in range(4):
            name = user or f"user{next(_users)}"
            sid = js.socket(server.ws + "/socket", {"user": name}, **FAST)
            cid = js.channel(sid, topic, {"presence": True} if presence else None)
            if presence:
                js.presence(cid)
            batch.append((sid, cid, name))
        for _sid, cid, _name in batch:
            js.send(cmd="join", channel=cid, req=f"join-{cid}")
        for sid, cid, name in batch:
            assert js.wait(ev="reply", req=f"join-{cid}", since=since)["status"] == "ok"
            welcome = js.wait(ev="chan", channel=cid, event="welcome", since=since)
            clients.append(Client(js, sid, cid, name, pid_of(welcome["payload"]["node"])))
        if len({c.pid for c in clients}) >= 2:
            return clients
    raise AssertionError(f"{len(clients)} connections all went to worker(s) {sorted({c.pid for c in clients})}")


def post_broadcast(server: Gunicorn, topic: str, payload: dict[str, Any]) -> int:
    """``POST /broadcast`` of a ``new_msg``; the HTTP status."""
    return http.post(server.http + "/broadcast", {"topic": topic, "event": "new_msg", "payload": payload}).status


def start(gunicorn: Any, redis: RedisServer | None, *args: str) -> Gunicorn:  # noqa: F811
    env = {"REDIS_URL": redis.url} if redis is not None else {}
    return gunicorn(workers=2, env=env, args=[*ACCESS, *args])


def test_two_workers_share_broadcasts_disconnects_and_log_websockets(gunicorn, redis_server, js):  # noqa: F811
    # --preload: the app (and its Redis adapter) is built in the master, then
    # forked: each worker must still get a node name of its own.
    server = start(gunicorn, redis_server, "--preload")
    clients = spread(js, server, "room:cross")
    pids = {c.pid for c in clients}
    assert pids == set(server.ready_pids())
    # A client's new_msg on one worker reaches every client on both.
    for sender in (next(c for c in clients if c.pid == pid) for pid in sorted(pids)):
        since = js.mark()
        assert js.push(sender.cid, "new_msg", {"body": f"from {sender.pid}"})["status"] == "ok"
        for c in clients:
            c.wait("new_msg", since, user=sender.user, body=f"from {sender.pid}")
    # POST /broadcast reaches everyone, whichever worker serves it: post until both did. A few
    # at a time, so the connections race for the workers' accept() (one at a time, the same
    # worker often wins every time).
    served: set[int] = set()
    for n in range(20):
        if served == pids:
            break
        since, mark = js.mark(), server.log.mark()
        bodies = [f"b{n}.{i}" for i in range(4)]
        jobs = [gevent.spawn(post_broadcast, server, "room:cross", {"user": "http", "body": b}) for b in bodies]
        gevent.joinall(jobs, timeout=15, raise_error=True)
        assert [job.value for job in jobs] == [204] * len(bodies)
        for c in clients:
            for body in bodies:
                c.wait("new_msg", since, user="http", body=body)
        lines = server.log.wait(r'<(\d+)> "POST /broadcast HTTP/1.1" 204', since=mark, count=len(bodies))
        served.update(int(line.group(1)) for line in lines)
    assert served == pids
    # POST /disconnect closes the user's sockets on both workers (1001), and they come back.
    carols = spread(js, server, "room:cross", user="carol")
    since = js.mark()
    assert http.post(server.http + "/disconnect", {"user": "carol"}).status == 204
    for c in carols:
        assert js.wait(ev="close", socket=c.sid, since=since, timeout=15)["code"] == 1001
        c.rejoined(since)
    others = [c for c in clients if c.user != "carol"]
    assert not any(js.find(ev="close", socket=c.sid, since=since) for c in others)
    # gunicorn's access log shows WebSocket requests (written when they end): the carols' first sockets.
    lines = server.log.wait(r'<(\d+)> "GET /socket/websocket\?[^"]*user=carol[^"]*" 101', count=len(carols))
    assert {int(m.group(1)) for m in lines} == pids


def test_a_redis_outage_leaves_workers_serving_and_broadcasts_resume(gunicorn, redis_server, js):  # noqa: F811
    server = start(gunicorn, redis_server)
    clients = spread(js, server, "room:outage", presence=True)
    by_pid: dict[int, list[Client]] = {}
    for c in clients:
        by_pid.setdefault(c.pid, []).append(c)
    first, second = sorted(by_pid)
    sender = by_pid[first][0]
    since = js.mark()
    assert js.push(sender.cid, "new_msg", {"body": "before"})["status"] == "ok"
    for c in clients:
        c.wait("new_msg", since, body="before")

    mark = server.log.mark()
    redis_server.kill()
    server.log.wait(r"unreachable for receiving", since=mark, count=2)
    # Still serving: pages, new sockets, joins, pushes and same-worker broadcasts.
    assert http.get(server.http + "/").status == 200
    joined_at = js.mark()
    late_sid = js.open_socket(server.ws + "/socket", {"user": "late"}, **FAST)
    late_cid = js.channel(late_sid, "room:outage", {"presence": True})
    js.presence(late_cid)
    assert js.join(late_cid)["status"] == "ok"
    welcome = js.wait(ev="chan", channel=late_cid, event="welcome", since=joined_at)
    late = Client(js, late_sid, late_cid, "late", pid_of(welcome["payload"]["node"]))
    since = js.mark()
    assert js.push(sender.cid, "new_msg", {"body": "during"})["status"] == "ok"
    for c in by_pid[first]:
        c.wait("new_msg", since, body="during")
    assert post_broadcast(server, "room:outage", {"body": "posted during"}) == 204

    redis_server.start()
    server.log.wait(r"reachable again for receiving", since=mark, count=2, timeout=20)
    # Replayed after the restart: the other worker gets what was said during the outage.
    for c in by_pid[second]:
        c.wait("new_msg", since, body="during", timeout=20)
    # And new broadcasts flow between the workers again, both ways.
    for pid in (first, second):
        since = js.mark()
        assert js.push(by_pid[pid][0].cid, "new_msg", {"body": f"after {pid}"})["status"] == "ok"
        for c in [*clients, late]:
            c.wait("new_msg", since, body=f"after {pid}", timeout=20)
    # Presence converges too: "late" joined one worker during the outage; everyone sees everyone.
    users = {c.user for c in clients} | {"late"}
    for c in [*clients, late]:
        js.wait_presence(c.cid, users, timeout=20)
    assert not server.log.find(r"Traceback|Worker exiting|WORKER TIMEOUT", since=mark)


def test_presence_is_shared_by_both_workers(gunicorn, redis_server, js):  # noqa: F811
    server = start(gunicorn, redis_server)
    clients = spread(js, server, "room:presence", presence=True)
    users = {c.user for c in clients}
    for c in clients:
        js.wait_presence(c.cid, users, timeout=15)
    # The clients of one worker leave: those of the other see exactly them go.
    gone_pid = clients[0].pid
    stay = [c for c in clients if c.pid != gone_pid]
    since = js.mark()
    for c in clients:
        if c.pid == gone_pid:
            js.leave(c.cid)
    for c in stay:
        js.wait_presence(c.cid, {c.user for c in stay}, since=since, timeout=15)
    # SIGTERM the worker of those who stayed: drained (1012), they rejoin elsewhere and are tracked
    # there, and their old presences go at once (untracked while draining, then the worker's
    # "down"), well before down_period (15 s) would expire them.
    victim = stay[0].pid
    since = js.mark()
    server.signal_worker(victim, signal.SIGTERM)

    def clean(event: dict[str, Any]) -> bool:
        metas = [m for p in event["list"] for m in p["metas"]]
        return len(metas) == len(stay) and all(pid_of(m["node"]) != victim for m in metas)

    for c in stay:
        assert c.rejoined(since) != victim
        js.wait(ev="presence_sync", channel=c.cid, since=since, timeout=10, pred=clean)


def test_kill_9_of_a_worker_moves_its_clients_to_the_survivors(gunicorn, redis_server, js):  # noqa: F811
    server = start(gunicorn, redis_server)
    clients = spread(js, server, "room:k9")
    victim = clients[0].pid
    moved = [c for c in clients if c.pid == victim]
    stayed = [c for c in clients if c.pid != victim]
    since, mark = js.mark(), server.log.mark()
    server.signal_worker(victim, signal.SIGKILL)
    for c in moved:
        js.wait(ev="close", socket=c.sid, since=since, timeout=15)
        assert c.rejoined(since) != victim
    assert not any(js.find(ev="close", socket=c.sid, since=since) for c in stayed)
    # The moved clients are reachable from the other workers again.
    since = js.mark()
    assert js.push(stayed[0].cid, "new_msg", {"body": "still here?"})["status"] == "ok"
    for c in moved:
        c.wait("new_msg", since, body="still here?")
    # gunicorn replaces the worker (a SIGTERM before its handlers exist would be lost: wait for it).
    server.wait_ready(1, since=mark)


def test_sigterm_drains_websockets_with_1012_and_clients_reconnect_elsewhere(gunicorn, redis_server, js):  # noqa: F811
    server = start(gunicorn, redis_server)
    clients = spread(js, server, "room:drain")
    victim = clients[0].pid
    drained = [c for c in clients if c.pid == victim]
    stayed = [c for c in clients if c.pid != victim]
    since, mark = js.mark(), server.log.mark()
    server.signal_worker(victim, signal.SIGTERM)
    for c in drained:
        close = js.wait(ev="close", socket=c.sid, since=since, timeout=15)
        assert close["code"] == 1012, close
        assert c.rejoined(since) != victim
    server.log.wait(rf"phx_gevent: worker {victim} drained {len(drained)} connections \(close 1012\)", since=mark)
    server.log.wait(rf"\[{victim}\] \[INFO\] Worker exiting", since=mark)
    assert not any(js.find(ev="close", socket=c.sid, since=since) for c in stayed)
    server.wait_ready(1, since=mark)  # the replacement (a SIGTERM while it boots would be lost)
    # Stopping gunicorn drains every worker: every client sees 1012.
    since = js.mark()
    assert server.stop() == 0
    for c in clients:
        assert js.wait(ev="close", socket=c.sid, since=since, timeout=15)["code"] == 1012


def test_several_workers_without_an_adapter_log_a_warning(gunicorn):  # noqa: F811
    server = start(gunicorn, None)
    lines = server.log.wait(r"2 workers but endpoint 'phx_gevent' has no cross-process PubSub adapter", count=2)
    assert {m.string.split("] [")[1] for m in lines} == {str(p) for p in server.ready_pids()}


# -- the drainer, in process ------------------------------------------------------------------


class _Room(Channel):
    def join(self, topic: str, payload: Any, socket: Any) -> Any:
        return ok({})


class _Sock(Socket):
    channels = [channel("room:*", _Room)]

    def connect(self, params: dict, socket: Any, connect_info: dict) -> Any:
        return socket


def only(monkeypatch: Any, endpoint: Endpoint) -> None:
    """Make ``endpoint`` the only one drain_all sees (other tests' endpoints may linger)."""
    import weakref

    import phx_gevent.endpoint

    monkeypatch.setattr(phx_gevent.endpoint, "endpoints", weakref.WeakSet([endpoint]))


def test_drain_closes_connections_in_batches_with_1012(live_server, js, monkeypatch):
    app = Flask(__name__)
    endpoint = Endpoint(app)
    mount = endpoint.socket("/socket", _Sock, drainer={"batch_size": 2, "batch_interval": 0.4}, log=False)
    server = live_server(app)
    sids = [js.join_room(server.ws + "/socket", f"u{i}", "room:d")[0] for i in range(5)]
    wait_until(lambda: len(mount.connections) == 5, 10, "5 connections")
    times: list[float] = []
    original = type(next(iter(mount.connections))).drain

    def drain(conn: Any) -> None:
        times.append(time.monotonic())
        original(conn)

    monkeypatch.setattr(type(next(iter(mount.connections))), "drain", drain)
    only(monkeypatch, endpoint)
    server.server.close()  # as the worker does first: drained clients cannot come back here
    since = js.mark()
    assert drain_all(time.monotonic() + 20) == 5
    assert not mount.connections
    for sid in sids:
        assert js.wait(ev="close", socket=sid, since=since)["code"] == 1012
    # Batches of 2, 2 and 1, each at least one interval after the previous one.
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert [g >= 0.35 for g in gaps] == [False, True, False, True]


def test_drain_all_stops_at_the_deadline(live_server, js, monkeypatch):
    app = Flask(__name__)
    endpoint = Endpoint(app)
    mount = endpoint.socket("/socket", _Sock, drainer={"batch_size": 1, "batch_interval": 30}, log=False)
    server = live_server(app)
    for i in range(3):
        js.join_room(server.ws + "/socket", f"u{i}", "room:d")
    wait_until(lambda: len(mount.connections) == 3, 10, "3 connections")
    only(monkeypatch, endpoint)
    server.server.close()
    # One batch, then the 30 s interval is cut short by the deadline.
    assert drain_all(time.monotonic() + 0.5) == 1
    assert len(mount.connections) == 2
