"""Floods and faults of the reliability suite (issue 17): ``make fuzz-floods`` (part of ``make fuzz``).

Each scenario runs against real server processes and prints what was
tried, how many times, and what held; docs/reliability.md has a run.

Floods (one phx_gevent server, ``benchmarks/servers/phx_server.py``):

* connection storm: rounds of N WebSockets opened at once, joined, and
  dropped without a close frame; the server must come back to 0
  connections and 0 queued bytes and keep answering;
* join/leave storm: clients joining and leaving one topic in a loop, every
  reply checked;
* many channels x connections: C connections each join T topics, one
  broadcast per topic, every delivery counted.

Faults (``gunicorn -w 2`` + Redis, the example app):

* Redis killed (SIGKILL) and restarted, and paused (SIGSTOP/SIGCONT): a
  broadcast sent through one worker must reach a client of the other worker
  after each recovery;
* worker kill -9: gunicorn starts a new one, which serves;
* SIGTERM during boot: a worker is sent SIGTERM at a random moment of its
  start, in many rounds: no traceback;
* SIGTERM under load: a worker with connected clients and broadcasts
  flowing drains them with close 1012, no traceback.

    .venv/bin/python benchmarks/reliability.py [--quick] [--only floods|faults]
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.rawws import Closed, RawWS  # noqa: E402
from tests.servers import Gunicorn, RedisServer, wait_until  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []


def record(name: str, tried: str, held: str) -> None:
    RESULTS.append((name, tried, held))
    print(f"- {name}: {tried} -> {held}", flush=True)


def post(port: int, path: str, body: dict) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def join(ws: RawWS, topic: str, ref: str) -> dict:
    ws.send_json([ref, ref, topic, "phx_join", {}])
    return ws.recv_until(lambda m: m[1] == ref and m[3] == "phx_reply")


# -- floods ------------------------------------------------------------------------------------


class BenchServer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks/servers/phx_server.py")],
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.port = int(self.proc.stdout.readline().split()[1])

    def stats(self) -> dict:
        return get_json(self.port, "/_bench/stats")

    def close(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=20)
        return err.decode(errors="replace")


def connection_storm(srv: BenchServer, n: int, rounds: int) -> None:
    opened = 0
    for _ in range(rounds):
        clients: list[RawWS] = []

        def one(i: int, clients: list[RawWS] = clients) -> None:
            ws = RawWS(srv.port, f"/socket/websocket?vsn=2.0.0&user=s{i}", timeout=30)
            join(ws, "room:storm", "1")
            clients.append(ws)

        jobs = [gevent.spawn(one, i) for i in range(n)]
        gevent.joinall(jobs, timeout=120)
        opened += len(clients)
        for ws in clients:
            ws.sock.close()  # no close frame: an abrupt drop
        wait_until(lambda: srv.stats()["connections"] == 0, 60, "connections back to 0")
    st = srv.stats()
    ok = st["connections"] == 0 and st["queued"] == 0
    record(
        "connection storm",
        f"{rounds} rounds of {n} WebSockets opened at once, joined, dropped without a close ({opened} in all)",
        f"all {opened} joined; back to {st['connections']} connections and {st['queued']} queued bytes"
        + ("" if ok else " (FAILED)"),
    )


def join_leave_storm(srv: BenchServer, clients: int, cycles: int) -> None:
    failures = 0

    def one(i: int) -> None:
        nonlocal failures
        ws = RawWS(srv.port, f"/socket/websocket?vsn=2.0.0&user=jl{i}", timeout=30)
        for c in range(cycles):
            ref = f"{c}j"
            if join(ws, "room:jl", ref)[4]["status"] != "ok":
                failures += 1
            ws.send_json([ref, f"{c}l", "room:jl", "phx_leave", {}])
            if ws.recv_until(lambda m, c=c: m[1] == f"{c}l")[4]["status"] != "ok":
                failures += 1
        ws.sock.close()

    gevent.joinall([gevent.spawn(one, i) for i in range(clients)], timeout=300, raise_error=True)
    record(
        "join/leave storm",
        f"{clients} clients x {cycles} join+leave cycles on one topic ({clients * cycles * 2} replies)",
        f"{failures} replies not ok",
    )


def channels_x_connections(srv: BenchServer, conns: int, topics: int) -> None:
    clients = [RawWS(srv.port, f"/socket/websocket?vsn=2.0.0&user=m{i}", timeout=60) for i in range(conns)]

    def joins(ws: RawWS) -> None:
        for t in range(topics):
            ws.send_json([str(t), str(t), f"room:m{t}", "phx_join", {}])
        seen = 0
        while seen < topics:
            if ws.recv_json()[3] == "phx_reply":
                seen += 1

    gevent.joinall([gevent.spawn(joins, ws) for ws in clients], timeout=300, raise_error=True)
    for t in range(topics):
        assert post(srv.port, "/broadcast", {"topic": f"room:m{t}", "event": "m", "payload": {"t": t}}) == 204
    got = [0] * conns

    def count(i: int, ws: RawWS) -> None:
        while got[i] < topics:
            if ws.recv_json()[3] == "m":
                got[i] += 1

    gevent.joinall([gevent.spawn(count, i, ws) for i, ws in enumerate(clients)], timeout=120)
    for ws in clients:
        ws.sock.close()
    record(
        "many channels x connections",
        f"{conns} connections x {topics} topics joined ({conns * topics} channels), one broadcast per topic",
        f"{sum(got)} of {conns * topics} deliveries arrived",
    )


def floods(quick: bool) -> None:
    srv = BenchServer()
    try:
        connection_storm(srv, 300 if quick else 1000, 2 if quick else 5)
        join_leave_storm(srv, 20 if quick else 50, 50 if quick else 200)
        channels_x_connections(srv, 20 if quick else 100, 20 if quick else 100)
    finally:
        err = srv.close()
    tracebacks = err.count("Traceback")
    record("floods: server log", "stderr of the flood server", f"{tracebacks} tracebacks")


# -- faults ------------------------------------------------------------------------------------


def welcome_pid(ws: RawWS) -> int:
    msg = ws.recv_until(lambda m: m[3] == "welcome")
    return int(msg[4]["node"].split(":")[-2])


def clients_on_both(g: Gunicorn, n: int = 12) -> dict[int, RawWS]:
    by_pid: dict[int, RawWS] = {}
    for i in range(60):
        ws = RawWS(g.port, f"/socket/websocket?vsn=2.0.0&user=f{i}", timeout=20)
        join(ws, "room:faults", "1")
        by_pid.setdefault(welcome_pid(ws), ws)
        if len(by_pid) >= 2:
            break
    return by_pid


def crosses(g: Gunicorn, clients: dict[int, RawWS], tag: str, timeout: float = 30.0) -> bool:
    """Broadcasts (sent to whichever worker takes the POST) until every client got one: True if so."""
    deadline = time.monotonic() + timeout
    pending = dict(clients)
    n = 0
    while pending and time.monotonic() < deadline:
        n += 1
        post(g.port, "/broadcast", {"topic": "room:faults", "event": "x", "payload": {"tag": tag, "n": n}})
        for pid, ws in list(pending.items()):
            ws.sock.settimeout(0.5)
            try:
                while True:
                    msg = ws.recv_json()
                    if msg[3] == "x" and msg[4]["tag"] == tag:
                        del pending[pid]
                        break
            except (TimeoutError, OSError):
                pass
    return not pending


def redis_faults(rounds: int) -> None:
    redis = RedisServer().start()
    g = Gunicorn(workers=2, env={"REDIS_URL": redis.url, "SECRET_KEY": "s"}).start()
    try:
        clients = clients_on_both(g)
        held_kill = held_stop = 0
        for r in range(rounds):
            redis.kill()
            gevent.sleep(1.0)
            redis.start()
            held_kill += crosses(g, clients, f"kill{r}")
        for r in range(rounds):
            assert redis.proc is not None
            redis.proc.send_signal(signal.SIGSTOP)
            gevent.sleep(5.0)
            redis.proc.send_signal(signal.SIGCONT)
            held_stop += crosses(g, clients, f"stop{r}")
        record(
            "Redis killed and restarted",
            f"{rounds} times, gunicorn -w 2, clients on both workers",
            f"cross-worker delivery resumed after {held_kill} of {rounds}",
        )
        record(
            "Redis paused (SIGSTOP 5 s, SIGCONT)",
            f"{rounds} times",
            f"cross-worker delivery resumed after {held_stop} of {rounds}",
        )
        # Worker kill -9.
        served = 0
        for r in range(rounds):
            pids = g.ready_pids()
            mark = g.log.mark()
            os.kill(pids[-1], signal.SIGKILL)
            g.wait_ready(1, since=mark, timeout=60)
            ws = RawWS(g.port, f"/socket/websocket?vsn=2.0.0&user=k{r}", timeout=20)
            served += join(ws, "room:faults", "1")[4]["status"] == "ok"
        record("worker kill -9", f"{rounds} times", f"a new worker started and served {served} of {rounds}")
        tb = sum("Traceback" in line for line in g.log.lines)
        record("Redis/kill faults: gunicorn log", "whole run", f"{tb} tracebacks")
    finally:
        g.stop(timeout=20)
        g.kill()
        redis.close()


def sigterm_during_boot(rounds: int) -> None:
    crashes = 0
    for _ in range(rounds):
        g = Gunicorn(workers=1, graceful_timeout=3)
        g.proc = subprocess.Popen(
            g.cmd, cwd=str(ROOT), env=g.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        from tests.servers import OutputLog

        g.log = OutputLog(g.proc.stdout)
        pid = int(g.log.wait(r"Booting worker with pid: (\d+)", 30)[0].group(1))
        time.sleep(random.random() * 0.6)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        time.sleep(1.5)
        g.stop(timeout=20)
        g.kill()
        text = "\n".join(g.log.lines)
        if "Traceback" in text or "attribute 'socket'" in text:
            crashes += 1
    record("SIGTERM during boot", f"{rounds} rounds, at a random moment of 0-0.6 s after fork", f"{crashes} crashes")


def sigterm_under_load(rounds: int, clients: int) -> None:
    ok_rounds = 0
    tracebacks = 0
    for _ in range(rounds):
        g = Gunicorn(workers=1, graceful_timeout=10).start()
        try:
            conns = [RawWS(g.port, f"/socket/websocket?vsn=2.0.0&user=l{i}", timeout=30) for i in range(clients)]
            for ws in conns:
                join(ws, "room:load", "1")
            stop = [False]

            def pump(port: int, stop: list[bool] = stop) -> None:
                while not stop[0]:
                    try:
                        post(port, "/broadcast", {"topic": "room:load", "event": "b", "payload": {"x": 1}})
                    except OSError:
                        return

            pumper = gevent.spawn(pump, g.port)
            gevent.sleep(0.5)
            os.kill(g.ready_pids()[0], signal.SIGTERM)
            codes = []
            for ws in conns:
                try:
                    codes.append(ws.expect_close()[0])
                except (Closed, OSError):
                    codes.append(None)
            stop[0] = True
            pumper.kill()
            ok_rounds += all(c == 1012 for c in codes)
        finally:
            g.stop(timeout=20)
            g.kill()
        tracebacks += sum("Traceback" in line for line in g.log.lines)
    record(
        "SIGTERM under load",
        f"{rounds} rounds, {clients} clients joined, broadcasts flowing",
        f"every client got close 1012 in {ok_rounds} of {rounds} rounds; {tracebacks} tracebacks",
    )


def faults(quick: bool) -> None:
    redis_faults(2 if quick else 5)
    sigterm_during_boot(10 if quick else 48)
    sigterm_under_load(2 if quick else 5, 50 if quick else 200)


def main() -> None:
    parser = argparse.ArgumentParser(description="floods and faults of the reliability suite")
    parser.add_argument("--quick", action="store_true", help="smaller numbers (a smoke run)")
    parser.add_argument("--only", choices=["floods", "faults"])
    args = parser.parse_args()
    started = time.monotonic()
    if args.only in (None, "floods"):
        floods(args.quick)
    if args.only in (None, "faults"):
        faults(args.quick)
    print("\n| scenario | tried | held |\n|---|---|---|")
    for name, tried, held in RESULTS:
        print(f"| {name} | {tried} | {held} |")
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
