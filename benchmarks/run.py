#!/usr/bin/env python3
"""Run the benchmarks of issue 5: phx_gevent, Flask-SocketIO and the raw reference side by side.

One command per workload (see benchmarks/README.md)::

    .venv/bin/python benchmarks/run.py fanout --subs 1000
    .venv/bin/python benchmarks/run.py fanout --subs 5000
    .venv/bin/python benchmarks/run.py pushreply --clients 1000
    .venv/bin/python benchmarks/run.py conns --conns 5000
    .venv/bin/python benchmarks/run.py maxconn --conns 10000
    .venv/bin/python benchmarks/run.py workers --subs 1000

Each repetition starts a fresh server per contender, in interleaved order
(A B C A B C ...), with the server pinned to core 0 and the Node load
generator to core 1 (``taskset``; ``--no-pin`` turns that off, ``workers``
never pins). Results: medians with min-max spread, and ratios of phx_gevent
to the others, printed as Markdown and saved under ``benchmarks/results/``
(the full JSON of every run under ``benchmarks/results/raw/``).

``--variant LABEL=KIND[:ENV=VALUE,...]`` replaces the default contenders,
e.g. to compare tunables of phx_gevent in one interleaved run::

    benchmarks/run.py fanout --subs 1000 --variant direct=phx:PHX_DIRECT_SEND=1 \\
        --variant coalesce=phx:PHX_DIRECT_SEND=0

Uses only the standard library; loopback only; every step has a deadline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVERS = HERE / "servers"
LOADGEN = HERE / "client" / "loadgen.mjs"
RESULTS = HERE / "results"
PYTHON = sys.executable

KINDS = {
    "phx": SERVERS / "phx_server.py",
    "sio": SERVERS / "sio_server.py",
    "raw": SERVERS / "raw_server.py",
    "node": SERVERS / "ws_server.mjs",
    "fastapi": SERVERS / "fastapi_server.py",
}
# The load generator's protocol for each server kind (node and fastapi speak raw's Phoenix V2 subset).
PROTO = {"phx": "phx", "raw": "raw", "sio": "sio", "gunicorn": "phx", "node": "raw", "fastapi": "raw"}
NAMES = {
    "phx": "phx_gevent",
    "sio": "Flask-SocketIO",
    "raw": "raw one-write-per-connection",
    "node": "Node.js ws",
    "fastapi": "FastAPI/uvicorn",
}
SERVER_CORE = "0"
#: Longest wait for the machine to be quiet before each run (``--max-wait``).
MAX_QUIET_WAIT = 60.0
#: Rotate the contenders' order every repetition (``--rotate``).
ROTATE = False
CLIENT_CORE = "1"


def say(msg: str) -> None:
    print(f"[run] {msg}", file=sys.stderr, flush=True)


# -- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile(needed: int) -> str:
    """Raise RLIMIT_NOFILE for this process and its children; say what happened."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return f"fd limit {soft} already >= {needed}"
    try:
        if hard < needed:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        else:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return f"fd limit raised from {soft} to {needed}"
    except (ValueError, OSError) as exc:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
        return f"cannot raise the fd limit to {needed} ({exc}); using {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}"


def pinned(cmd: list[str], core: str | None) -> list[str]:
    if core is None or shutil.which("taskset") is None:
        return cmd
    return ["taskset", "-c", core, *cmd]


