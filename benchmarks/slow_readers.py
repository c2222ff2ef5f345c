"""The overload case of issue 17: ten hostile slow readers next to normal clients.

One phx_gevent server (``benchmarks/servers/phx_server.py``: the example app)
in its own process. This script (one gevent process) connects ``--readers``
normal clients to ``room:lobby``, which read everything, and drives
``POST /broadcast`` to ``room:lobby`` at ``--rate`` broadcasts/s. After
``--calm`` seconds, ``--hostile`` clients connect with a 4 KB receive window,
join ``room:h``, each ask for a reply of ``--reply-mb`` MB (the example's
``ping`` echoes its payload) and then never read, sending an unsolicited PONG
every second to look alive. Every second it prints the broadcasts sent, the
503s, what the normal clients received (slowest and average), and how many
hostile connections the server still has open.

    .venv/bin/python benchmarks/slow_readers.py                 # this tree
    .venv/bin/python benchmarks/slow_readers.py --root /tmp/main  # another checkout (same script)

What must hold (docs/reliability.md has a run): the normal clients' rate
stays that of the broadcasts, no broadcast is refused, and the hostile
connections are gone within ``slow_client_timeout`` (5 s) plus a sweep.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from wsupgrade import upgrade  # noqa: E402

HERE = Path(__file__).resolve().parent


def ws_connect(port: int, user: str, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    return upgrade(sock, port, user)


def send_frame(sock: socket.socket, opcode: int, payload: bytes) -> None:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    sock.sendall(head + b"\x00\x00\x00\x00" + payload)  # a zero mask: the payload as is


class Reader:
    """A normal client: reads every frame, counts the broadcasts."""

    def __init__(self, port: int, i: int) -> None:
        self.sock = ws_connect(port, f"reader{i}")
        send_frame(self.sock, 1, json.dumps(["1", "1", "room:lobby", "phx_join", {}]).encode())
        self.count = 0
        self.buf = b""

    def run(self) -> None:
        sock = self.sock
        buf = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return
            buf += chunk
            while len(buf) >= 2:
                n = buf[1] & 0x7F
                start = 2
                if n == 126:
                    if len(buf) < 4:
                        break
                    n = struct.unpack("!H", buf[2:4])[0]
                    start = 4
                elif n == 127:
                    if len(buf) < 10:
                        break
                    n = struct.unpack("!Q", buf[2:10])[0]
                    start = 10
                if len(buf) < start + n:
                    break
                if b'"tick"' in buf[start : start + n]:
                    self.count += 1
                buf = buf[start + n :]


def stats(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/_bench/stats")
        return json.loads(conn.getresponse().read())
    except Exception:
        return {}
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(HERE.parent), help="the source tree whose server runs")
    parser.add_argument("--readers", type=int, default=100)
    parser.add_argument("--hostile", type=int, default=10)
    parser.add_argument("--rate", type=int, default=200, help="broadcasts per second")
    parser.add_argument("--reply-mb", type=float, default=3.9)
    parser.add_argument("--calm", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=16.0)
    args = parser.parse_args()

    root = Path(args.root)
    server = subprocess.Popen(
        [sys.executable, str(HERE / "servers/phx_server.py")],
        cwd=str(root),
        env={**os.environ, "PHX_ROOT": str(root)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        line = server.stdout.readline().decode()
        port = int(line.split()[1])
        readers = [Reader(port, i) for i in range(args.readers)]
        for r in readers:
            gevent.spawn(r.run)
        deadline = time.monotonic() + 10
        while any(r.sock.fileno() < 0 for r in readers) and time.monotonic() < deadline:
            gevent.sleep(0.1)
        gevent.sleep(0.5)

        sent = refused = 0

        def broadcaster() -> None:
            nonlocal sent, refused
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            body = json.dumps({"topic": "room:lobby", "event": "tick", "payload": {"p": "x" * 40}})
            start = time.monotonic()
            n = 0
            while True:
                conn.request("POST", "/broadcast", body, {"Content-Type": "application/json"})
                status = conn.getresponse()
                status.read()
                n += 1
                if status.status == 204:
                    sent += 1
                else:
                    refused += 1
                delay = start + n / args.rate - time.monotonic()
                if delay > 0:
                    gevent.sleep(delay)

        hostile: list[socket.socket] = []
        hostile_closed_at: list[float] = []
        hostile_ready: list[float] = []

        attack_started: list[float] = []

        # Built before the attack, so this process (which also runs the readers) is not busy then.
        ping = json.dumps(["1", "2", "room:h", "ping", {"blob": "x" * int(args.reply_mb * 1_000_000)}]).encode()

        def attack() -> None:
            attack_started.append(time.monotonic())
            for i in range(args.hostile):
                sock = ws_connect(port, f"hostile{i}", rcvbuf=4096)
                send_frame(sock, 1, json.dumps(["1", "1", "room:h", "phx_join", {}]).encode())
                send_frame(sock, 1, ping)
                hostile.append(sock)
            hostile_ready.append(time.monotonic() - attack_started[0])
            while True:
                gevent.sleep(1.0)
                for sock in hostile:
                    try:
                        send_frame(sock, 0xA, b"alive")
                    except OSError:
                        pass

        pumper = gevent.spawn(broadcaster)
        t0 = time.monotonic()
        attacker = None
        last = [0] * len(readers)
        last_sent = last_refused = 0
        print(
            f"server: {root}  readers {args.readers}  hostile {args.hostile} x {args.reply_mb} MB  rate {args.rate}/s"
        )
        print("   t  phase    sent/s  503/s  recv/s min  recv/s avg  hostile open  queued MB")
        second = 1
        while time.monotonic() - t0 < args.duration:
            gevent.sleep(max(0.0, t0 + second - time.monotonic()))
            if attacker is None and second > args.calm:
                attacker = gevent.spawn(attack)
            counts = [r.count for r in readers]
            deltas = [c - p for c, p in zip(counts, last, strict=True)]
            last = counts
            st = stats(port)
            conns = st.get("connections")
            open_hostile = "-" if conns is None else max(0, conns - args.readers)
            if conns is not None and attacker is not None and open_hostile == 0 and not hostile_closed_at:
                hostile_closed_at.append(time.monotonic() - attack_started[0])
            queued = st.get("queued")
            print(
                f"{second:4d}  {'calm' if attacker is None else 'attack':7s}"
                f" {sent - last_sent:7d} {refused - last_refused:6d}"
                f" {min(deltas):11d} {sum(deltas) / len(deltas):11.1f}  {open_hostile!s:>12}"
                f"  {'-' if queued is None else f'{queued / 1e6:9.2f}'}",
                flush=True,
            )
            last_sent, last_refused = sent, refused
            second += 1
        pumper.kill()
        if attacker is not None:
            attacker.kill()
        if hostile_ready:
            print(f"the {args.hostile} hostile replies were queued {hostile_ready[0]:.1f} s after the attack began")
        if hostile_closed_at:
            print(f"hostile connections all gone {hostile_closed_at[0]:.0f} s after the attack began (+-1 s)")
        else:
            print("hostile connections still open at the end")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
