"""Redis set-ups beyond one server, for tests: a Cluster, a Sentinel-managed primary, TLS with an ACL user.

Every process is a private ``redis-server`` (:class:`tests.servers.RedisServer`)
on free loopback ports, in a temporary directory, torn down by its fixture.
Without ``redis-server`` (or ``openssl`` for TLS) they skip, except under
``CI=true`` where they fail.

- :class:`ClusterServers`: N primaries (``--cluster-enabled yes``, an explicit
  ``cluster-port``, ``cluster-require-full-coverage no``), slots assigned and
  nodes introduced directly (``CLUSTER ADDSLOTSRANGE`` / ``MEET``: what
  ``redis-cli --cluster create`` does, without its fixed waits). ``kill(i)``
  and ``restart(i)`` take one primary down and back with its slots.
- :class:`SentinelServers`: a primary, a replica and one sentinel;
  ``failover()`` promotes the replica.
- :func:`tls_files` and :class:`TlsServer`: a CA and a server certificate made
  with ``openssl``, a server with a TLS port and an ACL user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.servers import CI, OutputLog, RedisServer, free_port, require_redis, wait_until

ACL_USER = "phx"
ACL_PASSWORD = "s3cret-phx"
SERVICE = "mymaster"


class ClusterServers:
    """A Redis Cluster of ``primaries`` primaries on 127.0.0.1, no replicas."""

    def __init__(self, primaries: int = 3, extra_args: list[str] | tuple[str, ...] = (), replicas: int = 0) -> None:
        require_redis()
        #: Nodes ``0 .. primaries-1`` start as primaries; then ``replicas`` replicas of each, in order.
        self.primaries = primaries
        self.replicas = replicas
        self.dir = tempfile.mkdtemp(prefix="phx-cluster-")
        self.nodes: list[RedisServer] = []
        self.bus_ports: list[int] = []
        #: Slots moved away from their first owner (``move_slot``): slot -> node index.
        self.moved: dict[int, int] = {}
        for i in range(primaries * (1 + replicas)):
            node_dir = os.path.join(self.dir, str(i))
            os.mkdir(node_dir)
            server = RedisServer(node_dir)
            server.port = free_port()
            self.bus_ports.append(free_port())
            server.extra_args = [
                "--cluster-enabled", "yes",
                "--cluster-port", str(self.bus_ports[-1]),
                "--cluster-config-file", "nodes.conf",
                "--cluster-require-full-coverage", "no",
                "--cluster-node-timeout", "2000",
                *extra_args,
            ]  # fmt: skip
            self.nodes.append(server)

    @property
    def addresses(self) -> list[str]:
        """``host:port`` of every node, in order."""
        return [f"127.0.0.1:{n.port}" for n in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a seed."""
        return "redis+cluster://" + ",".join(self.addresses)

    def start(self, timeout: float = 20.0) -> ClusterServers:
        """Start the nodes, give each an equal share of the 16384 slots, and wait for ``cluster_state:ok``."""
        for server in self.nodes:
            server.start(timeout)
        count = self.primaries
        for i, server in enumerate(self.nodes[:count]):
            first, last = i * 16384 // count, (i + 1) * 16384 // count - 1
            server.command("CLUSTER", "ADDSLOTSRANGE", first, last)
            server.command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        for server, bus in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
            self.nodes[0].command("CLUSTER", "MEET", "127.0.0.1", server.port, bus)
        wait_until(self.healthy, timeout, "the cluster to agree (cluster_state:ok on every node)", interval=0.05)
        for j, replica in enumerate(self.nodes[count:]):
            replica.command("CLUSTER", "REPLICATE", self.node_id(j % count))
        for replica in self.nodes[count:]:
            wait_until(
                lambda r=replica: r.command("INFO", "replication").get("master_link_status") == "up",
                timeout,
                "the replicas to sync",
                interval=0.05,
            )
        return self

    def failover(self, replica: int, timeout: float = 20.0) -> None:
        """Promote node ``replica`` in place of its primary (``CLUSTER FAILOVER``, coordinated)."""
        server = self.nodes[replica]
        server.command("CLUSTER", "FAILOVER")
        wait_until(
            lambda: all(server.port in {int(e[2][1]) for e in n.command("CLUSTER", "SLOTS")} for n in self.nodes),
            timeout,
            "every node to see the promoted replica",
            interval=0.05,
        )

    def healthy(self) -> bool:
        """Every running node knows every node and reports ``cluster_state:ok``."""
        for server in self.nodes:
            try:
                info = server.command("CLUSTER", "INFO")
            except Exception:
                return False
            if "cluster_state:ok" not in info or f"cluster_known_nodes:{len(self.nodes)}" not in info:
                return False
            slots = server.command("CLUSTER", "SLOTS")
            if sum(int(r[1]) - int(r[0]) + 1 for r in slots) != 16384:
                return False
        return True

    def owner(self, key: str | bytes) -> int:
        """The index of the node whose slots hold ``key`` (or a shard channel)."""
        from redis.crc import key_slot

        slot = key_slot(key.encode() if isinstance(key, str) else key)
        if slot in self.moved:
            return self.moved[slot]
        count = self.primaries
        for i in range(count):
            if i * 16384 // count <= slot <= (i + 1) * 16384 // count - 1:
                return i
        raise AssertionError(slot)

    def node_id(self, index: int) -> str:
        return str(self.nodes[index].command("CLUSTER", "MYID"))

    def move_slot(self, slot: int, dest: int, timeout: float = 20.0) -> None:
        """Migrate ``slot`` (and its keys) to node ``dest``, as ``redis-cli --cluster reshard`` does."""
        source = self.owner_of_slot(slot)
        if source == dest:
            return
        src, dst = self.nodes[source], self.nodes[dest]
        src_id, dst_id = self.node_id(source), self.node_id(dest)
        dst.command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := src.command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)
        for server in (dst, src, *[n for n in self.nodes if n not in (src, dst)]):
            server.command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        self.moved[slot] = dest
        wait_until(
            lambda: all(self._owner_seen(n, slot) == dst.port for n in self.nodes),
            timeout,
            f"every node to agree that slot {slot} moved",
            interval=0.05,
        )

    def owner_of_slot(self, slot: int) -> int:
        if slot in self.moved:
            return self.moved[slot]
        count = self.primaries
        return next(i for i in range(count) if i * 16384 // count <= slot <= (i + 1) * 16384 // count - 1)

    @staticmethod
    def _owner_seen(server: RedisServer, slot: int) -> int | None:
        for entry in server.command("CLUSTER", "SLOTS"):
            if int(entry[0]) <= slot <= int(entry[1]):
                return int(entry[2][1])
        return None

    def kill(self, index: int) -> None:
        """SIGKILL one primary; the others keep serving their slots."""
        self.nodes[index].kill()

    def restart(self, index: int, timeout: float = 20.0) -> None:
        """Start a killed primary again (same port, same nodes.conf: it takes its slots back)."""
        self.nodes[index].start(timeout)
        wait_until(self.healthy, timeout, "the restarted node to rejoin the cluster", interval=0.05)

    def close(self) -> None:
        for server in self.nodes:
            server.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelServers:
    """A primary, one replica of it, and one sentinel watching them (quorum 1)."""

    def __init__(self) -> None:
        self.binary = require_redis()
        self.dir = tempfile.mkdtemp(prefix="phx-sentinel-")
        os.mkdir(os.path.join(self.dir, "p"))
        os.mkdir(os.path.join(self.dir, "r"))
        # No diskless-sync delay: the replica is in sync at once, and after a failover the other way round.
        fast = ["--repl-diskless-sync-delay", "0"]
        self.primary = RedisServer(os.path.join(self.dir, "p"), fast)
        self.replica = RedisServer(os.path.join(self.dir, "r"), fast)
        self.sentinel_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.output: OutputLog | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}/0"

    def start(self, timeout: float = 20.0) -> SentinelServers:
        self.primary.start(timeout)
        self.replica.extra_args += ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica.start(timeout)
        wait_until(
            lambda: self.replica.command("INFO", "replication").get("master_link_status") == "up",
            timeout,
            "the replica to sync",
            interval=0.05,
        )
        self.sentinel_port = free_port()
        conf = os.path.join(self.dir, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(
                f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 1\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )
        self.proc = subprocess.Popen(
            [self.binary, conf, "--sentinel", "--loglevel", "notice"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        self.output = OutputLog(self.proc.stdout)
        wait_until(self._knows_replica, timeout, "the sentinel to discover the replica", interval=0.05)
        return self

    def sentinel(self, *args: Any) -> Any:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.sentinel_port, socket_timeout=5, decode_responses=True)
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def _knows_replica(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"the sentinel exited: {self.output and self.output.lines[-10:]}")
        try:
            replicas = self.sentinel("SENTINEL", "REPLICAS", SERVICE)
        except Exception:
            return False
        # Promotable: the sentinel has the replica's own INFO and sees its link to the primary up.
        return any(
            r.get("port") == str(self.replica.port)
            and r.get("flags") == "slave"
            and r.get("master-link-status") == "ok"
            for r in replicas
        )

    def primary_port(self) -> int:
        """The port the sentinel names as the primary now."""
        return int(self.sentinel("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)[1])

    def failover(self, timeout: float = 20.0) -> None:
        """Promote the replica (``SENTINEL FAILOVER``); returns once it is the primary the sentinel names."""
        old = self.primary
        self.sentinel("SENTINEL", "FAILOVER", SERVICE)
        wait_until(lambda: self.primary_port() == self.replica.port, timeout, "the sentinel to switch", interval=0.05)
        wait_until(
            lambda: self.replica.command("INFO", "replication").get("role") == "master",
            timeout,
            "the replica to become primary",
            interval=0.05,
        )
        self.primary, self.replica = self.replica, old

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.output is not None:
            self.output.join()
        self.primary.close()
        self.replica.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def tls_files(directory: str) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1/localhost in ``directory`` (openssl); skips without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        reason = "openssl is not installed; TLS tests need it to make certificates"
        if CI:
            pytest.fail(reason)
        pytest.skip(reason)
    ca_key, ca_crt = os.path.join(directory, "ca.key"), os.path.join(directory, "ca.crt")
    key, csr, crt = (os.path.join(directory, n) for n in ("server.key", "server.csr", "server.crt"))
    ext = os.path.join(directory, "ext.cnf")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=phx-test-ca",
         "-keyout", ca_key, "-out", ca_crt],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", key, "-out", csr],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
         "-extfile", ext, "-out", crt],
    ]  # fmt: skip
    for cmd in run:
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)
    return {"ca": ca_crt, "cert": crt, "key": key}


