"""Per-topic routing end to end: gunicorn -w 2 joined by Redis, with the real phoenix.js client.

``gunicorn -w 2 ... app_example:app`` with ``REDIS_URL`` (tests/servers.py);
the example's ``welcome`` push names the worker serving a client. Per-worker
counts come from the dashboard's data (each node's ``pubsub.messages``: what
it read from Redis) and from Redis itself (``PUBSUB NUMSUB``).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from tests import httpclient as http
from tests.servers import RedisServer, gunicorn, redis_server, wait_until  # noqa: F401
from tests.test_gunicorn import post_broadcast, spread, start

_rooms = itertools.count(1)


def node_stats(server: Any) -> dict[int, dict[str, Any]]:
    """``{pid: snapshot}`` of every worker, as the dashboard sees the cluster (gossiped, about a second old)."""
    view = http.get(server.http + "/phx/dashboard/data.json").json()
    return {node["pid"]: node for node in view["nodes"]}


def fresh_stats(server: Any, pids: set[int], after: float) -> dict[int, dict[str, Any]]:
    """Every worker's snapshot taken after the wall-clock time ``after``."""
    return wait_until(
        lambda: (s := node_stats(server)) and set(s) >= pids and all(s[p]["time"] > after for p in pids) and s,
        20,
        "fresh snapshots of both workers",
    )


def test_a_broadcast_right_after_the_join_reply_reaches_the_client_from_the_other_worker(gunicorn, redis_server, js):  # noqa: F811
    server = start(gunicorn, redis_server)
    clients = spread(js, server, "room:spread")
    one = next(c for c in clients if c.pid == clients[0].pid)
    other = next(c for c in clients if c.pid != one.pid)
    for i in range(10):
        topic = f"room:fresh{next(_rooms)}"
        # The other worker holds the topic already; this worker subscribes with the join below.
        speaker = js.channel(other.sid, topic)
        js.join(speaker)
        listener = js.channel(one.sid, topic)
        since = js.mark()
        body = f"right after the join {i}"
        # The push leaves the moment phoenix.js sees the join reply (tests/js/driver.mjs).
        js.send(
            cmd="join_then_push",
            channel=listener,
            then=speaker,
            req=f"jtp{i}",
            event="new_msg",
            payload={"body": body},
        )
        assert js.wait(ev="reply", req=f"jtp{i}", since=since)["status"] == "ok"
        assert js.wait(ev="reply", req=f"jtp{i}:push", since=since)["status"] == "ok"
        got = js.wait(ev="chan", channel=listener, event="new_msg", since=since, timeout=10)
        assert got["payload"]["body"] == body


@pytest.mark.parametrize("routing", ["topic", "broadcast"])
def test_a_worker_reads_only_the_topics_its_clients_joined(gunicorn, redis_server, js, routing):  # noqa: F811
    url = redis_server.url + ("?routing=broadcast" if routing == "broadcast" else "")
    server = gunicorn(workers=2, env={"REDIS_URL": url})
    clients = spread(js, server, "room:spread")
    pids = {c.pid for c in clients}
    holder = clients[0]
    idle = next(p for p in pids if p != holder.pid)
    topic = f"room:only{next(_rooms)}"
    channel = js.channel(holder.sid, topic)
    js.join(channel)
    if routing == "topic":
        assert redis_server.command("PUBSUB", "NUMSUB", f"phx:t:{{{topic}}}")[1] == 1
    else:
        assert redis_server.command("PUBSUB", "NUMSUB", "phx:b")[1] == 2
    before = fresh_stats(server, pids, time.time())
    assert {s["pubsub"]["routing"] for s in before.values()} == {routing}
    since = js.mark()
    n = 40
    for i in range(n):
        assert post_broadcast(server, topic, {"user": "http", "body": str(i)}) == 204
    js.wait(ev="chan", channel=channel, event="new_msg", since=since, pred=lambda e: e["payload"]["body"] == str(n - 1))
    after = fresh_stats(server, pids, time.time())
    read = {p: after[p]["pubsub"]["messages"] - before[p]["pubsub"]["messages"] for p in pids}
    # The holder reads every one (its own broadcasts come back as echoes); with topic routing the
    # other worker reads none of them. Both also read the cluster's own chatter (the dashboard's
    # stats and presence heartbeats, the same few a second on each): compare with the holder's.
    assert read[holder.pid] >= n
    chatter = read[holder.pid] - n
    if routing == "topic":
        assert read[idle] <= chatter + 10, read
    else:
        assert read[idle] >= n and read[idle] >= chatter + n - 10, read
