"""Recovery across workers: gunicorn -w 2 + Redis, the example app, the real phoenix.js client.

One redis-server and one gunicorn (``REDIS_URL`` and ``SECRET_KEY`` set) are
shared by the tests of this module; each test uses topics of its own. The
app is the example plus ``feed:*`` (tests/recovery_app.py: the same room
channel, 1,000 messages kept), for the 5 s cut at 100 messages/s.
Messages come from this process at ~100/s, half through ``POST /broadcast``
(either worker) and half straight into Redis with
:func:`~phx_gevent.pubsub.history.publish_with_history` (as an emitter
would). Offsets are assigned by Redis, so "in order" means in offset order:
every client must see offsets 1, 2, 3, ... of its topic with no gap and no
repeat, and every message sent.
"""

from __future__ import annotations

import itertools
import signal
from collections import Counter
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
import redis
from gevent.event import Event

from phx_gevent.pubsub.history import parse_offset, publish_with_history
from tests import httpclient as http
from tests.servers import Gunicorn, RedisServer

_users = itertools.count(1)


def pid_of(node: str) -> int:
    return int(node.split(":")[-2])


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def server(redis_srv: RedisServer) -> Iterator[Gunicorn]:
    env = {"REDIS_URL": redis_srv.url, "SECRET_KEY": "recovery-tests"}
    g = Gunicorn(app="tests.recovery_app:app", workers=2, env=env, graceful_timeout=10)
    try:
        g.start()
        yield g
    finally:
        try:
            g.stop(timeout=15)
        finally:
            g.kill()


class Sender:
    """Broadcasts ``new_msg`` on a topic at ~100/s from a greenlet, via HTTP and via Redis directly."""

    def __init__(self, server: Gunicorn, redis_url: str, topic: str) -> None:
        self.server, self.topic = server, topic
        self.client = redis.Redis.from_url(redis_url)
        self.sent: list[str] = []
        self._stop = Event()
        self._g = gevent.spawn(self._run)

    def _run(self) -> None:
        for i in itertools.count():
            if self._stop.is_set():
                return
            body = f"n{i}"
            if i % 2:
                publish_with_history(self.client, "phx", self.topic, "new_msg", {"user": "emitter", "body": body})
            else:
                payload = {"topic": self.topic, "event": "new_msg", "payload": {"user": "http", "body": body}}
                assert http.post(self.server.http + "/broadcast", payload).status == 204
            self.sent.append(body)
            gevent.sleep(0.01)

    def stop(self) -> list[str]:
        self._stop.set()
        self._g.join(timeout=10)
        assert self._g.successful(), self._g.exception
        self.client.close()
        return self.sent


class Member:
    def __init__(self, js: Any, server: Gunicorn, topic: str, longpoll: bool, reconnect_ms: int) -> None:
        self.js = js
        self.name = f"grec{next(_users)}"
        opts: dict[str, Any] = {"reconnectAfterMs": reconnect_ms, "rejoinAfterMs": 50}
        url = server.ws
        if longpoll:
            opts["longpoll"] = True
            url = server.http
        since = js.mark()
        self.sid = js.socket(url + "/socket", {"user": self.name}, **opts)
        self.cid = js.channel(self.sid, topic, {"since": None, "presence": True}, track="new_msg")
        reply = js.join(self.cid)
        assert reply["status"] == "ok" and reply["response"]["recovered"] is True, reply
        self.pid = pid_of(js.wait(ev="chan", channel=self.cid, event="welcome", since=since)["payload"]["node"])

    def messages(self) -> list[dict[str, Any]]:
        return self.js.find(0, ev="chan", channel=self.cid, event="new_msg")

    def rejoined(self, since: int) -> tuple[bool, int]:
        """(recovered, worker pid) of the next rejoin after ``since``."""
        topic = self.js.topics[self.cid]
        reply = self.js.wait(
            ev="frame",
            since=since,
            timeout=30,
            pred=lambda e: e["socket"] == self.sid and e["msg"]["event"] == "phx_reply" and e["msg"]["topic"] == topic,
        )
        welcome = self.js.wait(ev="chan", channel=self.cid, event="welcome", since=since, timeout=30)
        return reply["msg"]["payload"]["response"]["recovered"], pid_of(welcome["payload"]["node"])

    def check(self, sent: list[str]) -> None:
        """Every sent message exactly once, in offset order 1..N."""
        last = sent[-1]
        self.js.wait(
            ev="chan", channel=self.cid, event="new_msg", timeout=20, pred=lambda e: e["payload"]["body"] == last
        )
        got = self.messages()
        bodies = [e["payload"]["body"] for e in got]
        dups = sorted(b for b, c in Counter(bodies).items() if c > 1)
        assert not dups, f"received more than once: {dups[:10]}"
        assert sorted(bodies) == sorted(sent), (len(bodies), len(sent), sorted(set(bodies) ^ set(sent))[:10])
        assert len(set(bodies)) == len(bodies)
        seqs = [parse_offset(e["ref"])[1] for e in got]
        assert seqs == list(range(1, len(sent) + 1))
        assert len({parse_offset(e["ref"])[0] for e in got}) == 1


def members_on_both(js: Any, server: Gunicorn, topic: str, reconnect_ms: int, longpoll: bool = False) -> list[Member]:
    members: list[Member] = []
    # Which worker accepts a connection is up to the kernel's wake-up order, and it can favour
    # one worker for a long run of connections: keep connecting until both have some.
    for i in range(40):
        members.append(Member(js, server, topic, longpoll and i % 2 == 1, reconnect_ms))
        if len(members) >= 4 and len({m.pid for m in members}) == 2:
            return members
    raise AssertionError("the clients all went to one worker")


