#!/usr/bin/env python3
"""Where phx_gevent's bytes per joined connection go: tracemalloc and object counts, before and after.

    .venv/bin/python benchmarks/memprobe.py --conns 2000 [--frames 1] [--top 25]

Starts ``servers/phx_server.py`` with ``PHX_MEMPROBE`` (allocation tracing), has
the load generator open ``--conns`` connections and join each to
``room:lobby``, and asks the server for a snapshot before the first connection
and once all are joined (SIGUSR1). Prints, per connection: the RSS growth, the
traced Python allocations grouped by source line (top ``--top``), what is not
traced (the rest of the RSS growth: greenlet C stacks saved by greenlet's own
allocator are traced, Python 3.11's per-greenlet frame stack chunks, libev
watchers and allocator slack are not), and the growth of object counts by
type. Tracing slows the server down; the RSS figures of ``run.py conns`` are
the ones to compare with other servers.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conns", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=1, help="traceback depth of tracemalloc")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--group", default="lineno", choices=["lineno", "filename", "traceback"])
    args = parser.parse_args()
    dump = Path(tempfile.mkdtemp()) / "memprobe.pickle"
    env = {**os.environ, "PHX_MEMPROBE": str(dump), "PHX_MEMPROBE_FRAMES": str(args.frames)}
    server = subprocess.Popen(
        [sys.executable, str(HERE / "servers" / "phx_server.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stderr is not None
        port = int(server.stdout.readline().split()[1])
        cfg = {
            "workload": "conns",
            "proto": "phx",
            "port": port,
            "serverPids": [server.pid],
            "conns": args.conns,
            "settleSeconds": 3,
            "holdSeconds": 0,
            "openConcurrency": 50,
            "clkTck": os.sysconf("SC_CLK_TCK"),
            "maxSeconds": 600,
        }
        time.sleep(1)
        server.send_signal(signal.SIGUSR1)
        line = server.stderr.readline()
        while "MEMPROBE" not in line:
            line = server.stderr.readline()
        gen = subprocess.Popen(
            ["node", str(HERE / "client" / "loadgen.mjs"), json.dumps(cfg)],
            cwd=HERE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert gen.stderr is not None and gen.stdout is not None
        for line in gen.stderr:
            if "memory:" in line:
                break
        server.send_signal(signal.SIGUSR1)
        line = server.stderr.readline()
        while "MEMPROBE" not in line:
            line = server.stderr.readline()
        result = json.loads([x for x in gen.stdout.read().splitlines() if x.startswith("{")][-1])
        gen.wait(60)
    finally:
        server.terminate()
        server.wait(10)
    with open(dump, "rb") as f:
        before = pickle.load(f)
        after = pickle.load(f)
    n = result["open"]["opened"]
    print(f"{n} joined connections; RSS growth as seen by the load generator: {result['kbPerConnJoined']:.1f} KB/conn")
    rss = (after["rss"] - before["rss"]) / n
    stats = after["snapshot"].compare_to(before["snapshot"], args.group)
    traced = sum(s.size_diff for s in stats) / n
    print(f"RSS growth seen by the server (traced run): {rss / 1024:.1f} KB/conn")
    print(f"traced Python allocations: {traced / 1024:.1f} KB/conn; not traced: {(rss - traced) / 1024:.1f} KB/conn")
    print(f"\n| bytes/conn | allocations/conn | where ({args.group}) |\n|---|---|---|")
    for s in stats[: args.top]:
        where = " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in s.traceback)
        print(f"| {s.size_diff / n:,.0f} | {s.count_diff / n:.2f} | {where} |")
    print("\n| objects/conn | type |\n|---|---|")
    growth = {t: after["types"].get(t, 0) - before["types"].get(t, 0) for t in after["types"]}
    for t, d in sorted(growth.items(), key=lambda kv: -kv[1])[:20]:
        print(f"| {d / n:.2f} | {t} |")


if __name__ == "__main__":
    main()
