"""The Emitter, the command line and Endpoint.close() against a private redis-server.

The servers' side is the real Redis adapter (a PubSub node in this process,
or the example app under gunicorn in tests/test_emitter_gunicorn.py); the
command line runs as a separate, unpatched Python process. Waits are on
conditions with timeouts.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis

from phx_gevent import Emitter, EmitterError, EmitterUnavailable, Endpoint, PayloadError, PhxError
from phx_gevent.pubsub import PubSub, codec
from phx_gevent.pubsub.redis import RedisAdapter
from tests.servers import ROOT, Recorder, RedisServer, free_port, redis_server, wait_until  # noqa: F401

TIMEOUT = 10.0
_prefixes = itertools.count(1)


class Tap:
    """A raw subscriber on every topic's channel (topic routing): what reached Redis, byte for byte."""

    def __init__(self, server: RedisServer, prefix: str) -> None:
        self.client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
        self.sub = self.client.pubsub()
        self.sub.psubscribe(f"{prefix}:t:*")
        assert self.sub.get_message(timeout=5)["type"] == "psubscribe"

    def drain(self, quiet: float = 0.3) -> list[bytes]:
        """Messages until none arrived for ``quiet`` seconds (a bound, not a measurement)."""
        out = []
        while (msg := self.sub.get_message(timeout=quiet)) is not None:
            if msg["type"] == "pmessage":
                out.append(msg["data"])
        return out

    def close(self) -> None:
        self.sub.close()
        self.client.close()


@pytest.fixture
def prefix() -> str:
    return f"em{next(_prefixes)}"


@pytest.fixture
def node(redis_server: RedisServer, prefix: str) -> Iterator[PubSub]:  # noqa: F811
    """A server-side PubSub node on the test's Redis, subscribed."""
    pubsub = PubSub(RedisAdapter(redis_server.url, prefix=prefix, backoff=(0.05, 0.3)))
    pubsub.start()
    wait_until(lambda: pubsub.adapter.stats()["listener_connected"], TIMEOUT, "subscription")
    yield pubsub
    pubsub.stop()


@pytest.fixture
def tap(redis_server: RedisServer, prefix: str) -> Iterator[Tap]:  # noqa: F811
    t = Tap(redis_server, prefix)
    yield t
    t.close()


