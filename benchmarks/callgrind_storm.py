#!/usr/bin/env python3
"""Server instructions per WebSocket connect+join, counted by valgrind, next to the raw gevent loop.

    .venv/bin/python benchmarks/callgrind_storm.py --tree new=. --tree old=/tmp/phx-old --raw

Timing a server on a shared two-core machine measures the neighbours as much
as the code; ``valgrind --tool=callgrind`` counts every instruction the server
process executes, whoever else runs. Each server runs twice under callgrind:
this process (the client, plain blocking sockets, a second process) opens
``--small`` and then ``--large`` connections over loopback, each an HTTP
upgrade to ``/socket/websocket`` followed by a Phoenix V2 ``phx_join`` of
``room:storm`` (the topic of ``run.py storm``), and keeps them open. The
difference of the two totals divided by the difference of the counts is the
cost of one connect+join, with start-up and shutdown cancelled out.

Connections go in batches of ``--batch``: the handshakes of a batch are sent
together, then its 101s read, then its joins sent together and their replies
read (phx_gevent: also the example's ``welcome`` push, which it sends after
every join, so that all the work of a join is done before the next batch).

Servers: each ``--tree LABEL=ROOT[:ENV=VALUE,...]`` is phx_gevent's example app
of that checkout (``servers/phx_server.py`` with ``PHX_ROOT=ROOT``), served as
``run.py storm`` serves it (``PHX_HISTORY=0``: plain topics, no Redis; the
example's observability on unless ``PHX_OBSERVE=0``); ``--raw`` adds the raw
gevent-websocket loop (``servers/raw_server.py``). As in ``callgrind.py``, the
observability sampler's ticks and the sweeper's pass are moved out of the
measurement (they are per second, not per connection) and
``PYTHONHASHSEED=0`` keeps runs alike; compare servers within one invocation.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

from callgrind import serve_counted
from wsupgrade import read_101, upgrade_request

HERE = Path(__file__).resolve().parent
SERVERS = {"phx": HERE / "servers" / "phx_server.py", "raw": HERE / "servers" / "raw_server.py"}
TOPIC = "room:storm"


class Conn:
    """One Phoenix V2 client on a blocking socket."""

    def __init__(self, port: int, i: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.sock.sendall(upgrade_request(port, f"s{i}"))

    def send_join(self) -> None:
        data = json.dumps(["1", "1", TOPIC, "phx_join", {}]).encode()
        self.sock.sendall(bytes([0x81, 0x80 | len(data)]) + b"\0\0\0\0" + data)  # zero mask: payload as is

    def until(self, event: str) -> list:
        """Read frames until a text frame of ``event``."""
        while True:
            buf = self.buf
            if len(buf) >= 2:
                n, start = buf[1] & 0x7F, 2
                if n == 126 and len(buf) >= 4:
                    n, start = int.from_bytes(buf[2:4], "big"), 4
                if n < 126 and len(buf) >= start + n:
                    self.buf = buf[start + n :]
                    if buf[0] & 0x0F == 8:
                        raise RuntimeError(f"closed by the server: {buf[start : start + n]!r}")
                    if buf[0] & 0x0F == 1:
                        msg = json.loads(buf[start : start + n])
                        if msg[3] == event:
                            return msg
                    continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("the server closed the connection")
            self.buf += chunk


def workload(kind: str, port: int, count: int, batch: int) -> list[Conn]:
    """Connect and join ``count`` clients, ``batch`` at a time; return them (still open)."""
    conns: list[Conn] = []
    for first in range(0, count, batch):
        group = [Conn(port, i) for i in range(first, min(count, first + batch))]
        for c in group:
            read_101(c.sock)
        for c in group:
            c.send_join()
        for c in group:
            reply = c.until("phx_reply")
            if reply[4].get("status") != "ok":
                raise RuntimeError(f"join refused: {reply}")
            if kind == "phx":
                c.until("welcome")
        conns.extend(group)
    return conns


def run_once(kind: str, root: str, env: dict[str, str], count: int, batch: int) -> int:
    """Serve under callgrind, connect+join ``count`` clients, stop; the server's total instructions."""
    conns: list[Conn] = []

    def drive(port: int) -> None:
        conns.extend(workload(kind, port, count, batch))

    try:
        env = {"PHX_HISTORY": "0", "PHX_OBSERVE_INTERVAL": "3600", **env}
        return serve_counted(SERVERS[kind], root, env, drive)
    finally:
        for c in conns:  # open until the server has stopped, so its instructions include no close
            c.sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", default=[], help="LABEL=ROOT[:ENV=VALUE,...] (repeatable)")
    parser.add_argument("--raw", action="store_true", help="also the raw gevent-websocket loop")
    parser.add_argument("--small", type=int, default=100, help="connections of the short run")
    parser.add_argument("--large", type=int, default=600, help="connections of the long run")
    parser.add_argument("--batch", type=int, default=50, help="connections sent together")
    parser.add_argument("--reps", type=int, default=1, help="pairs of runs per server, interleaved")
    args = parser.parse_args()
    servers: list[tuple[str, str, str, dict[str, str]]] = []
    for spec in args.tree:
        label, _, rest = spec.partition("=")
        root, _, envspec = rest.partition(":")
        env = dict(item.split("=", 1) for item in envspec.split(",") if item)
        servers.append((label, "phx", root, env))
    if args.raw:
        servers.append(("raw", "raw", ".", {}))
    if not servers:
        parser.error("nothing to measure: give --tree and/or --raw")
    per_join: dict[str, list[float]] = {label: [] for label, _, _, _ in servers}
    for rep in range(args.reps):
        for label, kind, root, env in servers:
            a = run_once(kind, root, env, args.small, args.batch)
            b = run_once(kind, root, env, args.large, args.batch)
            per_join[label].append((b - a) / (args.large - args.small))
            print(f"[callgrind] rep {rep + 1} {label}: {a:,} / {b:,} -> {per_join[label][-1]:,.0f} per connect+join",
                  file=sys.stderr, flush=True)  # fmt: skip
    ref_label = "raw" if args.raw else servers[0][0]
    ref = sum(per_join[ref_label]) / len(per_join[ref_label])
    print(f"| server | instructions per connect+join | / {ref_label} |\n|---|---|---|")
    for label, values in per_join.items():
        mean = sum(values) / len(values)
        spread = f" ({min(values):,.0f}-{max(values):,.0f})" if len(values) > 1 else ""
        print(f"| {label} | {mean:,.0f}{spread} | {mean / ref:.2f}x |")


if __name__ == "__main__":
    main()
