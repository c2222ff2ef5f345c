"""The adapter and the Emitter against a real 3-primary Redis Cluster (started once for the module).

Pub/sub is sharded by topic (SPUBLISH/SSUBSCRIBE on ``<prefix>:t:{topic}``):
in-process PubSub nodes show which shard carries what and what one shard's
outage does; gunicorn -w 2 with phoenix.js shows cross-worker broadcasts,
presence and long-poll routing over the cluster.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from phx_gevent import Emitter
from phx_gevent.pubsub import PubSub
from phx_gevent.pubsub.redis_cluster import RedisClusterAdapter
from phx_gevent.pubsub.routing import topic_channel
from tests.redis_topologies import ClusterServers, redis_cluster  # noqa: F401
from tests.servers import Recorder, gunicorn, wait_until  # noqa: F401
from tests.test_gunicorn import ACCESS, spread
from tests.test_longpoll import RoundRobinProxy

_prefixes = itertools.count(1)


def topics_by_shard(cluster: ClusterServers, prefix: str, per_shard: int = 2) -> dict[int, list[str]]:
    """``per_shard`` topic names whose channels live on each node of ``cluster``."""
    found: dict[int, list[str]] = {i: [] for i in range(len(cluster.nodes))}
    for n in itertools.count():
        topic = f"room:{n}"
        shard = cluster.owner(topic_channel(prefix, topic))
        if len(found[shard]) < per_shard:
            found[shard].append(topic)
        if all(len(v) == per_shard for v in found.values()):
            return found
    raise AssertionError("unreachable")


@pytest.fixture
def nodes(redis_cluster: ClusterServers) -> Any:  # noqa: F811
    """A factory of started PubSub nodes on the cluster (own prefix per test); stopped at the end."""
    prefix = f"cl{next(_prefixes)}"
    started: list[PubSub] = []

    def make(n: int = 2) -> list[PubSub]:
        for _ in range(n):
            node = PubSub(RedisClusterAdapter(redis_cluster.url, prefix=prefix, backoff=(0.05, 0.2)))
            node.start()
            started.append(node)
        wait_until(lambda: all(x.adapter.connected for x in started), 10, "every shard connected")
        return started[-n:]

    make.prefix = prefix  # type: ignore[attr-defined]
    yield make
    for node in started:
        node.stop()


def test_each_topic_is_carried_by_its_own_shard_and_only_to_interested_nodes(redis_cluster, nodes):  # noqa: F811
    a, b = nodes(2)
    by_shard = topics_by_shard(redis_cluster, nodes.prefix)
    recorders = {t: Recorder(b, t) for ts in by_shard.values() for t in ts}
    for topic in recorders:
        assert b.wait_routed(topic, 5)
    shards = b.adapter.stats()["shards"]
    assert len(shards) == 3  # one subscriber connection per primary
    for topic in recorders:
        a.broadcast(topic, "hi", {"t": topic})
    for topic, rec in recorders.items():
        assert rec.wait(1) == [("hi", {"t": topic})]
    # Each shard published the broadcasts of its own topics (two each), nothing else.
    published = {addr: s["published"] for addr, s in a.adapter.stats()["shards"].items()}
    assert sorted(published.values()) == [2, 2, 2]
    for i, topics in by_shard.items():
        assert published[redis_cluster.addresses[i]] == len(topics)
    # Each shard's primary saw exactly this node's SSUBSCRIBEs for its topics.
    for i, topics in by_shard.items():
        channels = redis_cluster.nodes[i].command("PUBSUB", "SHARDCHANNELS", f"{nodes.prefix}:t:*")
        assert sorted(channels) == sorted(topic_channel(nodes.prefix, t).decode() for t in topics)
    # a has no subscriber: it received nothing (its echoes are not even sent to it).
    assert a.adapter.stats()["messages"] == 0


def test_direct_messages_and_history_offsets_over_the_cluster(redis_cluster, nodes):  # noqa: F811
    a, b = nodes(2)
    got: list[Any] = []
    b.register("svc", lambda payload, sender: got.append((payload, sender)))
    a.send_direct(b.node_name, "svc", {"x": 1})
    wait_until(lambda: got, 10, "the direct message")
    assert got == [({"x": 1}, a.node_name)]
    # The history script runs on the topic's shard and SPUBLISHes: offsets reach every node.
    for node in (a, b):
        node.keep_history("hist:*", {"size": 10})
    rec = Recorder(b, "hist:1")
    assert b.wait_routed("hist:1", 5)
    a.broadcast("hist:1", "kept", {"n": 1})
    rec.wait(1)
    recovery = b.history_store.fetch("hist:1", None, 5, b.history_rules.for_topic("hist:1"), has_since=False)
    assert [e.event for e in recovery.entries] == ["kept"]


def test_one_primary_down_affects_only_its_topics_and_they_recover(redis_cluster, nodes):  # noqa: F811
    a, b = nodes(2)
    by_shard = topics_by_shard(redis_cluster, nodes.prefix, per_shard=1)
    victim = 1
    recorders = {i: Recorder(b, ts[0]) for i, ts in by_shard.items()}
    for ts in by_shard.values():
        assert b.wait_routed(ts[0], 5)
    # Traffic on the victim's shard: a's publisher there counts the nodes (b included) with it.
    a.broadcast(by_shard[victim][0], "before", {})
    assert recorders[victim].wait(1) == [("before", {})]
    redis_cluster.kill(victim)
    try:
        # During the outage the other shards carry their topics as before.
        for i, ts in by_shard.items():
            if i != victim:
                a.broadcast(ts[0], "during", {"i": i})
        for i, rec in recorders.items():
            if i != victim:
                assert rec.wait(1) == [("during", {"i": i})]
        wait_until(lambda: not b.adapter.connected, 10, "b to see the shard down")
        wait_until(lambda: not a.adapter.stats()["publisher_connected"], 10, "a to see the shard down")
        # Kept for replay by a's shard publisher (within replay_window).
        a.broadcast(by_shard[victim][0], "queued", {})
        assert recorders[victim].events() == ["before"]
    finally:
        redis_cluster.restart(victim)
    # Back: both nodes reconnect to the shard and b resubscribes its topic there; a replays once b is
    # counted again on that shard (PUBSUB SHARDNUMSUB of the shard's counting channel), then goes on.
    wait_until(lambda: a.adapter.connected and b.adapter.connected, 20, "the shard's connections back")
    topic = by_shard[victim][0]
    assert b.wait_routed(topic, 10)
    a.broadcast(topic, "after", {})
    assert [e for e, _ in recorders[victim].wait(3)] == ["before", "queued", "after"]
    assert a.adapter.stats()["replayed"] >= 1


def test_the_emitter_publishes_to_each_topics_shard(redis_cluster, nodes):  # noqa: F811
    (b,) = nodes(1)
    by_shard = topics_by_shard(redis_cluster, nodes.prefix, per_shard=1)
    recorders = {ts[0]: Recorder(b, ts[0]) for ts in by_shard.values()}
    for topic in recorders:
        assert b.wait_routed(topic, 5)
    with Emitter(redis_cluster.addresses, nodes.prefix) as emitter:
        assert "cluster" in repr(emitter)
        emitter.ping()
        assert emitter.broadcast_many([(t, "e", {"t": t}) for t in recorders]) == 3
    for topic, rec in recorders.items():
        assert rec.wait(1) == [("e", {"t": topic})]


def test_two_gunicorn_workers_share_broadcasts_presence_and_longpoll_over_the_cluster(
    redis_cluster,  # noqa: F811
    gunicorn,  # noqa: F811
    js,
):
    server = gunicorn(
        workers=2,
        env={"REDIS_URL": redis_cluster.url, "SECRET_KEY": "cluster-test"},
        args=[*ACCESS],
    )
    clients = spread(js, server, "room:cluster", presence=True)
    assert {c.pid for c in clients} == set(server.ready_pids())
    for sender in (next(c for c in clients if c.pid == pid) for pid in sorted({c.pid for c in clients})):
        since = js.mark()
        assert js.push(sender.cid, "new_msg", {"body": f"from {sender.pid}"})["status"] == "ok"
        for c in clients:
            c.wait("new_msg", since, user=sender.user, body=f"from {sender.pid}")
    users = {c.user for c in clients}
    for c in clients:
        js.wait_presence(c.cid, users, timeout=15)
    # Long-poll: a fresh connection per request lands on either worker; the session is served by its owner.
    proxy = RoundRobinProxy([server.port])
    try:
        sid = js.open_socket(f"ws://127.0.0.1:{proxy.port}/socket", {"user": "lp"}, longpoll=True)
        lp = js.channel(sid, "room:cluster")
        assert js.join(lp)["status"] == "ok"
        for i in range(6):
            assert js.push(lp, "ping", {"i": i})["response"] == {"i": i}
        since = js.mark()
        assert js.push(clients[0].cid, "new_msg", {"body": "to lp"})["status"] == "ok"
        got = js.wait(ev="chan", channel=lp, event="new_msg", since=since, timeout=15)
        assert got["payload"]["body"] == "to lp"
        assert len(js.find(ev="open", socket=sid)) == 1 and not js.find(ev="close", socket=sid)
    finally:
        proxy.stop()


def test_a_slot_migration_moves_the_topic_to_its_new_shard(redis_cluster, nodes):  # noqa: F811
    from redis.crc import key_slot

    a, b = nodes(2)
    topic = topics_by_shard(redis_cluster, nodes.prefix, per_shard=1)[0][0]
    slot = key_slot(topic_channel(nodes.prefix, topic))
    rec = Recorder(b, topic)
    assert b.wait_routed(topic, 5)
    a.broadcast(topic, "before", {})
    rec.wait(1)
    redis_cluster.move_slot(slot, 2)
    try:
        # Redis drops b's subscription (sunsubscribe) and a's SPUBLISH answers MOVED: both read the
        # slot map again; b subscribes on the new shard, a publishes there.
        wait_until(lambda: b.adapter.shard_for(topic) == ("127.0.0.1", redis_cluster.nodes[2].port), 15, "b's map")
        wait_until(lambda: b.wait_routed(topic, 1), 15, "b subscribed on the new shard")
        wait_until(
            lambda: (
                topic_channel(nodes.prefix, topic).decode()
                in redis_cluster.nodes[2].command("PUBSUB", "SHARDCHANNELS", f"{nodes.prefix}:t:*")
            ),
            15,
            "the channel on the new primary",
        )
        for i in range(3):
            a.broadcast(topic, "after", {"i": i})
        wait_until(lambda: rec.events().count("after") == 3, 15, "the broadcasts after the migration")
        assert b.adapter.stats()["map_changes"] >= 1
    finally:
        redis_cluster.move_slot(slot, 0)


def test_under_gunicorn_one_primary_down_leaves_other_rooms_crossing_workers(redis_cluster, gunicorn, js):  # noqa: F811
    server = gunicorn(workers=2, env={"REDIS_URL": redis_cluster.url}, args=[*ACCESS])
    live = "room:cluster-live"
    victim = (redis_cluster.owner(topic_channel("phx", live)) + 1) % 3  # a shard the live room is not on
    down = topics_by_shard(redis_cluster, "phx", per_shard=1)[victim][0]
    clients = spread(js, server, live)
    one = clients[0]
    other = next(c for c in clients if c.pid != one.pid)
    second = {}
    for c in (one, other):
        second[c.sid] = js.channel(c.sid, down)
        assert js.join(second[c.sid])["status"] == "ok"
    redis_cluster.kill(victim)
    try:
        since = js.mark()
        assert js.push(one.cid, "new_msg", {"body": "during"})["status"] == "ok"
        other.wait("new_msg", since, body="during")
    finally:
        redis_cluster.restart(victim)

    # Back: the workers resubscribe on the restarted shard; the room crosses workers again.
    def crossed() -> bool:
        since = js.mark()
        js.push(second[one.sid], "new_msg", {"body": "after"})
        try:
            js.wait(ev="chan", channel=second[other.sid], event="new_msg", since=since, timeout=1)
            return True
        except AssertionError:
            return False

    wait_until(crossed, 30, "a broadcast on the restarted shard's room to cross workers", interval=0.2)


def test_a_promoted_replica_takes_over_its_primarys_topics():
    # A cluster of its own: one primary (every slot) and its replica.
    cluster = ClusterServers(1, replicas=1)
    a = b = None
    try:
        cluster.start()
        a = PubSub(RedisClusterAdapter(cluster.url, prefix="fo", backoff=(0.05, 0.2)))
        b = PubSub(RedisClusterAdapter(cluster.url, prefix="fo", backoff=(0.05, 0.2)))
        a.start()
        b.start()
        rec = Recorder(b, "room:fo")
        assert b.wait_routed("room:fo", 5)
        a.broadcast("room:fo", "before", {})
        rec.wait(1)
        cluster.failover(1)
        # The old primary (now a replica) drops the shard subscriptions; both nodes read the new map.
        promoted = ("127.0.0.1", cluster.nodes[1].port)
        wait_until(lambda: a.adapter.shard_for("room:fo") == promoted == b.adapter.shard_for("room:fo"), 15, "maps")
        wait_until(lambda: b.wait_routed("room:fo", 1), 15, "b subscribed on the promoted replica")
        a.broadcast("room:fo", "after", {})
        wait_until(lambda: "after" in rec.events(), 15, "the broadcast through the promoted replica")
        assert list(b.adapter.stats()["shards"]) == [f"127.0.0.1:{cluster.nodes[1].port}"]
    finally:
        for node in (a, b):
            if node is not None:
                node.stop()
        cluster.close()


def test_a_node_started_before_its_cluster_subscribes_and_sends_once_it_is_up(caplog):
    cluster = ClusterServers(1)  # ports chosen, not started yet
    nodes_: list[PubSub] = []
    try:
        b = PubSub(RedisClusterAdapter(cluster.url, prefix="early", backoff=(0.05, 0.2)))
        b.start()  # does not raise: the slot map is read in the background until the cluster answers
        nodes_.append(b)
        rec = Recorder(b, "room:early")
        assert not b.wait_routed("room:early", 0.1)  # no map yet: the join would succeed locally at once
        assert "not reachable yet" in caplog.text
        a = PubSub(RedisClusterAdapter(cluster.url, prefix="early", backoff=(0.05, 0.2)))
        a.start()
        nodes_.append(a)
        a.broadcast("room:early", "held", {})  # kept until the map is known
        cluster.start()
        wait_until(lambda: b.wait_routed("room:early", 1), 20, "b's interest subscribed once the cluster is up")
        a.broadcast("room:early", "later", {})
        wait_until(lambda: "later" in rec.events(), 15, "a broadcast after the cluster came up")
        assert a.adapter.stats()["published"] >= 1
    finally:
        for node in nodes_:
            node.stop()
        cluster.close()
