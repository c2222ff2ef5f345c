"""Where Redis is: URL validation (no Redis needed), Sentinel failover, TLS with an ACL user.

The adapter and the Emitter share :mod:`phx_gevent.pubsub.redis_connect`;
the servers are private (tests/redis_topologies.py).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest

from phx_gevent import Emitter
from phx_gevent.errors import EmitterError
from phx_gevent.pubsub import PubSub
from phx_gevent.pubsub.redis import RedisAdapter
from phx_gevent.pubsub.redis_cluster import RedisClusterAdapter, redis_adapter
from phx_gevent.pubsub.redis_connect import target
from tests.redis_topologies import ACL_PASSWORD, redis_sentinel, tls_redis  # noqa: F401
from tests.servers import Recorder, wait_until

_prefixes = itertools.count(1)


def client_list(server) -> list[dict[str, str]]:
    """``CLIENT LIST`` of a test server, one dict per connection."""
    raw = server.command("CLIENT", "LIST")
    if isinstance(raw, list):
        return raw
    return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in raw.splitlines() if line]


@pytest.mark.parametrize(
    ("url", "fix"),
    [
        ("http://h:1", "write one of: redis://"),
        ("redis+sentinel://h:26379", "redis+sentinel://host:26379,host:26380/mymaster/0"),
        ("redis+cluster://h:7000/2", "only database 0: drop '/2'"),
        ("redis://h:1/0?ssl_ca_certs=/ca.pem", "write rediss://"),
        ("unix://", "unix:///run/redis/redis.sock"),
        ("redis+cluster://h:99999", "outside 1-65535"),
    ],
)
def test_bad_locations_fail_at_construction_naming_the_fix(url, fix):
    with pytest.raises(ValueError, match=fix.replace("+", r"\+").replace("/", "/").replace("?", r"\?")):
        target(url)
    with pytest.raises(ValueError):
        redis_adapter(url)
    with pytest.raises(ValueError):
        Emitter(url)


def test_locations_are_described_without_secrets():
    cases = {
        "rediss://app:hunter2@h:6380/1": "rediss://app:***@h:6380/1",
        "redis://:hunter2@h:6379/0": "redis://***@h:6379/0",
        "redis+sentinel://app:hunter2@s1:26379,s2:26380/mymaster/2": "redis+sentinel://app:***@s1:26379,s2:26380/mymaster/2",
        "rediss+cluster://app:hunter2@c1:7000,c2:7001": "rediss+cluster://app:***@c1:7000,c2:7001",
    }
    for url, shown in cases.items():
        t = target(url)
        assert t.describe() == shown and "hunter2" not in repr(t)
    adapter = RedisAdapter("rediss://app:hunter2@h:6380/1")
    assert "hunter2" not in repr(adapter) and "app:***" in repr(adapter)
    cluster = redis_adapter("redis+cluster://app:hunter2@c1:7000,c2:7001")
    assert isinstance(cluster, RedisClusterAdapter) and "hunter2" not in repr(cluster)
    assert target(["c1:7000", ("c2", 7001)]).nodes == (("c1", 7000), ("c2", 7001))
    with pytest.raises(ValueError, match="use phx_gevent.pubsub.redis_cluster.RedisClusterAdapter"):
        RedisAdapter("redis+cluster://c1:7000")
    with pytest.raises(ValueError, match="routing must be 'topic'"):
        RedisClusterAdapter("redis+cluster://c1:7000", routing="broadcast")


def _node(url: str, prefix: str, **options) -> PubSub:
    node = PubSub(RedisAdapter(url, prefix=prefix, backoff=(0.05, 0.2), **options))
    node.start()
    return node


def test_sentinel_failover_moves_the_adapter_to_the_new_primary(redis_sentinel):  # noqa: F811
    prefix = f"sen{next(_prefixes)}"
    a, b = _node(redis_sentinel.url, prefix), _node(redis_sentinel.url, prefix)
    try:
        rec = Recorder(b, "room:s")
        assert b.wait_routed("room:s", 5)
        a.broadcast("room:s", "before", {})
        rec.wait(1)
        old_port = redis_sentinel.primary.port
        redis_sentinel.failover()
        assert redis_sentinel.primary_port() != old_port
        # Both nodes reconnect through the sentinel to the promoted replica and resubscribe there.
        new = redis_sentinel.primary

        def on_new_primary() -> bool:
            return sum(c.get("name", "").startswith(f"{prefix}:sub:") for c in client_list(new)) >= 2

        wait_until(on_new_primary, 20, "both listeners on the new primary")
        wait_until(lambda: b.wait_routed("room:s", 1), 20, "b's subscription on the new primary")
        a.broadcast("room:s", "after", {})
        wait_until(lambda: rec.events()[-1:] == ["after"], 20, "the broadcast after the failover")
        # History appends run on the new primary too (the script is loaded there on connect).
        for node in (a, b):
            node.keep_history("hist:*", {"size": 5})
        kept = Recorder(b, "hist:1")
        assert b.wait_routed("hist:1", 5)
        a.broadcast("hist:1", "kept", {})
        kept.wait(1)
        config = b.history_rules.for_topic("hist:1")
        recovery = b.history_store.fetch("hist:1", None, 5, config, has_since=False)
        assert [e.event for e in recovery.entries] == ["kept"]
    finally:
        a.stop()
        b.stop()


def test_tls_and_an_acl_user_for_the_adapter_and_the_emitter(tls_redis, caplog):  # noqa: F811
    prefix = "phx"  # the ACL user may only use phx:* keys and channels
    ca = tls_redis.files["ca"]
    a = _node(tls_redis.tls_url, prefix, ssl_ca_certs=ca)
    b = _node(tls_redis.tls_url, prefix, ssl_ca_certs=ca)
    try:
        wait_until(lambda: a.adapter.connected and b.adapter.connected, 10, "both adapters connected over TLS")
        rec = Recorder(b, "room:tls")
        assert b.wait_routed("room:tls", 5)
        a.broadcast("room:tls", "secret", {"n": 1})
        assert rec.wait(1) == [("secret", {"n": 1})]
        with Emitter(tls_redis.tls_url, prefix, ssl_ca_certs=ca) as emitter:
            emitter.broadcast("room:tls", "emitted", {"n": 2})
        assert rec.wait(2)[1] == ("emitted", {"n": 2})
        # The clients are TLS connections of the ACL user.
        ours = [c for c in client_list(tls_redis) if c.get("name", "").startswith(f"{prefix}:")]
        assert ours and all(c["user"] == "phx" for c in ours)
        # A wrong password is refused with an error that does not print the secret.
        bad = tls_redis.tls_url.replace(ACL_PASSWORD, "wrong-pw")
        with caplog.at_level(logging.DEBUG), Emitter(bad, prefix, ssl_ca_certs=ca, timeout=0.5) as emitter:
            with pytest.raises(EmitterError) as info:
                emitter.broadcast("room:tls", "x", {})
        assert "wrong-pw" not in str(info.value) and "wrong-pw" not in caplog.text
        assert ACL_PASSWORD not in caplog.text and ACL_PASSWORD not in repr(a.adapter)
    finally:
        a.stop()
        b.stop()


def test_slot_map_owner_lookup_and_redirect_errors():
    from redis.exceptions import AskError, MovedError, ResponseError

    from phx_gevent.pubsub.redis_shard import is_redirect
    from phx_gevent.pubsub.redis_slots import SlotMap

    reply = [
        [0, 5460, [b"", 7000, b"id0"]],
        [5461, 10922, [b"10.0.0.2", 7001, b"id1"], [b"10.0.0.5", 7004, b"r1"]],
        [12000, 16383, [b"10.0.0.3", 7002, b"id2"]],
    ]
    slots = SlotMap.from_reply(reply, "seed")
    assert slots.owner(0) == ("seed", 7000) and slots.owner(5460) == ("seed", 7000)
    assert slots.owner(5461) == ("10.0.0.2", 7001) and slots.owner(16383) == ("10.0.0.3", 7002)
    assert slots.owner(11000) is None  # not covered (cluster-require-full-coverage no)
    assert slots.primaries() == {("seed", 7000), ("10.0.0.2", 7001), ("10.0.0.3", 7002)}
    assert slots == SlotMap.from_reply(list(reversed(reply)), "seed")
    assert is_redirect(MovedError("3999 127.0.0.1:6381")) and is_redirect(AskError("3999 127.0.0.1:6381"))
    assert not is_redirect(ResponseError("NOPERM this user has no permissions"))


class _FakeNode:
    """A cluster node's connection answering CLUSTER SLOTS, then INFO server (or refusing INFO)."""

    def __init__(self, version: str | None) -> None:
        self.version = version
        self.sent: list[tuple[Any, ...]] = []

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        self.sent.append(args)

    def read_response(self) -> Any:
        from redis.exceptions import ResponseError

        if self.sent[-1][0] == "CLUSTER":
            return [[0, 16383, [b"10.0.0.1", 7000, b"id0"]]]
        if self.version is None:
            raise ResponseError("unknown command 'INFO'")  # a managed service that refuses it
        return f"# Server\r\nredis_version:{self.version}\r\nredis_mode:cluster\r\n".encode()


