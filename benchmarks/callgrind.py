#!/usr/bin/env python3
"""Server instructions per push/reply or per broadcast, counted by valgrind (repeatable on a busy machine).

    .venv/bin/python benchmarks/callgrind.py pushreply --tree new=. --tree old=/tmp/phx-old
    .venv/bin/python benchmarks/callgrind.py fanout --subs 1000 --tree default=. \\
        --tree plain=.:PHX_HISTORY=0,PHX_OBSERVE=0

Timing a server on a shared two-core machine measures the neighbours as much as
the code. Instructions do not depend on them: ``valgrind --tool=callgrind``
counts every instruction the server process executes. Each tree
(``LABEL=ROOT[:ENV=VALUE,...]``, served by ``servers/phx_server.py`` with
``PHX_ROOT=ROOT``, i.e. the example app of that tree) runs twice under
callgrind, once with ``--small`` and once with ``--large`` operations; the
difference of the two totals divided by the difference of the operation counts
is the cost of one operation, with start-up, connecting and joining cancelled
out. The client (this process, plain blocking sockets) waits for each answer
before the next operation, so no batching depends on timing.

``pushreply``: ``--clients`` connections joined to ``room:lobby``; one
operation is a ``ping`` push from each client in turn, each answered (the
example channel replies with the payload) before the next.
``fanout``: ``--subs`` subscribers of ``room:lobby``; one operation is one
``POST /broadcast`` of a ~100-byte ``new_msg`` and its delivery to every
subscriber.

Work done per second of wall time is not per operation: valgrind slows the
server ~50x, by an amount that varies from run to run. So the observability
sampler's ticks are moved out of the measurement (``PHX_OBSERVE_INTERVAL``;
``--interval`` to keep them), the WebSocket sweeper's pass over every
connection is a no-op (``PHX_NO_SWEEP=1``) and the idle timeout is off;
``PYTHONHASHSEED=0`` keeps dict layouts alike between runs. Repeated runs of one tree agree within
0.1% (push/reply: 158,212 / 158,411 / 158,524); a change in the server's settings (these
variables) moves the count by ~1%, so compare trees within one invocation only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from wsupgrade import upgrade

HERE = Path(__file__).resolve().parent
SERVER = HERE / "servers" / "phx_server.py"
PAYLOAD = {"t": 1, "s": 2, "p": "x" * 40}


def ws_connect(port: int, user: str) -> socket.socket:
    """A WebSocket to the example app's ``/socket`` (Phoenix V2 JSON), after the 101."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=600)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return upgrade(sock, port, user)


class Client:
    """One Phoenix V2 client on a blocking socket: send a message, read frames until a predicate holds."""

    def __init__(self, port: int, user: str) -> None:
        self.sock = ws_connect(port, user)
        self.buf = b""
        self.ref = 0

    def send(self, topic: str, event: str, payload: object) -> str:
        self.ref += 1
        ref = str(self.ref)
        data = json.dumps(["1", ref, topic, event, payload]).encode()
        n = len(data)
        head = struct.pack("!BB", 0x81, 0x80 | n) if n < 126 else struct.pack("!BBH", 0x81, 0x80 | 126, n)
        self.sock.sendall(head + b"\0\0\0\0" + data)  # a zero mask: the payload as is
        return ref

    def frame(self) -> list:
        """The next text frame, decoded."""
        while True:
            buf = self.buf
            if len(buf) >= 2:
                n, start = buf[1] & 0x7F, 2
                if n == 126 and len(buf) >= 4:
                    n, start = struct.unpack("!H", buf[2:4])[0], 4
                if n < 126 and len(buf) >= start + n:
                    self.buf = buf[start + n :]
                    opcode = buf[0] & 0x0F
                    if opcode == 8:
                        raise RuntimeError(f"the server closed the connection: {buf[start : start + n]!r}")
                    if opcode == 1:
                        return json.loads(buf[start : start + n])
                    continue  # a ping or a binary frame: not ours
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("the server closed the connection")
            self.buf += chunk

    def until(self, event: str, ref: str | None = None) -> list:
        while True:
            msg = self.frame()
            if msg[3] == event and (ref is None or msg[1] == ref):
                return msg

    def join(self, topic: str) -> None:
        ref = self.send(topic, "phx_join", {})
        self.until("phx_reply", ref)
        self.until("welcome")  # the example pushes it after every join