class Server:
    """One server under test (a subprocess); ``pids`` are the processes whose CPU/RSS count."""

    def __init__(self, proc: subprocess.Popen, port: int, pids: list[int], label: str) -> None:
        self.proc = proc
        self.port = port
        self.pids = pids
        self.label = label

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_script_server(kind: str, env: dict[str, str], core: str | None, label: str) -> Server:
    """Start benchmarks/servers/<kind>_server.py; wait for its LISTENING line (30 s)."""
    script = KINDS[kind]
    interpreter = "node" if script.suffix == ".mjs" else PYTHON
    cmd = pinned([interpreter, str(script), "--port", "0"], core)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=None, env={**os.environ, **env}, text=True)
    deadline = time.monotonic() + 30
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("LISTENING "):
            return Server(proc, int(line.split()[1]), [proc.pid], label)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start (exit code {proc.poll()})")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def start_gunicorn(
    workers: int,
    worker_connections: int,
    env: dict[str, str],
    core: str | None,
    label: str,
    extra_args: tuple[str, ...] = (),
) -> Server:
    """gunicorn with phx_gevent's worker serving app_example:app; waits until every worker answers."""
    port = free_port()
    cmd = pinned(
        [
            PYTHON,
            "-m",
            "gunicorn",
            "-k",
            "phx_gevent.worker.GeventWebSocketWorker",
            "-w",
            str(workers),
            "--worker-connections",
            str(worker_connections),
            "--no-control-socket",
            "--graceful-timeout",
            "2",
            "--log-level",
            "warning",
            "-b",
            f"127.0.0.1:{port}",
            *extra_args,
            env.get("APP", "app_example:app"),
        ],
        core,
    )
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    pids: list[int] = []
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}")
        pids = children(proc.pid)
        if len(pids) == workers:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
        time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("gunicorn did not come up in 30 s")
    time.sleep(0.5)  # every worker has booted its app (they are forked after the master is ready)
    return Server(proc, port, children(proc.pid), label)


@contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on a free loopback port (never the system one)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="phx-bench-redis-")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not start")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


def run_loadgen(cfg: dict[str, Any], core: str | None, timeout: float) -> dict[str, Any]:
    """Run the Node load generator with ``cfg``; its JSON result (``{"error": ...}`` on failure)."""
    cfg = {"clkTck": os.sysconf("SC_CLK_TCK"), "maxSeconds": int(timeout), **cfg}
    cmd = pinned(["node", str(LOADGEN), json.dumps(cfg)], core)
    try:
        out = subprocess.run(
            cmd, cwd=HERE, stdout=subprocess.PIPE, timeout=timeout + 15, text=True, env={**os.environ}
        ).stdout
    except subprocess.TimeoutExpired:
        return {"error": "load generator timed out"}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": "load generator printed no result"}
    return json.loads(lines[-1])


# -- statistics -------------------------------------------------------------------------------


def dig(result: dict[str, Any], path: str) -> float | None:
    value: Any = result
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, (int, float)) else None


def summary(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100000:
        return f"{value / 1000:,.0f}k"
    if abs(value) >= 10000:
        return f"{value / 1000:.1f}k"
    return f"{value:,.{digits}f}"


def fmt_summary(s: dict[str, float] | None, digits: int = 1) -> str:
    if s is None:
        return "-"
    if s["n"] == 1 or s["min"] == s["max"]:
        return fmt(s["median"], digits)
    return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)}-{fmt(s['max'], digits)})"


# -- the interleaved runner ---------------------------------------------------------------------


class Contender:
    def __init__(self, label: str, kind: str, env: dict[str, str]) -> None:
        self.label = label
        self.kind = kind
        self.env = env


def parse_contenders(args: argparse.Namespace) -> list[Contender]:
    if args.variant:
        out = []
        for spec in args.variant:
            label, _, rest = spec.partition("=")
            kind, _, envspec = rest.partition(":")
            env = dict(item.split("=", 1) for item in envspec.split(",") if item)
            if kind not in KINDS:
                raise SystemExit(f"unknown server kind {kind!r} in --variant {spec!r}")
            out.append(Contender(label, kind, env))
        return out
    return [Contender(name, name, {}) for name in args.servers.split(",")]


def check_peers(contenders: list[Contender]) -> None:
    if any(c.kind == "sio" for c in contenders):
        probe = subprocess.run([PYTHON, "-c", "import flask_socketio"], capture_output=True)
        if probe.returncode != 0:
            raise SystemExit("Flask-SocketIO is missing: .venv/bin/pip install -r benchmarks/requirements.txt")
        if not (HERE / "node_modules" / "socket.io-client").exists():
            raise SystemExit("socket.io-client is missing: (cd benchmarks && npm ci)")
    if any(c.kind == "fastapi" for c in contenders):
        imports = "import fastapi, uvicorn, uvloop, httptools, websockets"
        probe = subprocess.run([PYTHON, "-c", imports], capture_output=True)
        if probe.returncode != 0:
            raise SystemExit("FastAPI/uvicorn is missing: .venv/bin/pip install -r benchmarks/requirements.txt")
    # Node resolves `ws` from benchmarks/node_modules or the project's own node_modules.
    has_ws = (HERE / "node_modules" / "ws").exists() or (ROOT / "node_modules" / "ws").exists()
    if any(c.kind == "node" for c in contenders) and not has_ws:
        raise SystemExit("ws is missing: (cd benchmarks && npm ci)")