def test_cut_off_for_5s_recovers_every_message_on_either_worker(server, redis_srv, js):
    topic = "feed:g-cut"  # 1,000 kept: a 5 s cut at 100/s is 500 messages
    members = members_on_both(js, server, topic, reconnect_ms=5000, longpoll=True)
    sender = Sender(server, redis_srv.url, topic)
    moved = False
    try:
        for _round in range(3):
            n = len(sender.sent)
            js.wait(ev="chan", channel=members[0].cid, event="new_msg", timeout=20,
                    pred=lambda e, n=n: e["payload"]["body"] == f"n{n + 20}")  # fmt: skip
            mark = js.mark()
            for m in members:
                assert http.post(server.http + "/disconnect", {"user": m.name}).status == 204
            for m in members:
                recovered, pid = m.rejoined(mark)
                assert recovered is True
                moved = moved or pid != m.pid
                m.pid = pid
            if moved:
                break
        assert moved, "no client came back on the other worker in three rounds"
        n = len(sender.sent)
        js.wait(ev="chan", channel=members[0].cid, event="new_msg", timeout=20,
                pred=lambda e: e["payload"]["body"] == f"n{n + 20}")  # fmt: skip
    finally:
        sent = sender.stop()
    for m in members:
        m.check(sent)


def test_sigterm_drain_then_recover_elsewhere(server, redis_srv, js):
    topic = "room:g-drain"
    members = members_on_both(js, server, topic, reconnect_ms=300)
    sender = Sender(server, redis_srv.url, topic)
    try:
        js.wait(ev="chan", channel=members[0].cid, event="new_msg", timeout=20,
                pred=lambda e: e["payload"]["body"] == "n20")  # fmt: skip
        victim = members[0].pid
        drained = [m for m in members if m.pid == victim]
        mark, log_mark = js.mark(), server.log.mark()
        server.signal_worker(victim, signal.SIGTERM)
        for m in drained:
            assert js.wait(ev="close", socket=m.sid, since=mark, timeout=20)["code"] == 1012
        for m in drained:
            recovered, pid = m.rejoined(mark)
            assert recovered is True and pid != victim
        server.wait_ready(1, since=log_mark)  # the replacement worker
        n = len(sender.sent)
        js.wait(ev="chan", channel=drained[0].cid, event="new_msg", timeout=20,
                pred=lambda e: e["payload"]["body"] == f"n{n + 20}")  # fmt: skip
    finally:
        sent = sender.stop()
    for m in members:
        m.check(sent)


def test_gaps_older_than_the_history_and_a_flushed_redis_answer_recovered_false(server, redis_srv, js):
    topic = "room:g-old"
    members = members_on_both(js, server, topic, reconnect_ms=50)
    client = redis.Redis.from_url(redis_srv.url)
    try:
        first = publish_with_history(client, "phx", topic, "new_msg", {"user": "e", "body": "first"})
        assert parse_offset(first) is not None
        for m in members:  # the same offset on every worker
            js.wait(ev="chan", channel=m.cid, event="new_msg", pred=lambda e: e["ref"] == first)
        latest = first
        for i in range(101):  # 100 are kept: the one after "first" is gone
            latest = publish_with_history(client, "phx", topic, "new_msg", {"user": "e", "body": str(i)})
        for m in members:  # the burst delivered everywhere, so a new join cannot catch its tail live
            js.wait(ev="chan", channel=m.cid, event="new_msg", pred=lambda e: e["ref"] == latest)

        def join_since(offset: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
            mark = js.mark()
            sid = js.open_socket(server.ws + "/socket", {"user": f"grec{next(_users)}"})
            cid = js.channel(sid, topic, {"since": offset})
            reply = js.join(cid)
            js.wait(ev="chan", channel=cid, event="welcome", since=mark)
            return reply, js.find(mark, ev="chan", channel=cid, event="new_msg")

        reply, got = join_since(first)
        assert reply["response"]["recovered"] is False and got == []
        reply, got = join_since(latest)
        assert reply["response"]["recovered"] is True and got == []
        # Redis flushed: the epoch is gone, every earlier offset answers recovered false.
        client.flushall()
        reply, got = join_since(latest)
        assert reply["response"]["recovered"] is False and got == []
    finally:
        client.close()


def test_a_redis_outage_is_never_a_silent_gap(server, redis_srv, js):
    """Redis restarts empty: messages still arrive (without offsets) and the next recovery says false.

    Last in this module: it restarts the shared redis-server.
    """
    topic = "room:g-outage"
    m = Member(js, server, topic, longpoll=False, reconnect_ms=50)

    def post(body: str) -> None:
        payload = {"topic": topic, "event": "new_msg", "payload": {"user": "http", "body": body}}
        assert http.post(server.http + "/broadcast", payload).status == 204

    post("before")
    before = js.wait(ev="chan", channel=m.cid, event="new_msg", pred=lambda e: e["payload"]["body"] == "before")
    assert parse_offset(before["ref"]) is not None
    redis_srv.kill()
    post("during")  # whichever worker takes it: delivered at once there, replayed to the other when Redis is back
    redis_srv.start()
    during = js.wait(
        ev="chan", channel=m.cid, event="new_msg", timeout=30, pred=lambda e: e["payload"]["body"] == "during"
    )
    assert during["ref"] is None  # no offset: Redis could not give one
    mark = js.mark()
    assert http.post(server.http + "/disconnect", {"user": m.name}).status == 204
    recovered, _pid = m.rejoined(mark)
    assert recovered is False  # the history before the outage is gone: the app must refetch
    bodies = [e["payload"]["body"] for e in m.messages()]
    assert bodies.count("before") == 1 and bodies.count("during") == 1
