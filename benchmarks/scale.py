#!/usr/bin/env python3
"""Scale-out (issue 13): many Redis nodes, thousands of topics, Redis shards, and the join's cost.

    .venv/bin/python benchmarks/scale.py nodes --nodes 8 --users 16000 --rate 2000 --seconds 10
    .venv/bin/python benchmarks/scale.py nodes --variant c1=topic@cluster1 --variant c3=topic@cluster3
    .venv/bin/python benchmarks/scale.py joins --clients 2000 --workers 2
    .venv/bin/python benchmarks/scale.py redis --subscribers 0,1,8

``nodes``: ``--nodes`` node processes (benchmarks/scale_node.py: each its
own PubSub, Redis adapter and Redis connections, as a gunicorn worker) hold
local subscribers on per-user topics ``user:<id>`` (each user on one node,
and with probability ``--overlap`` on a second one: another tab, another
device) and on ``--shared`` topics every node subscribes to. One publisher
process (``phx_gevent.Emitter.broadcast_many``, paced every 10 ms) publishes
``--rate`` broadcasts/s cluster-wide for ``--seconds``: a ``--shared-share``
of them to the shared topics, the rest to users drawn uniformly. Every node
reports the envelopes it received from Redis, those with a local subscriber,
and its CPU; every Redis server (shard) reports its commands
(``INFO commandstats``), bytes out and CPU. Each ``--variant
LABEL=ROUTING@REDIS`` (ROUTING ``broadcast`` or ``topic``; REDIS ``single``,
``clusterN`` for an N-primary Redis Cluster this script starts) runs on a
fresh Redis with the same topics and the same publish sequence (seeded),
interleaved with the others (A B A B ...). The default is
``broadcast@single`` next to ``topic@single``.

``joins``: the join's added latency. gunicorn with ``--workers`` workers and
Redis serving the example app (``REDIS_URL=...?routing=...``, ``room:*``
without history: benchmarks/servers/nohistory_app.py); the load generator's storm workload with a
distinct topic per client (``room:scale:<i>``), so every join is the first
of its topic on its worker: ``--clients`` joins at once, then
``--trickle`` joins ``--trickle-concurrency`` at a time; join p50/p99 per
routing, interleaved.

``redis``: what one redis-server's core answers, for the shard count:
PUBLISH/s from ``redis-benchmark`` (pipelined) with 0, 1, ... subscribed
readers on the channel.

Results: Markdown under benchmarks/results/ (``scale-nodes*.md``,
``scale-joins*.md``) with the exact command, the JSON under results/raw/.
Loopback only; every wait has a deadline; every process it starts is
stopped at the end (a failed run too).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import run as R  # noqa: E402

NODE = HERE / "scale_node.py"


# -- Redis: one server or a cluster ---------------------------------------------------------------


class RedisSetup:
    """Redis servers this script started: ``url`` for the adapter and emitter, ``ports`` (one per shard)."""

    def __init__(self, url: str, ports: list[int], procs: list[subprocess.Popen], cluster: bool) -> None:
        self.url = url
        self.ports = ports
        self.procs = procs
        self.cluster = cluster

    def client(self, port: int) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, decode_responses=True)

    def reset_stats(self) -> None:
        for port in self.ports:
            self.client(port).config_resetstat()

    def shard_stats(self) -> list[dict[str, Any]]:
        """Per server: commands by name, totals, bytes out, pub/sub channels, CPU seconds."""
        out = []
        for port, proc in zip(self.ports, self.procs, strict=True):
            c = self.client(port)
            cmds = {k.removeprefix("cmdstat_"): v["calls"] for k, v in c.info("commandstats").items()}
            stats = c.info("stats")
            cpu = c.info("cpu")
            channels = c.execute_command("PUBSUB", "CHANNELS")
            shard_channels = c.execute_command("PUBSUB", "SHARDCHANNELS") if self.cluster else []
            out.append(
                {
                    "port": port,
                    "pid": proc.pid,
                    "commands": cmds,
                    "total_commands": stats.get("total_commands_processed", 0),
                    "net_out_bytes": stats.get("total_net_output_bytes", 0),
                    "net_in_bytes": stats.get("total_net_input_bytes", 0),
                    "channels": len(channels),
                    "shard_channels": len(shard_channels),
                    "cpu": float(cpu.get("used_cpu_sys", 0)) + float(cpu.get("used_cpu_user", 0)),
                }
            )
        return out


def _start_redis(port: int, tmp: str, extra: list[str]) -> subprocess.Popen:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp]
    return subprocess.Popen([*cmd, *extra], stdout=subprocess.DEVNULL)


def _wait_ping(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not answer")


def with_routing(url: str, routing: str) -> str:
    """``url`` with the adapter's and emitter's ``routing`` query (issue 13: ``topic`` or ``broadcast``)."""
    return f"{url}{'&' if '?' in url else '?'}routing={routing}"


def cluster_url(ports: list[int]) -> str:
    """The adapter's and emitter's URL of a cluster (issue 13B's format)."""
    return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)


