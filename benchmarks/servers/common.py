"""Bits shared by the three benchmark servers: argument parsing and the "ready" line.

Each server prints ``LISTENING <port>`` on stdout once it accepts connections,
then serves until SIGTERM/SIGINT, when it exits at once (a benchmark server
has nothing to flush; closing thousands of sockets one by one only slows the
runner down). Access logs are off in all three.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    # One listen backlog for every server (gunicorn's default), so a connection storm meets the same queue.
    parser.add_argument("--backlog", type=int, default=2048)
    return parser.parse_args()


def serve(server: Any) -> None:
    """Serve ``server`` (a bound gevent WSGIServer) after announcing its port; exit on a signal."""
    import gevent

    def quit_now(*_: Any) -> None:
        os._exit(0)

    gevent.signal_handler(signal.SIGTERM, quit_now)
    gevent.signal_handler(signal.SIGINT, quit_now)
    server.start()
    print(f"LISTENING {server.server_port}", flush=True)
    server.serve_forever()
