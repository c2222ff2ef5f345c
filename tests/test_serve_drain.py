"""``phx_gevent.serve()`` drains like the gunicorn worker: SIGTERM or Ctrl-C closes channel-holding sockets with 1012.

The server runs in a child process (signals are process-wide); phoenix.js
connects to it, one socket with a channel and one without.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ROOT, OutputLog

SCRIPT = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()

    import logging
    import sys

    from flask import Flask

    from phx_gevent import Channel, Endpoint, Socket, channel, ok, serve

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")


    class Room(Channel):
        def join(self, topic, payload, socket):
            return ok({})

        def terminate(self, reason, socket):
            print("TERMINATE", socket.topic, reason, flush=True)


    class RoomSocket(Socket):
        channels = [channel("room:*", Room)]


    app = Flask(__name__)
    Endpoint(app).socket("/socket", RoomSocket)
    serve(app, "127.0.0.1", 0)
    print("SERVE RETURNED", flush=True)
    """
)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Any]:
    script = tmp_path / "served.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    log = OutputLog(proc.stdout)
    port = int(log.wait(r"serving on http://127\.0\.0\.1:(\d+)", 20)[0].group(1))
    yield proc, log, port
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    log.join()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_drains_sockets_with_channels_on_sigterm_and_ctrl_c(served, js, sig):
    proc, log, port = served
    url = f"ws://127.0.0.1:{port}/socket"
    # No reconnect to the stopping server within the test's view.
    with_channel, _ = js.join_room(url, "a", "room:1", reconnectAfterMs=60_000)
    idle = js.open_socket(url, {"user": "b"}, reconnectAfterMs=60_000)
    since = js.mark()
    proc.send_signal(sig)
    close = js.wait(ev="close", socket=with_channel, since=since, timeout=15)
    assert close["code"] == 1012
    log.wait(r"TERMINATE room:1 \('shutdown', 'draining'\)", 10)
    log.wait(r"drained 1 connections \(close 1012\)", 10)
    log.wait(r"SERVE RETURNED", 15)
    assert proc.wait(timeout=15) == 0
    # The socket without channels was not drained: it just lost its server.
    closes = js.find(since=since, ev="close", socket=idle)
    assert all(c["code"] != 1012 for c in closes)