@contextmanager
def redis_setup(kind: str) -> Iterator[RedisSetup]:
    """``single``: one redis-server; ``clusterN``: N primaries, slots split evenly (no replicas)."""
    tmp = tempfile.mkdtemp(prefix="phx-scale-redis-")
    procs: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 20
        if kind == "single":
            port = R.free_port()
            procs.append(_start_redis(port, tmp, []))
            _wait_ping(port, deadline)
            yield RedisSetup(f"redis://127.0.0.1:{port}/0", [port], procs, False)
            return
        m = re.fullmatch(r"cluster(\d+)", kind)
        if not m:
            raise SystemExit(f"unknown Redis setup {kind!r}: single or clusterN")
        n = int(m.group(1))
        ports = [R.free_port() for _ in range(n)]
        bus = [R.free_port() for _ in range(n)]
        for port, bport in zip(ports, bus, strict=True):
            extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-port",
                str(bport),
                "--cluster-require-full-coverage",
                "no",
                "--cluster-node-timeout",
                "2000",
            ]
            procs.append(_start_redis(port, tmp, extra))
        for port in ports:
            _wait_ping(port, deadline)
        setup = RedisSetup(cluster_url(ports), ports, procs, True)
        step = 16384 // n
        for i, port in enumerate(ports):
            last = 16383 if i == n - 1 else (i + 1) * step - 1
            setup.client(port).execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, last)
        for port, bport in zip(ports[1:], bus[1:], strict=True):
            setup.client(ports[0]).execute_command("CLUSTER", "MEET", "127.0.0.1", port, bport)
        while time.monotonic() < deadline:
            ok = all(
                setup.client(p).info("cluster").get("cluster_enabled") == 1
                and "cluster_state:ok" in setup.client(p).execute_command("CLUSTER", "INFO")
                and len(setup.client(p).execute_command("CLUSTER", "SLOTS")) == n
                for p in ports
            )
            if ok:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"the {n}-primary cluster did not converge")
        yield setup
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


# -- the workload: topics per node and the publish sequence -----------------------------------------


def assignment(nodes: int, users: int, overlap: float, shared: int, seed: int) -> list[list[str]]:
    """Topics per node: each user on a home node, a second node with probability ``overlap``; shared on all."""
    rng = random.Random(seed)
    out: list[list[str]] = [[f"room:shared{k}" for k in range(shared)] for _ in range(nodes)]
    for u in range(users):
        home = u % nodes
        out[home].append(f"user:{u}")
        if nodes > 1 and rng.random() < overlap:
            other = (home + rng.randrange(1, nodes)) % nodes
            out[other].append(f"user:{u}")
    return out