def machine_busy(seconds: float = 1.0) -> float:
    """Cores busy (not idle) over ``seconds``, from /proc/stat: the other engineers' load."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields[:8]), idle

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    total = max(1, t1 - t0)
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / total)


def wait_quiet(limit: float = 0.3, max_wait: float = 60.0) -> float:
    """Wait (at most ``max_wait`` s) until other processes use under ``limit`` cores; return the last reading."""
    deadline = time.monotonic() + max_wait
    busy = machine_busy()
    while busy > limit and time.monotonic() < deadline:
        say(f"machine busy ({busy:.2f} cores used by others): waiting")
        busy = machine_busy(2.0)
    return busy


def interleaved(
    contenders: list[Contender],
    reps: int,
    one_run: Callable[[Contender, int], dict[str, Any]],
) -> dict[str, list[dict[str, Any]]]:
    """Run ``one_run`` for A B C A B C ...; results per label in rep order."""
    results: dict[str, list[dict[str, Any]]] = {c.label: [] for c in contenders}
    for rep in range(reps):
        # --rotate: A B C, then B C A, ...: no contender always runs right after the same other one.
        shift = rep % len(contenders) if ROTATE else 0
        for c in contenders[shift:] + contenders[:shift]:
            busy = wait_quiet(max_wait=MAX_QUIET_WAIT)
            say(f"rep {rep + 1}/{reps}: {c.label}")
            t0 = time.monotonic()
            try:
                result = one_run(c, rep)
            except Exception as exc:  # a failed run is reported, the others go on
                result = {"error": f"{type(exc).__name__}: {exc}"}
            result["seconds"] = round(time.monotonic() - t0, 1)
            result["busyBefore"] = round(busy, 2)
            if "error" in result:
                say(f"  {c.label} failed: {result['error']}")
            results[c.label].append(result)
    return results


def table(
    contenders: list[Contender],
    results: dict[str, list[dict[str, Any]]],
    metrics: list[tuple[str, str, int]],
    ratio_metrics: list[tuple[str, str]],
) -> str:
    """Markdown: a row per contender (medians with spread), then the ratios of the first to the others."""
    head = "| server | " + " | ".join(name for name, _, _ in metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 1)]
    for c in contenders:
        runs = [r for r in results[c.label] if "error" not in r]
        cells = [fmt_summary(summary([dig(r, path) for r in runs]), digits) for _, path, digits in metrics]
        failed = len(results[c.label]) - len(runs)
        label = NAMES.get(c.label, c.label) + (f" ({failed} failed)" if failed else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if len(contenders) > 1 and ratio_metrics:
        base = contenders[0]
        lines.append("")
        lines.append(
            f"Ratios of {NAMES.get(base.label, base.label)} to each other contender: ratio of the medians, "
            "and in brackets the range of the per-repetition ratios (runs next to each other)."
        )
        lines.append("")
        lines.append("| ratio | " + " | ".join(name for name, _ in ratio_metrics) + " |")
        lines.append("|" + "---|" * (len(ratio_metrics) + 1))
        for other in contenders[1:]:
            cells = []
            for _, path in ratio_metrics:
                a = summary([dig(r, path) for r in results[base.label] if "error" not in r])
                b = summary([dig(r, path) for r in results[other.label] if "error" not in r])
                if a is None or b is None or not b["median"]:
                    cells.append("-")
                    continue
                pairs = [
                    dig(x, path) / dig(y, path)
                    for x, y in zip(results[base.label], results[other.label], strict=False)
                    if dig(x, path) is not None and dig(y, path)
                ]
                text = f"{a['median'] / b['median']:.2f}x"
                if len(pairs) > 1:
                    text += f" ({min(pairs):.2f}-{max(pairs):.2f})"
                cells.append(text)
            lines.append(f"| {base.label} / {other.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def git_head() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def save(name: str, args: argparse.Namespace, results: dict[str, Any], markdown: str) -> None:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    pinning = f"server pinned to core {SERVER_CORE}, clients to core {CLIENT_CORE}" if args.pin else "no core pinning"
    header = (
        f"<!-- {name}: {' '.join(sys.argv[1:])} -->\n"
        f"Measured {stamp} at commit {git_head()}; {os.cpu_count()} cores; "
        f"{pinning}; "
        f"{args.reps} interleaved repetitions.\n\n"
    )
    text = header + markdown + "\n"
    print(text)
    if args.out is None:
        return
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    raw = {"name": name, "argv": sys.argv[1:], "date": stamp, "commit": git_head(), "results": results}
    (out / "raw" / f"{name}-{stamp.replace(':', '')}.json").write_text(json.dumps(raw, indent=1))


# -- workloads ----------------------------------------------------------------------------------


def with_server(c: Contender, args: argparse.Namespace, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    server = start_script_server(c.kind, c.env, SERVER_CORE if args.pin else None, c.label)
    try:
        cfg = {"proto": PROTO[c.kind], "port": server.port, "serverPids": server.pids, **cfg}
        if c.env.get("SIO_KEEPALIVE") == "1":
            # socket.io-client's polling under Node opens a connection per request (xmlhttprequest-ssl
            # without an agent); a browser keeps them alive. This variant gives it a keep-alive agent.
            cfg["sioKeepAlive"] = True
        return run_loadgen(cfg, CLIENT_CORE if args.pin else None, timeout)
    finally:
        server.stop()


def fanout_cfg(args: argparse.Namespace, subs: int) -> dict[str, Any]:
    return {
        "workload": "fanout",
        "subs": subs,
        "rate": args.rate,
        "latSeconds": args.lat_seconds,
        "satSeconds": args.sat_seconds,
        "warmSeconds": args.warm_seconds,
        "concurrency": args.concurrency,
        "drainSeconds": args.drain_seconds,
        "heartbeatMs": 30000,
        "joinPayload": args.join_payload,
        # Long-poll clients (phx: phoenix.js's LongPoll protocol; sio: Socket.IO's polling transport).
        "longpoll": bool(getattr(args, "longpoll", False)),
    }


FANOUT_METRICS = [
    ("delivered msgs/s", "saturation.deliveredPerSec", 0),
    ("server us/delivery", "saturation.serverUsPerDelivery", 2),
    ("p50 ms (20/s)", "latency.ms.p50", 1),
    ("p99 ms (20/s)", "latency.ms.p99", 1),
    ("accepted x subs / delivered", "saturation.acceptedOverDelivered", 2),
    ("drain s after stop", "saturation.drainSeconds", 2),
    ("server RSS max MB", "saturation.rssMaxMb", 0),
    ("server CPU", "saturation.serverCpu", 2),
    ("client CPU", "saturation.clientCpu", 2),
    ("others' CPU", "saturation.otherCpu", 2),
]


def fanout_extra(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    for label, runs in results.items():
        for i, r in enumerate(runs):
            if "error" in r:
                lines.append(f"- {label} rep {i + 1}: FAILED: {r['error']}")
                continue
            sat = r.get("saturation", {})
            lat = r.get("latency", {})
            notes = []
            if not sat.get("complete"):
                notes.append(f"saturation INCOMPLETE: {sat.get('missing')} deliveries missing after the drain")
            if not lat.get("complete"):
                notes.append("latency phase incomplete")
            if sat.get("clientSaturated"):
                notes.append(f"client saturated ({sat.get('clientCpu', 0):.0%} CPU)")
            other = max(lat.get("otherCpu") or 0, sat.get("otherCpu") or 0)
            if other > 0.15:
                notes.append(f"disturbed: other processes used {other:.2f} cores")
            if r.get("closes") or r.get("errors"):
                notes.append(f"{r.get('closes')} closes, {r.get('errors')} errors")
            if r.get("open", {}).get("failed"):
                notes.append(f"{r['open']['failed']} connections failed to open")
            if notes:
                lines.append(f"- {label} rep {i + 1}: " + "; ".join(notes))
    return "\n".join(lines)


def mb(results: dict[str, list[dict[str, Any]]]) -> None:
    # RSS in MB for the tables.
    for runs in results.values():
        for r in runs:
            sat = r.get("saturation")
            if sat and "rssMaxKb" in sat:
                sat["rssMaxMb"] = sat["rssMaxKb"] / 1024


def cmd_fanout(args: argparse.Namespace) -> None:
    contenders = parse_contenders(args)
    check_peers(contenders)
    timeout = 120 + args.lat_seconds + args.sat_seconds + 2 * args.drain_seconds
    cfg = fanout_cfg(args, args.subs)
    if args.longpoll and any(c.kind not in ("phx", "sio") for c in contenders):
        raise SystemExit("--longpoll: only phx and sio have a long-poll transport")
    results = interleaved(contenders, args.reps, lambda c, rep: with_server(c, args, cfg, timeout))
    mb(results)
    metrics = FANOUT_METRICS
    if args.longpoll:
        # Poll responses per second (all clients) and the broadcasts one carried, in the saturation window.
        metrics = [
            *FANOUT_METRICS,
            ("polls/s", "saturation.pollsPerSec", 0),
            ("msgs per poll", "saturation.msgsPerPoll", 1),
        ]
    md = table(
        contenders,
        results,
        metrics,
        [
            ("delivered msgs/s", "saturation.deliveredPerSec"),
            ("server us/delivery", "saturation.serverUsPerDelivery"),
            ("p50 (20/s)", "latency.ms.p50"),
            ("p99 (20/s)", "latency.ms.p99"),
        ],
    )
    extra = fanout_extra(results)
    kind = "long-poll subscribers" if args.longpoll else "subscribers"
    title = f"Fan-out, {args.subs} {kind}"
    default_name = f"longpoll-fanout-{args.subs}" if args.longpoll else f"fanout-{args.subs}"
    save(args.name or default_name, args, results, f"### {title}\n\n{md}\n\n{extra}".rstrip())


def cmd_pushreply(args: argparse.Namespace) -> None:
    contenders = parse_contenders(args)
    check_peers(contenders)
    cfg = {"workload": "pushreply", "clients": args.clients, "seconds": args.seconds, "warmSeconds": args.warm_seconds}
    results = interleaved(contenders, args.reps, lambda c, rep: with_server(c, args, cfg, 120 + args.seconds))
    md = table(
        contenders,
        results,
        [
            ("replies/s", "repliesPerSec", 0),
            ("RTT p50 ms", "rttMs.p50", 1),
            ("RTT p99 ms", "rttMs.p99", 1),
            ("server us/reply", "serverUsPerReply", 1),
            ("server CPU", "serverCpu", 2),
            ("client CPU", "clientCpu", 2),
            ("failures", "failures", 0),
        ],
        [("replies/s", "repliesPerSec"), ("RTT p50", "rttMs.p50"), ("RTT p99", "rttMs.p99")],
    )
    save(args.name or f"pushreply-{args.clients}", args, results, f"### Push and reply, {args.clients} clients\n\n{md}")


def cmd_conns(args: argparse.Namespace) -> None:
    contenders = parse_contenders(args)
    check_peers(contenders)
    note = raise_nofile(args.conns + 1000)
    say(note)
    cfg = {
        "workload": "conns",
        "conns": args.conns,
        "settleSeconds": args.settle_seconds,
        "holdSeconds": 0,
        "openConcurrency": 50,
    }
    results = interleaved(contenders, args.reps, lambda c, rep: with_server(c, args, cfg, 300))
    md = table(
        contenders,
        results,
        [
            ("KB/conn idle", "kbPerConnIdle", 1),
            ("KB/conn joined", "kbPerConnJoined", 1),
            ("opened", "open.opened", 0),
            ("open s", "open.seconds", 1),
        ],
        [("KB/conn idle", "kbPerConnIdle"), ("KB/conn joined", "kbPerConnJoined")],
    )
    # The target compares phx_gevent joined with the raw *idle* websocket.
    extra = ""
    phx = summary([dig(r, "kbPerConnJoined") for r in results.get("phx", []) if "error" not in r])
    raw = summary([dig(r, "kbPerConnIdle") for r in results.get("raw", []) if "error" not in r])
    sio = summary([dig(r, "kbPerConnJoined") for r in results.get("sio", []) if "error" not in r])
    node = summary([dig(r, "kbPerConnJoined") for r in results.get("node", []) if "error" not in r])
    if phx and node:
        extra += f"\nphx_gevent joined / Node.js ws joined: {phx['median'] / node['median']:.2f}x (target <= 1.0x)"
    if phx and raw:
        extra += f"\nphx_gevent joined / raw idle: {phx['median'] / raw['median']:.2f}x (target <= 1.8x)"
    if phx and sio:
        extra += f"\nphx_gevent joined / Flask-SocketIO joined: {phx['median'] / sio['median']:.2f}x (target <= 0.7x)"
    title = f"Memory per connection, {args.conns} connections (server RSS delta / connections)"
    save(args.name or f"conns-{args.conns}", args, results, f"### {title}\n\n{md}\n{extra}\n\n{note}")


def cmd_storm(args: argparse.Namespace) -> None:
    contenders = parse_contenders(args)
    check_peers(contenders)
    if any(c.kind == "sio" for c in contenders):
        raise SystemExit("storm speaks Phoenix V2 only: phx, raw, node, fastapi")
    for c in contenders:
        if c.kind == "phx":
            c.env.setdefault("PHX_HISTORY", "0")  # plain topics: no history, no Redis
    note = raise_nofile(args.base + args.clients + 1000)
    say(note)
    cfg = {"workload": "storm", "base": args.base, "clients": args.clients, "hbMs": args.hb_ms, "topic": "room:storm"}
    results = interleaved(contenders, args.reps, lambda c, rep: with_server(c, args, cfg, 240))
    md = table(
        contenders,
        results,
        [
            ("joined", "joined", 0),
            ("s until all joined", "stormSeconds", 2),
            ("connect+join /s", "joinsPerSec", 0),
            ("join p50 ms", "joinMs.p50", 0),
            ("join p99 ms", "joinMs.p99", 0),
            ("heartbeat p99 ms (base)", "hbRttMs.p99", 0),
            ("heartbeats missed", "hbMissed", 0),
            ("client loop delay p99 ms", "clientLoopDelayMs.p99", 0),
            ("server us/join", "serverUsPerJoin", 0),
            ("server CPU", "serverCpu", 2),
            ("client CPU", "clientCpu", 2),
        ],
        [
            ("connect+join /s", "joinsPerSec"),
            ("join p99", "joinMs.p99"),
            ("heartbeat p99", "hbRttMs.p99"),
            ("server us/join", "serverUsPerJoin"),
        ],
    )
    title = (
        f"Reconnect storm: {args.clients} clients connect and join at once, "
        f"{args.base} connected clients heartbeat every {args.hb_ms} ms"
    )
    save(args.name or f"storm-{args.clients}", args, results, f"### {title}\n\n{md}\n\n{note}")


def cmd_maxconn(args: argparse.Namespace) -> None:
    needed = args.conns + 1000
    note = raise_nofile(needed)
    say(note)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < needed:
        note += f"; the server can hold at most ~{soft - 100} connections"
    worker_connections = args.conns + 500
    note += f"; gunicorn --worker-connections {worker_connections}"
    hb = args.heartbeat_ms
    cfg = {
        "workload": "conns",
        "conns": args.conns,
        "settleSeconds": 2,
        "holdSeconds": args.hold_seconds,
        "heartbeatMs": hb,
        "openConcurrency": 50,
    }

    def one(c: Contender, rep: int) -> dict[str, Any]:
        server = start_gunicorn(1, worker_connections, {}, SERVER_CORE if args.pin else None, c.label)
        try:
            run_cfg = {"proto": "phx", "port": server.port, "serverPids": server.pids, **cfg}
            return run_loadgen(run_cfg, CLIENT_CORE if args.pin else None, 400 + args.hold_seconds)
        finally:
            server.stop()

    contenders = [Contender("phx", "phx", {})]
    results = interleaved(contenders, args.reps, one)
    md = table(
        contenders,
        results,
        [
            ("opened", "open.opened", 0),
            ("still open after hold", "hold.stillOpen", 0),
            ("heartbeat replies", "hold.heartbeatReplies", 0),
            ("heartbeats missed", "hold.heartbeatsMissed", 0),
            ("closes", "closes", 0),
            ("errors", "errors", 0),
            ("KB/conn joined", "kbPerConnJoined", 1),
            ("server CPU while holding", "hold.serverCpu", 2),
        ],
        [],
    )
    title = (
        f"Connections held by one gunicorn worker: {args.conns} joined connections, heartbeats every "
        f"{hb / 1000:g} s for {args.hold_seconds} s"
    )
    save(args.name or f"maxconn-{args.conns}", args, results, f"### {title}\n\n{md}\n\n{note}")


def cmd_presence(args: argparse.Namespace) -> None:
    """N users join one presence-tracked room on 2 gunicorn workers + Redis, then half leave."""
    args.pin = False  # two workers need both cores
    contenders = [Contender(f"{args.workers} workers + Redis", "gunicorn", {})]
    cfg = {"workload": "presence", "users": args.users, "presence": True, "joinPayload": '{"presence":true}'}
    cfg["topic"] = "room:presence"
    with redis_server() as url:

        def one(c: Contender, rep: int) -> dict[str, Any]:
            server = start_gunicorn(args.workers, args.users + 500, {"REDIS_URL": url}, None, c.label)
            try:
                run_cfg = {"proto": "phx", "port": server.port, "serverPids": server.pids, **cfg}
                return run_loadgen(run_cfg, None, 300)
            finally:
                server.stop()

        results = interleaved(contenders, args.reps, one)
    md = table(
        contenders,
        results,
        [
            ("joined", "open.opened", 0),
            ("s until all see all (joins)", "join.seconds", 2),
            ("presence frames (joins)", "join.frames", 0),
            ("KB (joins)", "join.kbytes", 0),
            ("server CPU s (joins)", "join.serverCpuSeconds", 2),
            ("left", "leave.left", 0),
            ("s until all see the leaves", "leave.seconds", 2),
            ("presence frames (leaves)", "leave.frames", 0),
            ("server CPU s (leaves)", "leave.serverCpuSeconds", 2),
        ],
        [],
    )
    title = f"Presence: {args.users} users join one tracked room, then half leave ({args.workers} workers + Redis)"
    save(args.name or f"presence-{args.users}", args, results, f"### {title}\n\n{md}")


def cmd_workers(args: argparse.Namespace) -> None:
    args.pin = False  # two workers need both cores
    if not (ROOT / "phx_gevent" / "pubsub" / "redis.py").exists():
        raise SystemExit("phx_gevent/pubsub/redis.py does not exist yet: the across-workers workload needs it")
    contenders = [
        Contender("1 worker", "gunicorn", {"WORKERS": "1"}),
        Contender("1 worker + Redis", "gunicorn", {"WORKERS": "1", "REDIS": "1"}),
        Contender("2 workers + Redis", "gunicorn", {"WORKERS": "2", "REDIS": "1"}),
    ]
    if args.history:
        # The cost of history under Redis: room:lobby without and with it (docs/recovery.md).
        nohist = {"APP": "benchmarks.servers.nohistory_app:app"}
        contenders = [
            Contender("2 workers + Redis, plain topic", "gunicorn", {"WORKERS": "2", "REDIS": "1", **nohist}),
            Contender("2 workers + Redis, history topic", "gunicorn", {"WORKERS": "2", "REDIS": "1"}),
        ]
    if args.routing:
        # Per-topic routing (the default) next to one channel for all: both workers hold the topic.
        contenders = [
            Contender("2 workers + Redis, topic routing", "gunicorn", {"WORKERS": "2", "REDIS": "1"}),
            Contender("2 workers + Redis, broadcast routing", "gunicorn", {"WORKERS": "2", "REDIS": "broadcast"}),
        ]
    timeout = 120 + args.lat_seconds + args.sat_seconds + 2 * args.drain_seconds

    with redis_server() as url:

        def one(c: Contender, rep: int) -> dict[str, Any]:
            env = {}
            if c.env.get("REDIS"):
                env["REDIS_URL"] = url + ("?routing=broadcast" if c.env["REDIS"] == "broadcast" else "")
            server = start_gunicorn(int(c.env["WORKERS"]), args.subs + 500, env, None, c.label)
            try:
                cfg = {"proto": "phx", "port": server.port, "serverPids": server.pids, **fanout_cfg(args, args.subs)}
                result = run_loadgen(cfg, None, timeout)
                result["workers"] = len(server.pids)
                return result
            finally:
                server.stop()

        results = interleaved(contenders, args.reps, one)
    mb(results)
    md = table(contenders, results, FANOUT_METRICS, [])
    split = []
    for label, runs in results.items():
        for i, r in enumerate(runs):
            if r.get("nodes"):
                split.append(f"- {label} rep {i + 1}: subscribers per worker {sorted(r['nodes'].values())}")
    title = f"Across workers, {args.subs} subscribers (gunicorn, no core pinning)"
    body = f"### {title}\n\n{md}\n\n{fanout_extra(results)}\n" + "\n".join(split)
    save(args.name or f"workers-{args.subs}", args, results, body.rstrip())


# -- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser, reps: int = 3) -> None:
        p.add_argument("--reps", type=int, default=reps, help="interleaved repetitions (default %(default)s)")
        p.add_argument(
            "--servers",
            default="phx,node,fastapi,raw,sio",
            help="contenders, comma-separated: phx, node, fastapi, raw, sio (the first is the base of the ratios)",
        )
        p.add_argument("--variant", action="append", help="LABEL=KIND[:ENV=VALUE,...] (replaces --servers)")
        p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin server/clients to cores")
        p.add_argument("--out", default=str(RESULTS), help="results directory ('' to only print)")
        p.add_argument("--name", help="results file name (default: workload-size)")
        p.add_argument(
            "--max-wait", type=float, default=60.0, help="longest wait for other processes to go quiet before a run"
        )
        p.add_argument(
            "--rotate", action="store_true", help="rotate the contenders' order every repetition (A B C, B C A, ...)"
        )

    def fanout_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--subs", type=int, default=1000)
        p.add_argument("--rate", type=float, default=20.0, help="broadcasts/s of the latency phase")
        p.add_argument("--lat-seconds", type=float, default=6.0)
        p.add_argument("--sat-seconds", type=float, default=8.0)
        p.add_argument("--warm-seconds", type=float, default=2.0)
        p.add_argument("--drain-seconds", type=float, default=20.0, help="longest wait for the backlog")
        p.add_argument("--concurrency", type=int, default=32, help="concurrent POST /broadcast producers")
        p.add_argument(
            "--join-payload", default="{}", help="JSON join payload of the phx subscribers (e.g. '{\"since\":null}')"
        )

    p = sub.add_parser("fanout", help="workload 1: broadcast fan-out latency and saturation")
    common(p)
    fanout_opts(p)
    p.add_argument("--longpoll", action="store_true", help="long-poll subscribers (phx and sio only)")
    p.set_defaults(func=cmd_fanout)

    p = sub.add_parser("pushreply", help="workload 2: push and reply")
    common(p)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--warm-seconds", type=float, default=2.0)
    p.set_defaults(func=cmd_pushreply)

    p = sub.add_parser("conns", help="workload 3a: memory per connection, idle and joined")
    common(p, reps=2)
    p.add_argument("--conns", type=int, default=5000)
    p.add_argument("--settle-seconds", type=float, default=2.0, help="pause before each RSS reading")
    p.set_defaults(func=cmd_conns)

    p = sub.add_parser("maxconn", help="workload 3b: connections one gunicorn worker holds with heartbeats")
    common(p, reps=1)
    p.add_argument("--conns", type=int, default=10000)
    p.add_argument("--hold-seconds", type=int, default=20)
    p.add_argument("--heartbeat-ms", type=int, default=5000, help="phoenix.js uses 30000; shorter so some flow")
    p.set_defaults(func=cmd_maxconn)

    p = sub.add_parser("storm", help="workload 5: N clients connect and join at once while others heartbeat")
    common(p, reps=2)
    p.add_argument("--clients", type=int, default=10000, help="clients of the storm")
    p.add_argument("--base", type=int, default=1000, help="clients connected before, heartbeating")
    p.add_argument("--hb-ms", type=int, default=1000, help="heartbeat interval of the base clients")
    p.set_defaults(func=cmd_storm)

    p = sub.add_parser("presence", help="presence at scale: N users join a tracked room, then half leave")
    common(p, reps=1)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_presence)

    p = sub.add_parser("workers", help="workload 4: 2 gunicorn workers + Redis next to one worker")
    common(p, reps=2)
    fanout_opts(p)
    p.add_argument("--history", action="store_true", help="compare room:lobby without and with history (2 workers)")
    p.add_argument(
        "--routing", action="store_true", help="compare the Redis adapter's topic and broadcast routings (2 workers)"
    )
    p.set_defaults(func=cmd_workers)

    args = parser.parse_args(argv)
    global MAX_QUIET_WAIT, ROTATE
    MAX_QUIET_WAIT = args.max_wait
    ROTATE = args.rotate
    if args.out == "":
        args.out = None
    if shutil.which("node") is None:
        raise SystemExit("node is not installed")
    args.func(args)


if __name__ == "__main__":
    main()
