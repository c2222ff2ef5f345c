"""Broadcasts per second from one process that does not serve: phx_gevent's Emitter next to Flask-SocketIO's.

    .venv/bin/python benchmarks/emitter.py [--n 20000] [--reps 3] [--contenders single,many,sio] [--out FILE]

Starts a private redis-server on a free port (pinned to core 0 when
``taskset`` exists), plus one subscriber process per contender's channel
that counts what arrives (so Redis really fans every message out, as it would
to server nodes), and runs, interleaved, in this process (plain Python, no
gevent patching, pinned to core 1):

* ``phx Emitter.broadcast``: one synchronous call per message (returns once
  Redis acknowledged the PUBLISH);
* ``phx Emitter.broadcast_many``: the same messages pipelined, 1,000 per round trip;
* ``Flask-SocketIO emit``: ``SocketIO(message_queue=URL).emit("new_msg",
  payload, to="room:lobby")``, Flask-SocketIO's documented way to emit
  from an external process (python-socketio's RedisManager, write-only: a
  pickled message per PUBLISH).

Payload: ``{"t": <time>, "s": <seq>, "p": "<40 x>"}`` as in the fan-out
benchmark. Reports medians with (min-max) and the ratios to Flask-SocketIO.
Needs benchmarks/requirements.txt (Flask-SocketIO) and redis-server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COUNTER = """
import sys, redis
r = redis.Redis(port=int(sys.argv[1]))
p = r.pubsub()
p.subscribe(sys.argv[2])
print("ready", flush=True)
n = 0
for m in p.listen():
    if m["type"] == "message":
        n += 1
        if m["data"] == b"STOP":
            break
print(n - 1, flush=True)  # the STOP marker is not counted
"""


LOBBY = "phx:t:{room:lobby}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(core: int, pid: int | None = None) -> None:
    try:
        os.sched_setaffinity(pid or 0, {core})
    except (AttributeError, OSError):
        pass


def payload(seq: int) -> dict[str, Any]:
    return {"t": time.time(), "s": seq, "p": "x" * 40}


def run_phx_single(url: str, n: int) -> float:
    from phx_gevent import Emitter

    with Emitter(url) as emitter:
        start = time.perf_counter()
        for i in range(n):
            emitter.broadcast("room:lobby", "new_msg", payload(i))
        return time.perf_counter() - start


def run_phx_many(url: str, n: int) -> float:
    from phx_gevent import Emitter

    with Emitter(url) as emitter:
        start = time.perf_counter()
        emitter.broadcast_many(("room:lobby", "new_msg", payload(i)) for i in range(n))
        return time.perf_counter() - start


def run_sio(url: str, n: int) -> float:
    from flask_socketio import SocketIO

    sio = SocketIO(message_queue=url)
    start = time.perf_counter()
    for i in range(n):
        sio.emit("new_msg", payload(i), to="room:lobby")
    return time.perf_counter() - start


def counted(port: int, channel: str, run: Any, url: str, n: int, stop: Any) -> tuple[float, int]:
    """Run ``run(url, n)`` with a subscriber counting on ``channel``; (seconds, messages counted)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", COUNTER, str(port), channel], stdout=subprocess.PIPE, text=True, cwd=str(ROOT)
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    pin(0, proc.pid)
    try:
        seconds = run(url, n)
        stop()
        got = int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    return seconds, got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="broadcasts per run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "emitter.md"), help="'' to print only")
    parser.add_argument(
        "--contenders", default="single,many,sio", help="comma list of single, many, sio (sio needs Flask-SocketIO)"
    )
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed")
    import redis

    port = free_port()
    tmp = tempfile.mkdtemp(prefix="phx-bench-redis-")
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
        stdout=subprocess.DEVNULL,
    )
    pin(0, server.pid)
    pin(1)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)

    every = {
        # Topic routing (the default): room:lobby's broadcasts travel on its own channel.
        "single": ("phx Emitter.broadcast", LOBBY, run_phx_single, lambda: client.publish(LOBBY, b"STOP")),
        "many": ("phx Emitter.broadcast_many", LOBBY, run_phx_many, lambda: client.publish(LOBBY, b"STOP")),
        "sio": ("Flask-SocketIO emit", "flask-socketio", run_sio, lambda: client.publish("flask-socketio", b"STOP")),
    }
    contenders = [every[name] for name in args.contenders.split(",")]
    results: dict[str, list[float]] = {name: [] for name, *_ in contenders}
    for rep in range(args.reps):
        for name, channel, run, stop in contenders:
            seconds, got = counted(port, channel, run, url, args.n, stop)
            if got != args.n:
                sys.exit(f"{name}: the subscriber counted {got} of {args.n} messages")
            rate = args.n / seconds
            results[name].append(rate)
            print(f"rep {rep + 1} {name}: {rate:,.0f}/s", flush=True)
    server.kill()
    server.wait()
    shutil.rmtree(tmp, ignore_errors=True)

    sio = statistics.median(results["Flask-SocketIO emit"]) if "Flask-SocketIO emit" in results else None
    lines = [
        "# Emitter: broadcasts/s from one process that does not serve",
        "",
        f"`.venv/bin/python benchmarks/emitter.py --n {args.n} --reps {args.reps}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; Redis on core 0, the emitting process on core 1; "
        "every message counted by a subscriber.",
        "",
        "| contender | broadcasts/s | / Flask-SocketIO |",
        "|---|---|---|",
    ]
    for name, rates in results.items():
        med = statistics.median(rates)
        ratio = f"{med / sio:.2f}x" if sio else "-"
        lines.append(f"| {name} | {med:,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | {ratio} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