class TlsServer(RedisServer):
    """A redis-server with a TLS port (``tls_port``) and an ACL user limited to the ``phx:`` prefix.

    The plain port stays open for the fixture's own checks; tests connect to
    :attr:`tls_url`. The ACL user ``phx`` may use keys and channels under
    ``phx:`` only (what an operator would give the app).
    """

    def __init__(self) -> None:
        super().__init__()
        self.files = tls_files(self.dir)
        self.tls_port = free_port()
        self.extra_args = [
            "--tls-port", str(self.tls_port),
            "--tls-cert-file", self.files["cert"],
            "--tls-key-file", self.files["key"],
            "--tls-ca-cert-file", self.files["ca"],
            "--tls-auth-clients", "no",
            "--user", ACL_USER, "on", f">{ACL_PASSWORD}", "~phx:*", "&phx:*", "+@all",
        ]  # fmt: skip

    def start(self, timeout: float = 15.0) -> TlsServer:
        """Start it; skips (fails under CI) when this redis-server was built without TLS."""
        try:
            super().start(timeout)
        except AssertionError:
            lines = " ".join(self.output.lines if self.output else []).lower()
            if "tls" in lines and ("unrecognized" in lines or "not support" in lines or "bad directive" in lines):
                reason = "this redis-server was built without TLS (Debian's redis-server has it)"
                if CI:
                    pytest.fail(reason)
                pytest.skip(reason)
            raise
        return self

    @property
    def tls_url(self) -> str:
        return f"rediss://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{self.tls_port}/0"


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[ClusterServers]:
    """A 3-primary Redis Cluster, started once per test module."""
    cluster = ClusterServers(3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def redis_sentinel() -> Iterator[SentinelServers]:
    """A primary, a replica and a sentinel (``.url`` is ``redis+sentinel://...``); ``failover()`` switches."""
    servers = SentinelServers()
    try:
        servers.start()
        yield servers
    finally:
        servers.close()


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TlsServer]:
    """A redis-server with TLS (``.tls_url``, CA in ``.files["ca"]``) and the ACL user ``phx``."""
    server = TlsServer()
    try:
        server.start()
        yield server
    finally:
        server.close()
