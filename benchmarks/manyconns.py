#!/usr/bin/env python3
"""Many joined connections on one machine: gunicorn workers, several client processes and source addresses.

    .venv/bin/python benchmarks/manyconns.py --workers 1 --conns 19000 --clients 2
    .venv/bin/python benchmarks/manyconns.py --workers 6 --conns 100000 --clients 6

Starts gunicorn (``phx_gevent.worker.GeventWebSocketWorker``, the example app,
``--reuse-port`` so the kernel spreads connections evenly over the workers,
``--backlog 4096``; with more than one worker a throwaway redis-server and
``REDIS_URL``), then ``--clients`` load generator processes. Client ``k``
connects from its own 127.0.0.x addresses (loopback has ~28,000 ephemeral
ports per source address), joins ``room:lobby``, and heartbeats every
``--heartbeat-ms`` (phoenix.js: 30 s). All clients hold until one wall-clock
time, at least ``--hold`` seconds after the last connection of the slowest
client; then client 0 posts one broadcast and every client records when it
received it. Prints (and saves under results/) connections opened and still
open, heartbeats sent/answered/missed, server RSS and CPU while idle, and the
broadcast's first and last delivery after the POST.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as R  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--conns", type=int, default=19000, help="total joined connections")
    parser.add_argument("--clients", type=int, default=2, help="load generator processes")
    parser.add_argument("--hold", type=float, default=125.0, help="seconds held after the last connection")
    parser.add_argument("--open-budget", type=float, default=240.0, help="seconds allowed for opening")
    parser.add_argument("--heartbeat-ms", type=int, default=30000)
    parser.add_argument("--concurrency", type=int, default=50, help="connects in flight per client")
    parser.add_argument("--name", help="results file name (default manyconns-<workers>w-<conns>)")
    args = parser.parse_args()
    note = R.raise_nofile(20000)
    R.say(note)
    per_client = -(-args.conns // args.clients)
    with ExitStack() as stack:
        env = {}
        if args.workers > 1:
            env["REDIS_URL"] = stack.enter_context(R.redis_server())
        server = R.start_gunicorn(
            args.workers,
            20000,
            env,
            None,
            "phx",
            ("--reuse-port", "--backlog", "4096"),
        )
        stack.callback(server.stop)
        R.say(f"gunicorn with {args.workers} workers on port {server.port}: pids {server.pids}")
        start = time.time()
        hold_until = (start + args.open_budget + args.hold) * 1000
        procs = []
        for k in range(args.clients):
            n = min(per_client, args.conns - k * per_client)
            cfg = {
                "workload": "conns",
                "proto": "phx",
                "port": server.port,
                "serverPids": server.pids,
                "conns": n,
                "settleSeconds": 1,
                "heartbeatMs": args.heartbeat_ms,
                "openConcurrency": args.concurrency,
                "localAddresses": [f"127.0.{1 + k}.{1 + j}" for j in range(2)],
                "holdUntilMs": hold_until,
                "broadcastAtMs": hold_until + 3000,
                "broadcaster": k == 0,
                "clkTck": os.sysconf("SC_CLK_TCK"),
                "maxSeconds": int(args.open_budget + args.hold + 120),
            }
            procs.append(
                subprocess.Popen(["node", str(R.LOADGEN), json.dumps(cfg)], cwd=HERE, stdout=subprocess.PIPE, text=True)
            )
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=args.open_budget + args.hold + 200)
            lines = [x for x in out.splitlines() if x.startswith("{")]
            results.append(json.loads(lines[-1]) if lines else {"error": "no result"})
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise SystemExit(f"client failed: {errors}")
    opened = sum(r["open"]["opened"] for r in results)
    last_open = max(r["open"]["seconds"] for r in results)
    still = sum(r["hold"]["stillOpen"] for r in results)
    hb_sent = sum(r["hold"]["heartbeatsSent"] for r in results)
    hb_ok = sum(r["hold"]["heartbeatReplies"] for r in results)
    missed = sum(r["hold"]["heartbeatsMissed"] for r in results)
    r0 = results[0]
    held = hold_until / 1000 - start - last_open - 2  # opening starts after ~1 s of settling, plus joins
    got = sum(r["broadcast"]["received"] for r in results)
    sent_at = r0.get("broadcastSentAt")
    first = min(r["broadcast"]["first"] for r in results if r["broadcast"]["received"])
    last = max(r["broadcast"]["last"] for r in results if r["broadcast"]["received"])
    rss_mb = r0["hold"]["rssKb"] / 1024
    lines = [
        f"### {args.conns:,} joined connections, {args.workers} gunicorn worker(s), {args.clients} client processes",
        "",
        "| opened | still open after the hold | held (s, after the last connect) | heartbeats sent (whole run) "
        "| answered during the hold | missed | closes | server RSS MB (all workers) | KB/conn (RSS growth) "
        "| server CPU while idle (cores) "
        "| broadcast received | first delivery ms | last delivery ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {opened:,} | {still:,} | {held:.0f} | {hb_sent:,} | {hb_ok:,} | {missed:,} "
        f"| {sum(r['closes'] for r in results)} | {rss_mb:,.0f} "
        f"| {(r0['hold']['rssKb'] - r0['rssBaseKb']) / max(1, opened):.1f} "
        f"| {r0['hold']['serverCpu']:.3f} | {got:,} | {first - sent_at:.0f} | {last - sent_at:.0f} |",
        "",
        f"Heartbeats every {args.heartbeat_ms / 1000:g} s; opening took {last_open:.0f} s (slowest client); "
        f"{note}; per worker connections: see the raw JSON.",
    ]
    text = "\n".join(lines)
    print(text)
    name = args.name or f"manyconns-{args.workers}w-{args.conns}"
    (R.RESULTS / "raw").mkdir(parents=True, exist_ok=True)
    (R.RESULTS / f"{name}.md").write_text(
        f"Measured {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} at commit {R.git_head()}.\n\n{text}\n"
    )
    (R.RESULTS / "raw" / f"{name}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
