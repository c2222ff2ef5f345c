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
``PHX_HISTORY=0`` serves ``room:*`` without its history (docs/recovery.md);
``PHX_FAST_UPGRADE=0`` sends every WebSocket upgrade through Flask's dispatch
(``phx_gevent.transports.fastpath``); ``PHX_PACED_ACCEPT=0`` starts accepted
connections as gevent does (``phx_gevent.accepting.PacedAccept`` off), ``=pause`` pauses
the accepts after each batch instead (the variant evaluated); ``PHX_GCLOG=1`` logs
generation-2 collections and event-loop stalls to stderr; ``PHX_GC=off`` disables the
cyclic garbage collector (a diagnostic, never a setting); ``PHX_GC_THRESHOLD`` is read as
the gunicorn worker reads it (``phx_gevent.collector``: default 10000, ``off`` for Python's own).
``PHX_MEMPROBE=<file>`` traces allocations (tracemalloc) and, on each SIGUSR1,
appends a snapshot of them plus object counts by type to ``<file>``
(``benchmarks/memprobe.py`` reads them).

Observability (docs/observability.md): ``PHX_OBSERVE=0`` builds the example
without its health, metrics and dashboard (no telemetry receivers at all);
``PHX_DASHBOARD_OPEN=1`` keeps one dashboard channel joined (as an open page
would) for the whole run; ``PHX_OBSERVE_INTERVAL`` sets the sampler's period (s).
``PHX_IDLE_TIMEOUT`` sets the WebSocket idle timeout (s, ``0``: none), for
clients slowed down by valgrind (``benchmarks/callgrind.py``), and
``PHX_NO_SWEEP=1`` turns the sweeper's once-a-second pass into a no-op there.
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


def install_gclog() -> None:
    """Log every garbage collection of generation 2 (and any over 20 ms) and event-loop stalls to stderr.

    ``PHX_GCLOG=1``.
    """
    import gc
    import time

    started = [0.0]
    spent = [0.0, 0.0, 0.0]  # seconds in collections of each generation, so far

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        spent[info["generation"]] += took
        if info["generation"] == 2 or took > 0.02:
            line = f"GC gen{info['generation']} {took * 1000:.1f} ms, {info['collected']} collected"
            total = " / ".join(f"{s * 1000:.0f}" for s in spent)
            print(f"{line} (ms in gen0 / gen1 / gen2 so far: {total})", file=sys.stderr, flush=True)

    gc.callbacks.append(callback)

    import gevent

    def watch_stalls() -> None:
        # The event loop's stalls: a 50 ms sleep that wakes more than 250 ms late.
        while True:
            before = time.perf_counter()
            gevent.sleep(0.05)
            late = time.perf_counter() - before - 0.05
            if late > 0.25:
                print(f"STALL {late * 1000:.0f} ms", file=sys.stderr, flush=True)

    gevent.spawn(watch_stalls)


def stop_sweeps() -> None:
    """Make the WebSocket sweeper's once-a-second pass over every connection a no-op (this tree's or an older one's).

    For instruction counts only (``benchmarks/callgrind.py``): under valgrind a
    second of wall time is a varying number of operations, so work done per
    second would blur the count per operation. No idle or slow-client drops then.
    """
    import importlib

    places = (("phx_gevent.transports.sweeper", "IdleSweeper"), ("phx_gevent.transports.websocket", "_IdleSweeper"))
    for name, cls in places:
        try:
            sweeper = getattr(importlib.import_module(name), cls)
        except (ImportError, AttributeError):
            continue
        sweeper._sweep = lambda self: None


def set_idle_timeout(endpoint, seconds: float | None) -> None:
    """Every WebSocket mount's idle timeout (``None``: none), on this tree's options or an older one's."""
    import dataclasses

    for mount in endpoint.mounts:
        if getattr(mount, "websocket", None) is None:
            continue
        if dataclasses.is_dataclass(mount.websocket):
            mount.websocket = dataclasses.replace(mount.websocket, timeout=seconds)
        else:  # an older commit's plain options object
            mount.websocket.timeout = seconds


def main() -> None:
    args = parse_args("phx_gevent benchmark server")
    if os.environ.get("PHX_GCLOG") == "1":
        install_gclog()
    if os.environ.get("PHX_GC") == "off":
        import gc

        gc.disable()  # a diagnostic only: how much of a storm is the cyclic collector's
    if os.environ.get("PHX_MEMPROBE"):
        install_memprobe(os.environ["PHX_MEMPROBE"])
    if os.environ.get("PHX_OBSERVE") == "0" and hasattr(app_example, "add_observability"):
        app_example.add_observability = lambda endpoint: None
    if os.environ.get("PHX_HISTORY") == "0":
        for route in app_example.UserSocket.channels:
            route.history = None
    if os.environ.get("PHX_FAST_UPGRADE") == "0":
        from phx_gevent.transports import fastpath

        fastpath.ENABLED = False
    app, _endpoint = app_example.create_app()
    if os.environ.get("PHX_OBSERVE_INTERVAL") and getattr(_endpoint, "observer", None) is not None:
        # Seconds between two sampler ticks (benchmarks/callgrind.py moves them out of its counts).
        _endpoint.observer.interval = float(os.environ["PHX_OBSERVE_INTERVAL"])
    if os.environ.get("PHX_NO_SWEEP") == "1":
        stop_sweeps()
    if os.environ.get("PHX_IDLE_TIMEOUT"):
        set_idle_timeout(_endpoint, float(os.environ["PHX_IDLE_TIMEOUT"]) or None)
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
    paced = os.environ.get("PHX_PACED_ACCEPT")
    if paced in ("0", "pause") and hasattr(server, "_phx_start"):
        # gevent's own start of accepted connections: a handler greenlet each, at once.
        from gevent import pywsgi

        server.do_handle = pywsgi.WSGIServer.do_handle.__get__(server)
        if paced == "pause":
            # The alternative evaluated: accept 32, then stop accepting until the hub ran that batch.
            plain_read = pywsgi.WSGIServer._do_read.__get__(server)
            plain_handle = server.do_handle
            server.max_accept = 32
            accepted = [0]

            def counted_handle(*a: object) -> None:
                accepted[0] += 1
                plain_handle(*a)

            def paused_read() -> None:
                accepted[0] = 0
                plain_read()
                if accepted[0] >= 32 and server._watcher is not None:
                    server.stop_accepting()
                    server.loop.run_callback(server._start_accepting_if_started)

            server.do_handle = counted_handle
            server._do_read = paused_read
    if os.environ.get("PHX_DASHBOARD_OPEN") == "1":
        open_dashboard(server.server_port)
    try:  # as phx_gevent.serve() and the gunicorn worker do (PHX_GC_THRESHOLD=off: Python's settings)
        from phx_gevent.collector import threshold_from_env, tune_collector
    except ImportError:  # an older tree (PHX_ROOT)
        pass
    else:
        tune_collector(threshold_from_env())
    serve(server)


if __name__ == "__main__":
    main()