class _RawPublisher:
    """``broadcast_many`` through redis-py: the adapter's envelope on the routing's channel, pipelined."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        from phx_gevent.pubsub import codec
        from phx_gevent.pubsub.routing import channel_for, split_routing

        url, routing = split_routing(url, None)
        self._client = redis.Redis.from_url(url)
        self._channel = lambda topic: channel_for(prefix, routing, topic)
        self._encode = codec.encode

    def broadcast_many(self, messages: list[tuple[str, str, Any]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for topic, event, payload in messages:
            envelope = {"k": "b", "n": "scale-publisher", "t": topic, "e": event, "p": payload, "x": None}
            pipe.publish(self._channel(topic), self._encode(envelope))
        pipe.execute()

    def close(self) -> None:
        self._client.close()


def cmd_publish(args: argparse.Namespace) -> None:
    """Internal: publish the seeded sequence through an Emitter; print the count per topic as JSON."""
    sys.path.insert(0, str(ROOT))
    import inspect

    import phx_gevent.emitter as emitter_module

    cluster = args.url.startswith(("redis+cluster://", "rediss+cluster://"))
    if cluster or "split_routing" in inspect.getsource(emitter_module):
        emitter: Any = emitter_module.Emitter(args.url, args.prefix)
    else:
        # An Emitter that does not follow the routing yet: the same envelopes on the routing's channels.
        emitter = _RawPublisher(args.url, args.prefix)
    rng = random.Random(args.seed + 1)
    counts: dict[str, int] = {}
    pad = "x" * 40
    sent = 0
    t0 = time.monotonic()
    total = int(args.rate * args.seconds)
    while sent < total:
        now = time.monotonic()
        due = min(total, int((now - t0) * args.rate) + 1)
        batch = []
        for _ in range(due - sent):
            if args.shared and rng.random() < args.shared_share:
                topic = f"room:shared{rng.randrange(args.shared)}"
            else:
                topic = f"user:{rng.randrange(args.users)}"
            counts[topic] = counts.get(topic, 0) + 1
            batch.append((topic, "new_msg", {"t": time.time() * 1000, "s": sent + len(batch), "p": pad}))
        if batch:
            emitter.broadcast_many(batch)
            sent += len(batch)
        time.sleep(0.01)
    emitter.close()
    seconds = time.monotonic() - t0
    print(json.dumps({"published": sent, "seconds": seconds, "counts": counts}))


# -- one run: nodes, publisher, reports -------------------------------------------------------------


class NodeProc:
    """A scale_node.py process and its command pipe."""

    def __init__(self, cfg_path: Path, index: int, env: dict[str, str]) -> None:
        self.index = index
        self.proc = subprocess.Popen(
            [R.PYTHON, str(NODE), str(cfg_path), str(index)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, **env},
        )
        self.ready: dict[str, Any] = {}

    def wait_ready(self, timeout: float) -> None:
        line = self._line(timeout)
        if not line.startswith("READY "):
            raise RuntimeError(f"node {self.index} did not start: {line!r}")
        self.ready = json.loads(line[6:])

    def ask(self, cmd: str, timeout: float = 30.0) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._line(timeout)

    def _line(self, timeout: float) -> str:
        import selectors

        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                raise RuntimeError(f"node {self.index}: no answer within {timeout}s")
        finally:
            sel.close()
        return self.proc.stdout.readline().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("quit", 5)
            except (RuntimeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def one_nodes_run(args: argparse.Namespace, routing: str, redis_kind: str, topics: list[list[str]]) -> dict[str, Any]:
    """Start the Redis setup and the nodes, publish, wait for delivery, collect every figure."""
    with ExitStack() as stack:
        setup = stack.enter_context(redis_setup(redis_kind))
        setup.reset_stats()
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="phx-scale-")))
        if setup.cluster and routing != "topic":
            raise SystemExit("a Redis Cluster carries only topic routing (sharded by topic)")
        url = setup.url if setup.cluster else with_routing(setup.url, routing)
        cfg = {"url": url, "prefix": "scale", "routing": routing, "assignment": topics}
        cfg_path = tmp / "cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        nodes = [NodeProc(cfg_path, i, {}) for i in range(len(topics))]
        for node in nodes:
            stack.callback(node.stop)
        t_start = time.monotonic()
        for node in nodes:
            node.wait_ready(90)
        start_seconds = time.monotonic() - t_start
        # What subscribing every node's topics cost each shard (batched SUBSCRIBEs), before the window.
        setup_stats = setup.shard_stats()
        # The nodes' CPU while nothing is published (the adapter's timers, the runtime): subtracted below.
        for node in nodes:
            node.ask("reset")
        time.sleep(args.idle)
        idle = [json.loads(node.ask("report")) for node in nodes]
        for node in nodes:
            node.ask("reset")
        setup.reset_stats()
        shard_cpu0 = [s["cpu"] for s in setup.shard_stats()]
        setup.reset_stats()
        load0 = os.getloadavg()[0]
        pub_cmd = [
            R.PYTHON,
            str(Path(__file__).resolve()),
            "publish",
            "--url",
            url,
            "--prefix",
            "scale",
            "--rate",
            str(args.rate),
            "--seconds",
            str(args.seconds),
            "--users",
            str(args.users),
            "--shared",
            str(args.shared),
            "--shared-share",
            str(args.shared_share),
            "--seed",
            str(args.seed),
        ]
        pub = subprocess.run(pub_cmd, capture_output=True, text=True, timeout=args.seconds + 120, cwd=ROOT)
        if pub.returncode != 0:
            raise RuntimeError(f"publisher failed: {pub.stderr[-2000:]}")
        published = json.loads(pub.stdout.strip().splitlines()[-1])
        counts: dict[str, int] = published["counts"]
        expected = [sum(counts.get(t, 0) for t in set(node_topics)) for node_topics in topics]
        # Wait (bounded) until every node delivered what it subscribes to.
        deadline = time.monotonic() + args.drain
        reports: list[dict[str, Any]] = []
        while True:
            reports = [json.loads(node.ask("report")) for node in nodes]
            if all(r["useful"] >= e for r, e in zip(reports, expected, strict=True)) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        shards = setup.shard_stats()
        for s, c0 in zip(shards, shard_cpu0, strict=True):
            s["cpu_window"] = s["cpu"] - c0
        for r, e, i in zip(reports, expected, idle, strict=True):
            r["expected"] = e
            r["idle_cpu_per_s"] = i["cpu"] / max(1e-9, i["wall"])
            r["busy_cpu"] = max(0.0, r["cpu"] - r["idle_cpu_per_s"] * r["wall"])
            r.pop("stats", None)
        return {
            "routing": routing,
            "redis": redis_kind,
            "published": published["published"],
            "publish_seconds": published["seconds"],
            "start_seconds": start_seconds,
            "nodes": reports,
            "shards": shards,
            "setup_shards": setup_stats,
            "load_before": load0,
            "load_after": os.getloadavg()[0],
        }


# -- summaries ----------------------------------------------------------------------------------------


def _med(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else 0.0


def nodes_markdown(args: argparse.Namespace, variants: list[tuple[str, str, str]], results: dict[str, Any]) -> str:
    lines = []
    total_topics = args.users + args.shared
    lines.append(
        f"{args.nodes} nodes, {args.users:,} user topics (overlap {args.overlap:g}) + {args.shared} shared "
        f"topics ({total_topics:,} topics in all), {args.rate:g} broadcasts/s cluster-wide for {args.seconds:g} s "
        f"({args.shared_share:.0%} to shared topics), {args.reps} interleaved repetitions; figures are medians over "
        "repetitions of the median node (in brackets the min-max over nodes, first repetition)."
    )
    lines.append("")
    lines.append(
        "| variant | published | received per node | with local interest per node | received / interest "
        "| received / published | missing deliveries | CPU per node (s) | idle CPU per node (cores) "
        "| CPU above idle per node (s) | node us per published broadcast | node us per received |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, _, _ in variants:
        runs = [r for r in results[label] if "error" not in r]
        if not runs:
            lines.append(f"| {label} | failed: {results[label][0].get('error', '?')} |" + " |" * 8)
            continue
        rec = [_med([n["received"] for n in r["nodes"]]) for r in runs]
        use = [_med([n["useful"] for n in r["nodes"]]) for r in runs]
        pub = [r["published"] for r in runs]
        missing = [sum(max(0, n["expected"] - n["useful"]) for n in r["nodes"]) for r in runs]
        cores = [_med([n["cpu"] for n in r["nodes"]]) for r in runs]
        idle = [_med([n.get("idle_cpu_per_s", 0.0) for n in r["nodes"]]) for r in runs]
        busy = [_med([n.get("busy_cpu", n["cpu"]) for n in r["nodes"]]) for r in runs]
        us_pub = [_med([n.get("busy_cpu", n["cpu"]) * 1e6 / max(1, r["published"]) for n in r["nodes"]]) for r in runs]
        us_rec = [_med([n.get("busy_cpu", n["cpu"]) * 1e6 / max(1, n["received"]) for n in r["nodes"]]) for r in runs]
        first = runs[0]["nodes"]
        lines.append(
            f"| {label} | {_med(pub):,.0f} | {_med(rec):,.0f} ({min(n['received'] for n in first):,}-"
            f"{max(n['received'] for n in first):,}) | {_med(use):,.0f} ({min(n['useful'] for n in first):,}-"
            f"{max(n['useful'] for n in first):,}) "
            f"| {_med([a / max(1, b) for a, b in zip(rec, use, strict=True)]):.2f} "
            f"| {_med([a / max(1, b) for a, b in zip(rec, pub, strict=True)]):.3f} | {max(missing)} "
            f"| {_med(cores):.2f} | {_med(idle):.3f} | {_med(busy):.2f} | {_med(us_pub):.1f} | {_med(us_rec):.1f} |"
        )
    lines.append("")
    lines.append(
        f"CPU: each node's process CPU over the window (publishing, then until every node delivered); idle = "
        f"its CPU rate over {args.idle:g} s with nothing published, measured just before; the per-broadcast and "
        "per-received figures use the CPU above idle."
    )
    lines.append("")
    for label, _, _ in variants:
        runs = [r for r in results[label] if "error" not in r]
        if runs:
            lines.append(
                f"- {label}: all nodes started and subscribed in {_med([r['start_seconds'] for r in runs]):.1f} s "
                f"(median over repetitions); publishing took {_med([r['publish_seconds'] for r in runs]):.1f} s."
            )
    lines.append("")
    lines.append(
        "Per Redis server (shard), median over repetitions. The window starts once every node is subscribed; "
        "'setup' is what subscribing every node's topics cost before it. Envelopes out: on a cluster, the sum "
        "of what the nodes read from that shard (their adapters count per shard); on one Redis, its bytes out "
        "divided by the bytes per envelope of the same run (all bytes out / all envelopes the nodes received)."
    )
    lines.append("")
    lines.append(
        "| variant | shard | commands | PUBLISH / SPUBLISH | MB out | envelopes out (est.) | Redis CPU s "
        "| setup: channels subscribed | setup: SUBSCRIBE / SSUBSCRIBE commands | setup: commands |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for label, _, _ in variants:
        runs = [r for r in results[label] if "error" not in r]
        if not runs:
            continue
        for i in range(len(runs[0]["shards"])):
            sh = [r["shards"][i] for r in runs]
            su = [r["setup_shards"][i] for r in runs]

            def cmd(s: dict[str, Any], *names: str) -> int:
                return sum(int(s["commands"].get(n, 0)) for n in names)

            # Bytes per message a node received, from the same run (every received envelope left some
            # shard): splits the nodes' total over the shards by their bytes out.
            env_bytes = [
                sum(s["net_out_bytes"] for s in r["shards"]) / max(1, sum(n["received"] for n in r["nodes"]))
                for r in runs
            ]
            outs = [exact_out(r, s) or s["net_out_bytes"] / b for r, s, b in zip(runs, sh, env_bytes, strict=True)]
            lines.append(
                f"| {label} | {i + 1} | {_med([s['total_commands'] for s in sh]):,.0f} "
                f"| {_med([cmd(s, 'publish', 'spublish') for s in sh]):,.0f} "
                f"| {_med([s['net_out_bytes'] / 1e6 for s in sh]):.1f} "
                f"| {_med(outs):,.0f} "
                f"| {_med([s['cpu_window'] for s in sh]):.2f} "
                f"| {_med([max(s['channels'], s['shard_channels']) for s in su]):,.0f} "
                f"| {_med([cmd(s, 'subscribe', 'ssubscribe') for s in su]):,.0f} "
                f"| {_med([s['total_commands'] for s in su]):,.0f} |"
            )
    loads = [(r["load_before"], r["load_after"]) for rs in results.values() for r in rs if "error" not in r]
    if loads:
        lines.append("")
        lines.append(
            "Machine load (1-min load average before/after each run): "
            + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in loads)
            + " (2 cores; every node, Redis and the publisher share them, no pinning)."
        )
    return "\n".join(lines)


def exact_out(run: dict[str, Any], shard: dict[str, Any]) -> int | None:
    """Envelopes a shard sent the nodes, summed from the nodes' own per-shard counts (cluster adapters)."""
    addr = f"127.0.0.1:{shard['port']}"
    counts = [n.get("per_shard", {}).get(addr) for n in run["nodes"]]
    if not any(c is not None for c in counts):
        return None
    return sum(c or 0 for c in counts)


