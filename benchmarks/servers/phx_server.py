"""phx_gevent under test: the example app (``app_example.create_app``) on phx_gevent's server.

The example app has everything the benchmarks use: the ``room:*`` channel
(joins, ``ping`` answered with its own payload) and ``POST /broadcast``.

Tunables under evaluation come from the environment (unset: the library's defaults):
``PHX_DIRECT_SEND`` (0/1), ``PHX_CHUNK`` (writers flushed per hub callback),
``PHX_SNDBUF`` (bytes, 0 = OS default), ``PHX_MAX_QUEUED`` (bytes),
``PHX_DIRECT_BUDGET`` / ``PHX_DIRECT_PERIOD`` (immediate sends allowed per period
with ``PHX_DIRECT_SEND=1``).

``PHX_ROOT`` loads phx_gevent and the example app from another checkout (a
commit to compare with: ``git archive <commit> | tar -x -C DIR``), and
``PHX_HISTORY=0`` serves ``room:*`` without its history (docs/recovery.md).
``PHX_MEMPROBE=<file>`` traces allocations (tracemalloc) and, on each SIGUSR1,
appends a snapshot of them plus object counts by type to ``<file>``
(``benchmarks/memprobe.py`` reads them).

Observability (docs/observability.md): ``PHX_OBSERVE=0`` builds the example
without its health, metrics and dashboard (no telemetry receivers at all);
``PHX_DASHBOARD_OPEN=1`` keeps one dashboard channel joined (as an open page
would) for the whole run.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(os.environ.get("PHX_ROOT") or Path(__file__).resolve().parents[2])
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import parse_args, serve  # noqa: E402

import app_example  # noqa: E402
from phx_gevent import make_server  # noqa: E402
from phx_gevent.flow import flow  # noqa: E402
from phx_gevent.transports import writer  # noqa: E402

try:  # the flusher has a module of its own (in writer.py before it)
    from phx_gevent.transports import flusher as _flusher
except ImportError:  # an older tree (PHX_ROOT)
    _flusher = writer

try:  # the direct-send budget belongs to the runtime (module globals of the writer before it)
    from phx_gevent.runtime import runtime as _budget

    _BUDGET, _PERIOD = "direct_max", "direct_period"
except ImportError:  # an older commit, measured next to this one
    _budget, _BUDGET, _PERIOD = writer, "DIRECT_BUDGET", "DIRECT_PERIOD"


def configure_from_env() -> dict:
    """Apply the PHX_* tunables; return the values in force."""
    env = os.environ
    if "PHX_DIRECT_SEND" in env:
        flow.configure(direct_send=env["PHX_DIRECT_SEND"] not in ("0", "false", ""))
    if "PHX_SNDBUF" in env:
        value = int(env["PHX_SNDBUF"])
        flow.configure(sndbuf=value or None)
    if "PHX_MAX_QUEUED" in env:
        flow.configure(max_queued_bytes=int(env["PHX_MAX_QUEUED"]))
    if "PHX_CHUNK" in env:
        _flusher.CHUNK = int(env["PHX_CHUNK"])
    if "PHX_DIRECT_BUDGET" in env:
        setattr(_budget, _BUDGET, int(env["PHX_DIRECT_BUDGET"]))
    if "PHX_DIRECT_PERIOD" in env:
        setattr(_budget, _PERIOD, float(env["PHX_DIRECT_PERIOD"]))
    return {
        "direct_send": flow.direct_send,
        "chunk": _flusher.CHUNK,
        "direct_budget": getattr(_budget, _BUDGET),
        "direct_period": getattr(_budget, _PERIOD),
        "sndbuf": flow.sndbuf,
        "max_queued_bytes": flow.high_water,
    }


def install_memprobe(path: str) -> None:
    """Trace allocations; on SIGUSR1 append (snapshot, object counts by type, RSS) to ``path``."""
    import gc
    import pickle
    import signal
    import tracemalloc
    from collections import Counter

    import gevent

    tracemalloc.start(int(os.environ.get("PHX_MEMPROBE_FRAMES", "1")))

    def dump() -> None:
        gc.collect()
        counts = Counter(type(o).__name__ for o in gc.get_objects())
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        snap = tracemalloc.take_snapshot()
        with open(path, "ab") as f:
            pickle.dump({"snapshot": snap, "types": dict(counts), "rss": rss}, f)
        print("MEMPROBE dumped", file=sys.stderr, flush=True)

    gevent.signal_handler(signal.SIGUSR1, lambda *_: gevent.spawn(dump))


def open_dashboard(port: int) -> None:
    """Join the dashboard channel over a WebSocket to ourselves and read its pushes, as an open page does."""
    import base64
    import socket

    import gevent

    def run() -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                "GET /phx/dashboard/socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        join = b'["1","1","phx:dashboard","phx_join",{}]'
        sock.sendall(bytes([0x81, 0x80 | len(join)]) + b"\0\0\0\0" + join)  # masked with a zero key
        while sock.recv(65536):
            pass  # the stats pushes, every second

    gevent.spawn_later(0.2, run)


def main() -> None:
    args = parse_args("phx_gevent benchmark server")
    if os.environ.get("PHX_MEMPROBE"):
        install_memprobe(os.environ["PHX_MEMPROBE"])
    if os.environ.get("PHX_OBSERVE") == "0" and hasattr(app_example, "add_observability"):
        app_example.add_observability = lambda endpoint: None
    if os.environ.get("PHX_HISTORY") == "0":
        for route in app_example.UserSocket.channels:
            route.history = None
    app, _endpoint = app_example.create_app()
    print(f"PHX_ROOT {ROOT} ({app_example.__file__})", file=sys.stderr, flush=True)
    settings = configure_from_env()
    settings["root"] = str(ROOT)
    settings["observe"] = hasattr(app_example, "add_observability") and os.environ.get("PHX_OBSERVE") != "0"

    @app.get("/_bench/stats")
    def bench_stats() -> dict:
        # For watching a run by hand: the overload policy's counters.
        return {
            "queued": flow.queued,
            "waiting": flow._waiting,
            "timeouts": flow.timeouts,
            "connections": _endpoint.connection_count(),
            **settings,
        }

    print(f"SETTINGS {settings}", file=sys.stderr, flush=True)
    server = make_server(app, args.host, args.port, log=None, backlog=args.backlog)
    if os.environ.get("PHX_DASHBOARD_OPEN") == "1":
        open_dashboard(server.server_port)
    serve(server)


if __name__ == "__main__":
    main()