def workload(kind: str, port: int, args: argparse.Namespace, ops: int) -> None:
    """Connect, join, then run ``ops`` operations, each finished before the next."""
    if kind == "pushreply":
        clients = [Client(port, f"c{i}") for i in range(args.clients)]
        for c in clients:
            c.join("room:lobby")
        for _ in range(ops):
            for c in clients:
                ref = c.send("room:lobby", "ping", PAYLOAD)
                c.until("phx_reply", ref)
        return
    subs = [Client(port, f"s{i}") for i in range(args.subs)]
    for c in subs:
        c.join("room:lobby")
    http_conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"topic": "room:lobby", "event": "new_msg", "payload": PAYLOAD})
    headers = {"content-type": "application/json"}
    for _ in range(ops):
        http_conn.request("POST", "/broadcast", body, headers)
        resp = http_conn.getresponse()
        resp.read()
        if resp.status != 204:
            raise RuntimeError(f"POST /broadcast answered {resp.status}")
        for c in subs:
            c.until("new_msg")


def serve_counted(server: Path, root: str, env: dict[str, str], drive: Callable[[int], object]) -> int:
    """Serve ``root`` with ``server`` under callgrind, call ``drive(port)``, stop it; the server's instructions.

    ``env`` is laid over the defaults that keep per-second work out of the count (no idle timeout,
    no sweeper). Raises ``RuntimeError`` when the server does not start or callgrind writes no totals.
    """
    out = Path(tempfile.mkdtemp(prefix="phx-callgrind-")) / "callgrind.out"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no"]
    cmd += [sys.executable, str(server), "--port", "0"]
    full_env = {
        **os.environ,
        "PHX_ROOT": str(Path(root).resolve()),
        "PYTHONHASHSEED": "0",
        "PHX_IDLE_TIMEOUT": "0",  # under valgrind, joining 1,000 clients takes longer than the 60 s idle timeout
        "PHX_NO_SWEEP": "1",  # the once-a-second pass over every connection: per second, not per operation
        **env,
    }
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=full_env, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 600
        port = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("LISTENING "):
                port = int(line.split()[1])
                break
        if port is None:
            raise RuntimeError(f"the server under valgrind did not start (exit code {proc.poll()})")
        drive(port)
    finally:
        proc.terminate()  # the benchmark servers exit at once on SIGTERM; callgrind writes its file
        try:
            proc.wait(300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    text = out.read_text(errors="replace")
    m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    if m is None:
        raise RuntimeError(f"no totals in {out}")
    out.unlink()
    out.parent.rmdir()
    return int(m.group(1))


def run_once(kind: str, root: str, env: dict[str, str], args: argparse.Namespace, ops: int) -> int:
    """Serve ``root`` under callgrind, run ``ops`` operations, stop it; the server's total instructions."""
    env = {"PHX_OBSERVE_INTERVAL": str(args.interval), **env}
    return serve_counted(SERVER, root, env, lambda port: workload(kind, port, args, ops))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=["pushreply", "fanout"])
    parser.add_argument(
        "--tree", action="append", required=True, help="LABEL=ROOT[:ENV=VALUE,...]: a tree to serve (repeatable)"
    )
    parser.add_argument("--clients", type=int, default=1, help="pushreply: connections (default %(default)s)")
    parser.add_argument("--subs", type=int, default=1000, help="fanout: subscribers (default %(default)s)")
    parser.add_argument("--small", type=int, default=None, help="operations of the short run")
    parser.add_argument("--large", type=int, default=None, help="operations of the long run")
    parser.add_argument("--reps", type=int, default=1, help="pairs of runs per tree, interleaved")
    parser.add_argument("--interval", type=float, default=3600.0, help="observability sampler interval, s")
    args = parser.parse_args()
    small = args.small if args.small is not None else (200 if args.workload == "pushreply" else 10)
    large = args.large if args.large is not None else (1200 if args.workload == "pushreply" else 60)
    trees = []
    for spec in args.tree:
        label, _, rest = spec.partition("=")
        root, _, envspec = rest.partition(":")
        env = dict(item.split("=", 1) for item in envspec.split(",") if item)
        trees.append((label, root, env))
    per_op: dict[str, list[float]] = {label: [] for label, _, _ in trees}
    for rep in range(args.reps):
        for label, root, env in trees:
            a = run_once(args.workload, root, env, args, small)
            b = run_once(args.workload, root, env, args, large)
            n = (large - small) * (args.clients if args.workload == "pushreply" else 1)
            per_op[label].append((b - a) / n)
            print(f"[callgrind] rep {rep + 1} {label}: {a:,} / {b:,} instructions -> {(b - a) / n:,.0f} per op",
                  file=sys.stderr, flush=True)  # fmt: skip
    unit = "push/reply" if args.workload == "pushreply" else f"broadcast to {args.subs} subscribers"
    base = trees[0][0]
    print(f"| tree | instructions per {unit} | / {base} |\n|---|---|---|")
    for label, values in per_op.items():
        mean = sum(values) / len(values)
        ref = sum(per_op[base]) / len(per_op[base])
        spread = f" ({min(values):,.0f}-{max(values):,.0f})" if len(values) > 1 else ""
        print(f"| {label} | {mean:,.0f}{spread} | {mean / ref:.3f}x |")


if __name__ == "__main__":
    main()
