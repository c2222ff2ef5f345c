"""In-process cost of one WebSocket upgrade through the example app (no sockets), fast path on and off.

    .venv/bin/python benchmarks/micro_handshake.py [N]

Calls the Flask app as the WSGI handler would for ``GET /socket/websocket``
(``connect`` runs, the upgrade callable is left in the environ and dropped),
N times per variant, interleaved: the fast path (``transports/fastpath.py``)
and Flask's full dispatch. Prints microseconds per upgrade.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import app_example  # noqa: E402
from phx_gevent.transports import fastpath  # noqa: E402
from phx_gevent.transports.websocket import ENVIRON_HANDLER, ENVIRON_UPGRADE  # noqa: E402

for route in app_example.UserSocket.channels:
    route.history = None


def make(fast: bool):
    fastpath.ENABLED = fast
    os.environ.setdefault("SECRET_KEY", "bench")
    app, _ = app_example.create_app()
    return app


def environ() -> dict:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/socket/websocket",
        "QUERY_STRING": "vsn=2.0.0&user=u1",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "4000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "HTTP_HOST": "127.0.0.1:4000",
        "HTTP_UPGRADE": "websocket",
        "HTTP_CONNECTION": "Upgrade",
        "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
        "HTTP_SEC_WEBSOCKET_VERSION": "13",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "5555",
        "wsgi.input": None,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
        ENVIRON_HANDLER: object(),
    }


def run(app, n: int) -> float:
    statuses: list[str] = []

    def start_response(status: str, headers: list, exc_info=None) -> None:
        statuses.append(status)

    started = time.perf_counter()
    for _ in range(n):
        env = environ()
        result = app(env, start_response)
        close = getattr(result, "close", None)
        if close is not None:
            close()
        assert env.pop(ENVIRON_UPGRADE, None) is not None, statuses[-1]
    return (time.perf_counter() - started) / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    apps = {"fast path": make(True), "Flask dispatch": make(False)}
    assert isinstance(fastpath.install(apps["fast path"]), fastpath.UpgradeFastPath)
    assert fastpath.install(apps["Flask dispatch"]) is None
    results: dict[str, list[float]] = {k: [] for k in apps}
    for app in apps.values():
        run(app, 200)  # warm up
    for _ in range(3):
        for name, app in apps.items():
            results[name].append(run(app, n))
    for name, values in results.items():
        each = ", ".join(f"{v:.0f}" for v in values)
        print(f"{name}: {min(values):.1f} us per upgrade (best of 3 x {n}; all {each})")
    print(f"ratio: {min(results['fast path']) / min(results['Flask dispatch']):.2f}x")


if __name__ == "__main__":
    main()