def cli(*args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """``python -m phx_gevent ARGS`` in a plain interpreter, warnings shown; bounded by ``timeout``."""
    return subprocess.run(
        [sys.executable, "-W", "always", "-m", "phx_gevent", *args],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- the Emitter ----------------------------------------------------------------------------


def test_a_node_receives_the_emitters_broadcasts_as_from_any_other_node(redis_server, node, prefix):  # noqa: F811
    room = Recorder(node, "room:1")
    ids = Recorder(node, "user_socket:alice")
    with Emitter(redis_server.url, prefix=prefix) as emitter:
        assert emitter.node_name.startswith("emitter@")
        # No history on these topics: no offset.
        assert emitter.broadcast("room:1", "new_msg", {"body": "é/\u2028", "n": [1, None]}) is None
        assert emitter.broadcast("room:1", "blob", b"\x00\xff bytes") is None
        assert emitter.broadcast_many([("room:1", "seq", {"i": i}) for i in range(2500)]) == 2500
        emitter.disconnect("user_socket:alice")
    got = room.wait(2502)
    assert got[0] == ("new_msg", {"body": "é/\u2028", "n": [1, None]})
    assert got[1] == ("blob", b"\x00\xff bytes")
    assert [p["i"] for e, p in got[2:]] == list(range(2500))
    assert ids.wait(1) == [("disconnect", {})]
    assert node.adapter.stats()["invalid"] == 0


def test_the_emitter_writes_exactly_the_adapters_envelope(redis_server, tap, prefix):  # noqa: F811
    with Emitter(redis_server.url, prefix=prefix, node_name="cron@box") as emitter:
        emitter.broadcast("room:1", "ev", {"a": 1})
        emitter.broadcast("room:1", "bin", b"\x01\x02")
    first, second = tap.drain()
    env = {"k": "b", "n": "cron@box", "t": "room:1", "e": "ev", "p": {"a": 1}, "x": None}
    assert first == codec.encode(env)
    assert codec.decode(second) == {**env, "e": "bin", "p": b"\x01\x02"}


def test_on_a_history_topic_the_emitter_appends_with_the_servers_script(redis_server, tap, prefix):  # noqa: F811
    from phx_gevent.pubsub.history import HistoryConfig, load_rules, patterns_key

    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    config = HistoryConfig.coerce({"size": 10, "ttl": 60, "events": ["new_msg"]})
    client.hset(patterns_key(prefix), "room:*", config.to_json())  # what servers publish at start
    assert load_rules(client, prefix).for_topic("room:9") == config
    with Emitter(redis_server.url, prefix=prefix) as emitter:
        first = emitter.broadcast("room:9", "new_msg", {"n": 1})
        second = emitter.broadcast("room:9", "new_msg", {"n": 2})
        assert emitter.broadcast("room:9", "typing", {}) is None  # an event the history does not keep
        assert emitter.broadcast("lobby", "new_msg", {}) is None  # a topic without history
    epoch, seq = first.rsplit("-", 1)
    assert second == f"{epoch}-{int(seq) + 1}"
    got = [codec.decode(m) for m in tap.drain()]
    assert [(e["t"], e["e"], e.get("o")) for e in got] == [
        ("room:9", "new_msg", first),
        ("room:9", "new_msg", second),
        ("room:9", "typing", None),
        ("lobby", "new_msg", None),
    ]
    client.close()


def test_an_unencodable_message_raises_and_sends_nothing(redis_server, tap, prefix):  # noqa: F811
    with Emitter(redis_server.url, prefix=prefix) as emitter:
        for args in (
            ("room:1", "ev", [1, 2]),
            ("room:1", "ev", {"x": float("nan")}),
            ("room:1", "ev", {"x": object()}),
            (1, "ev", {}),
            ("room:1", None, {}),
        ):
            with pytest.raises(PayloadError) as info:
                emitter.broadcast(*args)
            assert isinstance(info.value, (PhxError, TypeError))
        with pytest.raises(PayloadError):
            emitter.broadcast_many([("room:1", "ok", {}), ("room:1", "bad", [1])])
        with pytest.raises(PayloadError):
            emitter.disconnect("")
        emitter.broadcast("room:1", "sentinel", {})
    assert [codec.decode(m)["e"] for m in tap.drain()] == ["sentinel"]


def test_with_redis_down_the_emitter_raises_after_its_timeout(redis_server):  # noqa: F811
    emitter = Emitter(redis_server.url, timeout=0.5, connect_timeout=0.5, socket_timeout=0.5)
    emitter.ping()
    redis_server.kill()
    with pytest.raises(EmitterUnavailable) as info:
        emitter.broadcast("room:1", "ev", {})
    assert f"127.0.0.1:{redis_server.port}" in str(info.value)
    assert "0.5s" in str(info.value)
    # Back up: the same emitter reconnects by itself.
    redis_server.start()
    assert emitter.broadcast("room:1", "ev", {}) is None
    emitter.close()
    with pytest.raises(EmitterError, match="closed"):
        emitter.broadcast("room:1", "ev", {})


def test_the_emitter_uses_a_given_redis_client_and_leaves_it_open(redis_server, node, prefix):  # noqa: F811
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    room = Recorder(node, "room:2")
    with Emitter(client, prefix=prefix) as emitter:
        emitter.broadcast("room:2", "ev", {"via": "client"})
    assert room.wait(1) == [("ev", {"via": "client"})]
    assert client.ping()
    client.close()


def test_an_emitter_for_an_endpoint_uses_its_redis_and_prefix(redis_server, node, prefix):  # noqa: F811
    room = Recorder(node, "room:3")
    endpoint = Endpoint(pubsub=redis_server.url, pubsub_prefix=prefix)  # never started: it does not serve
    with Emitter.for_endpoint(endpoint) as emitter:
        assert emitter.prefix == prefix
        emitter.broadcast("room:3", "ev", {"via": "endpoint"})
    assert room.wait(1) == [("ev", {"via": "endpoint"})]
    with pytest.raises(ValueError):
        Emitter.for_endpoint(Endpoint())


FORK = """
import os, sys
from phx_gevent import Emitter
emitter = Emitter(sys.argv[1], prefix=sys.argv[2])
emitter.broadcast("room:1", "ev", {"who": "parent"})
pid = os.fork()
if pid == 0:
    emitter.broadcast("room:1", "ev", {"who": "child"})  # its own connection, not the parent's
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert status == 0, status
emitter.broadcast("room:1", "ev", {"who": "parent again"})
"""


def test_an_emitter_made_before_fork_works_in_parent_and_child(redis_server, tap, prefix):  # noqa: F811
    done = subprocess.run(
        [sys.executable, "-c", FORK, redis_server.url, prefix],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert [codec.decode(m)["p"]["who"] for m in tap.drain()] == ["parent", "child", "parent again"]


def test_bad_configuration_is_refused_at_construction():
    with pytest.raises(ValueError):
        Emitter("http://localhost")
    with pytest.raises(ValueError):
        Emitter("redis://localhost", prefix="a b")
    with pytest.raises(TypeError):
        Emitter(42)  # type: ignore[arg-type]


# -- Endpoint.close(): no silent loss -------------------------------------------------------


def test_endpoint_close_sends_what_is_queued(redis_server, tap, prefix):  # noqa: F811
    endpoint = Endpoint(pubsub=RedisAdapter(redis_server.url, prefix=prefix))
    for i in range(300):
        endpoint.broadcast("room:1", "ev", {"i": i})  # queued for the publisher greenlet
    assert endpoint.close() == 0
    assert [codec.decode(m)["p"]["i"] for m in tap.drain()] == list(range(300))
    assert endpoint.pubsub.adapter.stats()["publish_pending"] == 0


def test_endpoint_close_with_redis_down_reports_what_it_dropped(redis_server, prefix, caplog):  # noqa: F811
    redis_server.kill()
    endpoint = Endpoint(pubsub=RedisAdapter(redis_server.url, prefix=prefix, connect_timeout=0.5))
    for i in range(7):
        endpoint.broadcast("room:1", "ev", {"i": i})
    with caplog.at_level("WARNING", logger="phx_gevent.pubsub.redis"):
        assert endpoint.close(timeout=5) == 7
    assert "7 envelope(s) not forwarded" in caplog.text
    assert endpoint.pubsub.adapter.stats()["publish_dropped"] == 7


SCRIPT = """
import sys
if sys.argv[1] == "patched":
    from gevent import monkey
    monkey.patch_all()
from phx_gevent import Endpoint
endpoint = Endpoint(pubsub=sys.argv[2], pubsub_prefix=sys.argv[3])
for i in range(50):
    endpoint.broadcast("room:1", "ev", {"i": i})
"""


def test_a_script_that_broadcasts_through_an_endpoint_and_exits_delivers(redis_server, tap, prefix):  # noqa: F811
    # Nothing calls close(): the interpreter's exit flushes the adapter's queue.
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, "patched", redis_server.url, prefix],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert [codec.decode(m)["p"]["i"] for m in tap.drain()] == list(range(50))


# -- the command line -----------------------------------------------------------------------


def test_cli_broadcast_and_disconnect_exit_0_silently(redis_server, node, prefix):  # noqa: F811
    room = Recorder(node, "room:cli")
    ids = Recorder(node, "user_socket:bob")
    done = cli("broadcast", "--redis", redis_server.url, "--prefix", prefix, "room:cli", "new_msg", '{"body": "hi"}')
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    done = cli("disconnect", "--redis", redis_server.url, "--prefix", prefix, "user_socket:bob")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert room.wait(1) == [("new_msg", {"body": "hi"})]
    assert ids.wait(1) == [("disconnect", {})]
    # Nobody subscribed (another prefix) is still a success: Redis accepted it.
    done = cli("broadcast", "--redis", redis_server.url, "--prefix", "nobody", "t", "e", "{}")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.mark.parametrize(
    "args",
    [
        ["broadcast", "TOPIC", "EVENT", "not json"],
        ["broadcast", "TOPIC", "EVENT", "[1, 2]"],
        ["broadcast", "TOPIC", "EVENT", '"text"'],
        ["broadcast", "TOPIC", "EVENT", '{"x": NaN}'],
        ["broadcast", "TOPIC", "EVENT"],
        ["disconnect"],
        ["frobnicate", "x"],
    ],
)
def test_cli_usage_errors_exit_2_before_connecting(redis_server, tap, prefix, args):  # noqa: F811
    connections = redis_server.command("INFO", "stats")["total_connections_received"]
    done = cli(args[0], "--redis", redis_server.url, "--prefix", prefix, *args[1:])
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert "usage:" in done.stderr and "error:" in done.stderr and "Traceback" not in done.stderr
    assert tap.drain() == []
    # Only this check's own connection: the command line never connected.
    assert redis_server.command("INFO", "stats")["total_connections_received"] == connections + 1


def test_cli_without_redis_or_arguments_exits_2():
    for args in (["broadcast", "t", "e", "{}"], [], ["broadcast", "--redis", "ftp://x", "t", "e", "{}"]):
        done = cli(*args)
        assert done.returncode == 2 and done.stdout == "" and "usage:" in done.stderr, done


def test_cli_with_redis_unreachable_exits_1_with_one_line():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    done = cli("broadcast", "--redis", url, "room:1", "ev", "{}", timeout=10)  # the contract: within 10 s
    assert done.returncode == 1, done
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "did not accept" in lines[0] and "127.0.0.1" in lines[0], done.stderr


def test_importing_the_package_patches_nothing_and_warns_nothing():
    code = (
        "import sys, phx_gevent.__main__, phx_gevent\n"
        "from gevent import monkey\n"
        "assert not monkey.is_anything_patched()\n"
        "assert 'app_example' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=30
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_the_emitter_benchmark_runs():
    # A smoke test of benchmarks/emitter.py (tiny, phx only; nothing timed): every message counted.
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/emitter.py",
            "--n",
            "300",
            "--reps",
            "1",
            "--contenders",
            "single,many",
            "--out",
            "",
        ],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "phx Emitter.broadcast_many" in done.stdout