def parse_variants(specs: list[str] | None) -> list[tuple[str, str, str]]:
    specs = specs or ["broadcast=broadcast@single", "topic=topic@single"]
    out = []
    for spec in specs:
        label, _, rest = spec.partition("=")
        routing, _, kind = rest.partition("@")
        if routing not in ("broadcast", "topic") or not kind:
            raise SystemExit(f"--variant {spec!r}: LABEL=ROUTING@REDIS, ROUTING broadcast|topic, REDIS single|clusterN")
        out.append((label, routing, kind))
    return out


def save(name: str, args: argparse.Namespace, results: Any, markdown: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = (
        f"<!-- {name}: benchmarks/scale.py {' '.join(sys.argv[1:])} -->\n"
        f"Measured {stamp} at commit {R.git_head()}; {os.cpu_count()} cores.\n\n"
        f"    .venv/bin/python benchmarks/scale.py {' '.join(sys.argv[1:])}\n\n{markdown}\n"
    )
    print(text)
    if not args.out:
        return
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    raw = {"name": name, "argv": sys.argv[1:], "date": stamp, "commit": R.git_head(), "results": results}
    (out / "raw" / f"{name}-{stamp.replace(':', '')}.json").write_text(json.dumps(raw, indent=1))


def cmd_nodes(args: argparse.Namespace) -> None:
    variants = parse_variants(args.variant)
    topics = assignment(args.nodes, args.users, args.overlap, args.shared, args.seed)
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in variants}
    for rep in range(args.reps):
        for label, routing, kind in variants:
            busy = R.wait_quiet(max_wait=args.max_wait) if args.max_wait else 0.0
            R.say(f"rep {rep + 1}/{args.reps}: {label} ({routing} routing, {kind})")
            try:
                result = one_nodes_run(args, routing, kind, topics)
            except Exception as exc:  # a failed run is reported, the others go on
                result = {"error": f"{type(exc).__name__}: {exc}"}
                R.say(f"  {label} failed: {result['error']}")
            result["busyBefore"] = round(busy, 2)
            results[label].append(result)
    md = nodes_markdown(args, variants, results)
    save(args.name or f"scale-nodes-{args.nodes}", args, results, f"### Many nodes\n\n{md}")