@pytest.mark.parametrize("version", ["6.2.14", "5.0.7"])
def test_a_cluster_older_than_redis_7_is_refused_with_the_fix(version, monkeypatch):
    from phx_gevent.pubsub.redis_slots import ClusterVersionError, discover

    t = target("redis+cluster://10.0.0.1:7000")
    monkeypatch.setattr(type(t), "node_connection", lambda self, host, port, **kw: _FakeNode(version))
    with pytest.raises(ClusterVersionError, match=f"runs Redis {version}: .*needs Redis 7 or newer.*redis://"):
        discover(t, [("10.0.0.1", 7000)])
    adapter = RedisClusterAdapter("redis+cluster://10.0.0.1:7000")
    monkeypatch.setattr(type(adapter.target), "node_connection", lambda self, host, port, **kw: _FakeNode(version))
    with pytest.raises(ClusterVersionError):
        adapter.start(lambda envelope: None)
    assert not adapter._running  # left stopped: the next start() tries again


@pytest.mark.parametrize("version", ["7.0.0", "7.2.4", "8.0.1", None])
def test_redis_7_or_an_unknown_version_is_accepted(version, monkeypatch):
    from phx_gevent.pubsub.redis_slots import discover, redis_version

    t = target("redis+cluster://10.0.0.1:7000")
    monkeypatch.setattr(type(t), "node_connection", lambda self, host, port, **kw: _FakeNode(version))
    assert discover(t, [("10.0.0.1", 7000)]).owner(42) == ("10.0.0.1", 7000)
    assert redis_version(b"redis_version:7.2.4\r\n") == (7, 2, 4)
    assert redis_version("# Server\nredis_mode:cluster\n") is None
