"""The reconnect-storm benchmark: N clients rejoin with ``since`` at once (docs/recovery.md).

    .venv/bin/python benchmarks/storm.py --clients 5000 [--spread] [--workers 2] [--reps 3]

Starts its own redis-server and ``gunicorn -w 2`` serving the example app with
``REDIS_URL`` (``room:*`` keeps 100 ``new_msg``), then runs
``client/storm.mjs``: N clients join ``room:storm`` with ``since: null``, see
``--before`` messages, lose their connections, ``--during`` more messages are
broadcast (from outside, with ``publish_with_history``), and all N reconnect
and rejoin with ``since`` at once. Reported: time until every join reply and
until every client has every missed message, clients recovered, the Redis
commands the storm cost (``INFO commandstats`` deltas), the workers' CPU
seconds. ``--spread``: client i rejoins from the offset of message (i mod
before), so recoveries cannot share reads. Results go to
``results/storm-<N>.md`` (``--out ''`` prints only).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from phx_gevent.pubsub.history import load_rules, publish_with_history  # noqa: E402
from tests.servers import Gunicorn, RedisServer  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except OSError:
            pass
    return total


def commandstats(client: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    rs = RedisServer().start()
    g = Gunicorn(
        app="app_example:app",
        workers=args.workers,
        env={"REDIS_URL": rs.url},
        args=["--worker-connections", str(args.clients * 2 + 100), "--access-logfile", "/dev/null"],
    )
    client = redis.Redis.from_url(rs.url)
    proc = None
    try:
        g.start()
        pids = g.ready_pids()
        cfg = {"port": g.port, "clients": args.clients, "topic": "room:storm", "spread": args.spread}
        cfg["plain"] = args.plain
        proc = subprocess.Popen(
            ["node", str(ROOT / "benchmarks" / "client" / "storm.mjs"), json.dumps(cfg)],
            cwd=str(ROOT),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

        def expect(ev: str) -> dict[str, Any]:
            print(f"[storm.py] waiting for {ev}", file=sys.stderr, flush=True)
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"storm client ended before {ev!r}")
            event = json.loads(line)
            if event["ev"] != ev:
                raise RuntimeError(f"expected {ev!r}, got {event}")
            return event

        def send(value: Any) -> None:
            proc.stdin.write(f"{value}\n")
            proc.stdin.flush()

        expect("joined")
        deadline = time.monotonic() + 30
        rules = load_rules(client, "phx")
        while not rules.for_topic("room:storm") and time.monotonic() < deadline:
            time.sleep(0.1)
            rules = load_rules(client, "phx")
        send(args.before)
        for i in range(args.before):
            publish_with_history(client, "phx", "room:storm", "new_msg", {"user": "b", "body": str(i)}, rules=rules)
        expect("synced")
        expect("down")
        for i in range(args.during):
            publish_with_history(client, "phx", "room:storm", "new_msg", {"user": "d", "body": str(i)}, rules=rules)
        time.sleep(1.0)  # let the workers notice every close before the storm
        cmds0 = commandstats(client)
        cpu0 = cpu_seconds(pids)
        send(args.during)  # "go": the number of messages missed
        result = expect("result")
        result["worker_cpu_s"] = cpu_seconds(pids) - cpu0
        cmds1 = commandstats(client)
        result["redis_commands"] = {k: v - cmds0.get(k, 0) for k, v in cmds1.items() if v - cmds0.get(k, 0)}
        result["nodes"] = len(pids)
        return result
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        client.close()
        g.stop(timeout=30)
        g.kill()
        rs.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=5000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--before", type=int, default=20)
    p.add_argument("--during", type=int, default=50)
    p.add_argument("--spread", action="store_true")
    p.add_argument("--plain", action="store_true", help="baseline: rejoin without since (nothing recovered)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    runs = []
    for rep in range(args.reps):
        r = one_run(args)
        print(json.dumps(r), flush=True)
        runs.append(r)
        del rep
    mode = "-spread" if args.spread else "-plain" if args.plain else ""
    name = args.out if args.out is not None else f"storm-{args.clients}{mode}"
    lines = [
        f"### Reconnect storm: {args.clients} clients rejoin at once"
        + (
            " (spread: different offsets)"
            if args.spread
            else " (baseline: rejoin without since)"
            if args.plain
            else " (same offset)"
        ),
        "",
        f"`{' '.join(['.venv/bin/python', 'benchmarks/storm.py', *sys.argv[1:]])}`; gunicorn -w {args.workers} + "
        f"Redis, example app, {args.before} messages seen, {args.during} missed per client.",
        "",
        "| rep | all reconnected (s) | all join replies (s) | all replays in (s) | recovered | messages replayed "
        "| bad order/dups | worker CPU (s) | client CPU (s) | Redis commands during the storm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        cmds = ", ".join(f"{k} {v}" for k, v in sorted(r["redis_commands"].items(), key=lambda kv: -kv[1]))
        lines.append(
            f"| {i} | {r['opened_ms'] / 1000:.2f} | {r['joined_ms'] / 1000:.2f} | {r['done_ms'] / 1000:.2f} "
            f"| {r['recovered']}/{r['clients']} | {r['replayed']} | {r['out_of_order_or_duplicate']} "
            f"| {r['worker_cpu_s']:.2f} | {r['client_cpu_s']:.2f} | {cmds} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if name:
        path = ROOT / "benchmarks" / "results" / f"{name}.md"
        path.write_text(text)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