# -- joins on a real server ---------------------------------------------------------------------------


def cmd_joins(args: argparse.Namespace) -> None:
    routings = args.routings.split(",")
    R.raise_nofile(args.clients + args.trickle + 2000)
    results: dict[str, list[dict[str, Any]]] = {r: [] for r in routings}
    with redis_setup("single") as setup:
        for rep in range(args.reps):
            for routing in routings:
                busy = R.wait_quiet(max_wait=args.max_wait) if args.max_wait else 0.0
                R.say(f"rep {rep + 1}/{args.reps}: joins with {routing} routing")
                env = {"REDIS_URL": with_routing(setup.url, routing), "APP": "benchmarks.servers.nohistory_app:app"}
                result: dict[str, Any] = {"busyBefore": round(busy, 2)}
                setup.reset_stats()
                try:
                    server = R.start_gunicorn(args.workers, args.clients + args.trickle + 1000, env, None, routing)
                    try:
                        for phase, n, conc in (
                            ("storm", args.clients, 0),
                            ("trickle", args.trickle, args.trickle_conc),
                        ):
                            cfg = {
                                "proto": "phx",
                                "port": server.port,
                                "serverPids": server.pids,
                                "workload": "storm",
                                "base": 0,
                                "clients": n,
                                "hbMs": 100,  # no base clients: only the pauses around the storm
                                "topic": f"room:scale{phase[0]}{rep}",
                                "topicPerClient": True,
                                "stormConcurrency": conc,
                            }
                            result[phase] = R.run_loadgen(cfg, None, 240)
                    finally:
                        server.stop()
                    result["redis"] = setup.shard_stats()[0]
                except Exception as exc:
                    result["error"] = f"{type(exc).__name__}: {exc}"
                results[routing].append(result)
    lines = [
        f"gunicorn -w {args.workers} + Redis, the example app; every client joins its own topic "
        f"(`room:scale...:<i>`), so every join subscribes a new topic on its worker. Storm: {args.clients} "
        f"clients connect and join at once; trickle: {args.trickle} clients, {args.trickle_conc} at a time. "
        "Join = connect start to join reply; phx_join->reply = the join message alone (ms). Medians over "
        "repetitions, min-max in brackets.",
        "",
        "| routing | storm: joined | storm: s until all joined | storm join p50 | storm join p99 "
        "| server us/join (storm) "
        "| storm phx_join->reply p99 | trickle join p50 | trickle join p99 | trickle phx_join->reply p50 "
        "| trickle phx_join->reply p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for routing in routings:
        runs = [r for r in results[routing] if "error" not in r]

        def s(path: str, digits: int = 1, runs: list[dict[str, Any]] = runs) -> str:
            return R.fmt_summary(R.summary([R.dig(r, path) for r in runs]), digits)

        lines.append(
            f"| {routing} | {s('storm.joined', 0)} | {s('storm.stormSeconds', 2)} | {s('storm.joinMs.p50')} "
            f"| {s('storm.joinMs.p99')} | {s('storm.serverUsPerJoin', 0)} | {s('storm.joinOnlyMs.p99')} "
            f"| {s('trickle.joinMs.p50', 2)} | {s('trickle.joinMs.p99', 2)} | {s('trickle.joinOnlyMs.p50', 2)} "
            f"| {s('trickle.joinOnlyMs.p99', 2)} |"
        )
    lines.append("")
    for routing in routings:
        for i, r in enumerate(results[routing]):
            if "error" in r:
                lines.append(f"- {routing} rep {i + 1}: failed: {r['error']}")
            elif "redis" in r:
                cmds = r["redis"]["commands"]
                lines.append(
                    f"- {routing} rep {i + 1}: Redis saw {cmds.get('subscribe', 0):,} SUBSCRIBE and "
                    f"{cmds.get('unsubscribe', 0):,} UNSUBSCRIBE commands for {args.clients + args.trickle:,} joins "
                    f"(plus as many socket id topics), {r['redis']['total_commands']:,} commands in all"
                )
    save(args.name or f"scale-joins-{args.clients}", args, results, "### Join latency\n\n" + "\n".join(lines))


# -- one Redis's PUBLISH capacity ----------------------------------------------------------------------


def cmd_redis(args: argparse.Namespace) -> None:
    """PUBLISH/s one redis-server answers (redis-benchmark, pipelined) with 0, 1, ... subscribers per channel."""
    bench = shutil.which("redis-benchmark")
    if bench is None:
        raise SystemExit("redis-benchmark is not installed (it comes with redis-server)")
    payload = "x" * args.size
    rows = []
    for rep in range(args.reps):
        for subs in [int(x) for x in args.subscribers.split(",")]:
            with ExitStack() as stack:
                setup = stack.enter_context(redis_setup("single"))
                port = setup.ports[0]
                readers = []
                for _ in range(subs):
                    # A subscriber that reads everything (to /dev/null), as a node's listener does.
                    cli = subprocess.Popen(
                        ["redis-cli", "-p", str(port), "SUBSCRIBE", "bench:t:{room:1}"],
                        stdout=subprocess.DEVNULL,
                    )
                    stack.callback(cli.kill)
                    readers.append(cli)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    numsub = setup.client(port).execute_command("PUBSUB", "NUMSUB", "bench:t:{room:1}")
                    if int(numsub[1]) >= subs:
                        break
                    time.sleep(0.05)
                cpu0 = setup.shard_stats()[0]["cpu"]
                cmd = [bench, "-p", str(port), "-n", str(args.n), "-P", str(args.pipeline), "-c", str(args.clients)]
                cmd += ["-q", "PUBLISH", "bench:t:{room:1}", payload]
                t0 = time.monotonic()
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout
                seconds = time.monotonic() - t0
                cpu = setup.shard_stats()[0]["cpu"] - cpu0
                m = re.search(r"([\d.]+) requests per second", out)
                rows.append(
                    {
                        "rep": rep,
                        "subscribers": subs,
                        "publish_per_s": float(m.group(1)) if m else None,
                        "seconds": seconds,
                        "redis_cpu": cpu,
                        "us_cpu_per_publish": cpu * 1e6 / args.n,
                        "load": os.getloadavg()[0],
                    }
                )
                R.say(f"rep {rep + 1}: {subs} subscriber(s): {rows[-1]['publish_per_s']} PUBLISH/s")
    lines = [
        f"One redis-server, `redis-benchmark -n {args.n} -P {args.pipeline} -c {args.clients} PUBLISH "
        f"<channel> <{args.size} bytes>`, with 0, 1, ... `redis-cli SUBSCRIBE` readers on the channel "
        f"(each PUBLISH is then written to each of them). {args.reps} interleaved repetitions; medians "
        "(min-max). Not pinned; the machine was shared (load below).",
        "",
        "| subscribers per channel | PUBLISH/s | envelopes out/s | Redis CPU us per PUBLISH |",
        "|---|---|---|---|",
    ]
    for subs in [int(x) for x in args.subscribers.split(",")]:
        mine = [r for r in rows if r["subscribers"] == subs and r["publish_per_s"]]
        rate = R.summary([r["publish_per_s"] for r in mine])
        us = R.summary([r["us_cpu_per_publish"] for r in mine])
        out_rate = R.summary([r["publish_per_s"] * subs for r in mine]) if subs else None
        lines.append(f"| {subs} | {R.fmt_summary(rate, 0)} | {R.fmt_summary(out_rate, 0)} | {R.fmt_summary(us, 2)} |")
    lines.append("")
    lines.append("Load average (1 min) after each run: " + ", ".join(f"{r['load']:.1f}" for r in rows))
    save(args.name or "scale-redis-publish", args, rows, "### One Redis: PUBLISH capacity\n\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser, reps: int) -> None:
        p.add_argument("--reps", type=int, default=reps)
        p.add_argument("--out", default=str(R.RESULTS), help="results directory ('' to only print)")
        p.add_argument("--name", help="results file name")
        p.add_argument("--max-wait", type=float, default=30.0, help="longest wait for a quiet machine (0: none)")

    p = sub.add_parser("nodes", help="many nodes, thousands of topics: received vs local interest, per shard")
    common(p, 2)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--users", type=int, default=16000)
    p.add_argument("--overlap", type=float, default=0.2, help="share of users also subscribed on a second node")
    p.add_argument("--shared", type=int, default=4, help="topics every node subscribes to")
    p.add_argument("--shared-share", type=float, default=0.05, help="share of broadcasts to the shared topics")
    p.add_argument("--rate", type=float, default=2000.0, help="broadcasts/s cluster-wide")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--drain", type=float, default=30.0, help="longest wait for the nodes to deliver")
    p.add_argument("--idle", type=float, default=3.0, help="seconds of the idle CPU measurement before publishing")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--variant", action="append", help="LABEL=ROUTING@REDIS (default broadcast@single, topic@single)")
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("joins", help="join latency with per-topic subscriptions, phoenix V2 clients")
    common(p, 2)
    p.add_argument("--routings", default="broadcast,topic")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--clients", type=int, default=2000, help="clients of the storm (all at once)")
    p.add_argument("--trickle", type=int, default=500, help="clients of the trickle phase")
    p.add_argument("--trickle-conc", type=int, default=5, help="joins in flight in the trickle phase")
    p.set_defaults(func=cmd_joins)

    p = sub.add_parser("redis", help="PUBLISH/s of one redis-server with 0, 1, ... subscribers per channel")
    common(p, 3)
    p.add_argument("--subscribers", default="0,1,8", help="subscribers per channel, comma-separated")
    p.add_argument("--n", type=int, default=300000, help="PUBLISH commands per run")
    p.add_argument("--pipeline", type=int, default=32)
    p.add_argument("--clients", type=int, default=8, help="redis-benchmark connections")
    p.add_argument("--size", type=int, default=170, help="message bytes (an envelope is ~170)")
    p.set_defaults(func=cmd_redis)

    p = sub.add_parser("publish", help=argparse.SUPPRESS)
    p.add_argument("--url", required=True)
    p.add_argument("--prefix", default="scale")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--shared", type=int, default=0)
    p.add_argument("--shared-share", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=13)
    p.set_defaults(func=cmd_publish)

    args = parser.parse_args(argv)
    if getattr(args, "out", None) == "":
        args.out = None
    args.func(args)


if __name__ == "__main__":
    main()
