"""``serve(..., reload=True)``: the development reloader (Werkzeug's stat reloader, one listening socket).

The parent binds the socket once and hands it to each child it re-runs, so the
port (even a ``port=0`` choice) stays the same across restarts and no request
is refused while a child starts.
"""

from __future__ import annotations

import os
import socket as _pysocket
from typing import Any

from .server import check_patched, make_server_on, say, serve_forever, url_of

__all__ = ["bind", "serve_with_reloader"]

# Set in the reloader's child: the listening socket the parent bound (the port survives restarts).
_FD_ENV = "PHX_GEVENT_SERVER_FD"


def serve_with_reloader(
    app: Any,
    host: str,
    port: int,
    interval: float,
    extra_files: list[str] | None,
    kwargs: dict[str, Any],
    gc_threshold: int | None = None,
) -> None:
    """Serve ``app`` (``serve(..., reload=True)``), restarted by Werkzeug's stat reloader on file changes."""
    # Werkzeug's reloader re-runs the program in a child with
    # WERKZEUG_RUN_MAIN=true and restarts it when it exits with code 3 (a
    # file changed). The child serves in a "thread" (a greenlet once
    # threading is patched) while its main greenlet polls file times with
    # (patched) time.sleep. Only the stat reloader is used: watchdog's real
    # threads would not mix with the gevent hub.
    from werkzeug._reloader import run_with_reloader

    fd = os.environ.get(_FD_ENV)
    if os.environ.get("WERKZEUG_RUN_MAIN") == "true" and fd is not None:
        check_patched()
        listener = _pysocket.socket(fileno=int(fd))
        server = make_server_on(app, listener, host, **kwargs)
        run_with_reloader(
            lambda: serve_forever(server, gc_threshold),
            extra_files=extra_files,
            interval=interval,
            reloader_type="stat",
        )
        return
    # The parent binds once and hands the socket down, so the port (even a
    # port=0 choice) stays the same across restarts and no request is refused
    # while the child starts.
    listener = bind(host, port)
    os.environ[_FD_ENV] = str(listener.fileno())
    say(
        f"phx_gevent: serving on {url_of(host, listener.getsockname()[1])} "
        "(reloader on: restarts when a Python file changes; Ctrl+C to quit)"
    )
    try:
        run_with_reloader(lambda: None, extra_files=extra_files, interval=interval, reloader_type="stat")
    finally:
        listener.close()


def bind(host: str, port: int) -> _pysocket.socket:
    """A listening socket on ``host``:``port``, inheritable by the reloader's child."""
    family, kind, proto, _, address = _pysocket.getaddrinfo(
        host, port, type=_pysocket.SOCK_STREAM, flags=_pysocket.AI_PASSIVE
    )[0]
    sock = _pysocket.socket(family, kind, proto)
    sock.setsockopt(_pysocket.SOL_SOCKET, _pysocket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock
