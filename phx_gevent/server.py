"""phx_gevent's development server: :func:`make_server`, :func:`serve` and the :class:`Server` they run.

The server uses phx_gevent's WSGI handler
(:class:`~phx_gevent.transports.wsgi_handler.WebSocketHandler`, importable
from here too), which lets a Flask view accept a WebSocket. It starts
accepted connections in paced batches, drains channel-holding connections
on SIGTERM and Ctrl-C, and :func:`serve` sets up the garbage collector for a
server process (:mod:`phx_gevent.collector`).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
import threading
import time
from typing import Any

import gevent
from gevent import pywsgi

from .accepting import PacedAccept
from .collector import DEFAULT_THRESHOLD, check_threshold, tune_collector
from .drain import drain_all
from .errors import NotMonkeyPatchedError
from .options import check_seconds, from_env
from .shutdown import StopClosesWebSockets
from .transports import http as phx_http
from .transports.wsgi_handler import DEFAULT_HEADER_TIMEOUT, WebSocketHandler

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_HEADER_TIMEOUT",
    "HEADER_TIMEOUT_ENV",
    "PacedAccept",
    "WebSocketHandler",
    "Server",
    "check_patched",
    "drain_all",
    "header_timeout_from_env",
    "make_server",
    "serve",
    "unpatched_modules",
]

log = logging.getLogger(__name__)

#: The environment variable that sets ``header_timeout`` for the gunicorn worker (seconds, or ``off``).
HEADER_TIMEOUT_ENV = "PHX_HEADER_TIMEOUT"


def check_header_timeout(value: Any, what: str = "header_timeout") -> float | None:
    """``header_timeout`` in seconds (``None`` or 0: no limit), checked like the socket options.

    Raises :class:`~phx_gevent.options.ConfigurationError` (a ``ValueError``)
    for a negative or non-numeric value, or one over an hour (milliseconds?).
    """
    if value is None or (not isinstance(value, bool) and value == 0):
        return None
    return check_seconds(what, value)


def header_timeout_from_env(environ: Any = None) -> float | None:
    """The gunicorn worker's ``header_timeout``: ``$PHX_HEADER_TIMEOUT`` seconds, ``off``/``0`` for none.

    Unset or empty: :data:`DEFAULT_HEADER_TIMEOUT`. Raises
    :class:`~phx_gevent.options.ConfigurationError` for a value that is not a
    plausible number of seconds (the worker then fails to boot, saying why).
    """
    value = from_env(environ, HEADER_TIMEOUT_ENV, DEFAULT_HEADER_TIMEOUT, float, "a number of seconds (e.g. 20)")
    return check_header_timeout(value, HEADER_TIMEOUT_ENV)


class Server(PacedAccept, StopClosesWebSockets, pywsgi.WSGIServer):
    """gevent's WSGI server that drains channel-holding connections (close 1012) before it stops.

    :meth:`serve_forever` (so :func:`serve`) handles SIGTERM as the gunicorn
    worker does: stop accepting, :func:`drain_all` within ``drain_timeout``
    seconds (default 30), then stop; Ctrl-C drains too. :meth:`drain` does
    the same on demand. :meth:`stop` closes this server's WebSockets with 1001
    (:mod:`phx_gevent.shutdown`); accepted connections start in paced batches.
    """

    #: Seconds the drain on SIGTERM may take in all.
    drain_timeout = 30.0

    def drain(self, timeout: float | None = None) -> int:
        """Stop accepting, then close the connections holding channels with 1012; returns how many."""
        self.close()
        limit = self.drain_timeout if timeout is None else timeout
        count = drain_all(time.monotonic() + limit)
        if count:
            log.info("phx_gevent: drained %d connections (close 1012)", count)
        return count

    def _drain_and_stop(self) -> None:
        try:
            self.drain()
        except Exception:
            log.exception("phx_gevent: drain failed")
        finally:
            self.stop(timeout=1)

    def _on_sigterm(self) -> None:
        if getattr(self, "_draining", None) is None:
            self._draining = gevent.spawn(self._drain_and_stop)

    def serve_forever(self, stop_timeout: float | None = None) -> None:
        """Serve until stopped. SIGTERM (when called in the main thread) and Ctrl-C drain first."""
        handler = None
        if threading.current_thread() is threading.main_thread():
            handler = gevent.signal_handler(signal.SIGTERM, self._on_sigterm)
        if not self.started:
            self.start()
        try:
            self._stop_event.wait()
            # Closing the listener (the drain's first step) sets the stop event: let the drain finish.
            draining = getattr(self, "_draining", None)
            if draining is not None:
                draining.join()
        except KeyboardInterrupt:
            self.drain()
            raise
        finally:
            if handler is not None:
                handler.cancel()
            gevent.spawn(self.stop, timeout=stop_timeout).join()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


#: gevent patches these for ``monkey.patch_all()``; unpatched, a blocking call holds every connection.
_PATCHED_MODULES = ("socket", "select", "time", "threading")

#: The fix that every "not patched" message names.
PATCH_FIX = (
    "make `from gevent import monkey; monkey.patch_all()` the first lines of your entry point, before any other import"
)


def unpatched_modules() -> list[str]:
    """The standard modules gevent has not monkey-patched in this process (empty when patched)."""
    from gevent import monkey

    return [name for name in _PATCHED_MODULES if not monkey.is_module_patched(name)]


def check_patched() -> None:
    """Refuse or warn, before serving, when this process is not monkey-patched.

    Raises :class:`~phx_gevent.errors.NotMonkeyPatchedError` when an endpoint
    of this process uses an adapter that cannot work unpatched (Redis): it
    would hang rather than fail. Otherwise logs a warning naming the fix: a
    blocking call (``time.sleep``, a database query) in a view or callback
    would stall every connection of the process.
    """
    missing = unpatched_modules()
    if not missing:
        return
    from .endpoint import endpoints

    for endpoint in list(endpoints):
        adapter = endpoint.pubsub.adapter
        if adapter is not None and getattr(adapter, "requires_monkey_patching", False):
            message = getattr(sys.modules.get(type(adapter).__module__), "NOT_PATCHED_MESSAGE", None)
            raise NotMonkeyPatchedError(message or f"phx_gevent: {adapter!r} needs monkey-patching: {PATCH_FIX}")
    log.warning(
        "phx_gevent: this process is not monkey-patched (%s): one blocking call (time.sleep, a database "
        "query) in a view or a channel callback stalls every connection. Fix: %s "
        "(gunicorn -k phx_gevent.worker.GeventWebSocketWorker does it for you).",
        ", ".join(missing),
        PATCH_FIX,
    )


def make_server(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 4000,
    *,
    allowed_hosts: Any = "auto",
    header_timeout: float | None = DEFAULT_HEADER_TIMEOUT,
    **kwargs: Any,
) -> Server:
    """A gevent WSGI server with phx_gevent's handler, bound and ready to ``serve_forever()``.

    ``port=0`` picks a free port: read it back from ``server.server_port``.
    ``allowed_hosts``: the ``Host`` names the server answers (others get
    400 before the application runs; see
    :func:`~phx_gevent.transports.http.compile_hosts`); ``"auto"`` (default)
    means ``localhost``, ``127.0.0.1`` and ``::1`` when bound to a loopback
    address, no check otherwise; ``None`` turns the check off. A page on a
    DNS-rebinding domain then cannot reach a server run locally.
    ``header_timeout``: seconds a request head may take, also the idle
    keep-alive limit (``None``/0: no limit; under gunicorn set
    ``PHX_HEADER_TIMEOUT``, see :func:`header_timeout_from_env`). Extra
    keyword arguments go to :class:`gevent.pywsgi.WSGIServer`; ``backlog``
    defaults to :data:`DEFAULT_BACKLOG` (gevent's own is 128).
    The :class:`Server` drains channel-holding connections on SIGTERM and
    Ctrl-C in ``serve_forever()``. Raises ``ValueError``
    (:class:`~phx_gevent.options.ConfigurationError` for ``header_timeout``) for bad settings.
    Logs a warning when the process
    is not monkey-patched, and raises
    :class:`~phx_gevent.errors.NotMonkeyPatchedError` when it is not and an
    endpoint uses the Redis adapter (see :func:`check_patched`).
    """
    check_patched()
    return make_server_on(app, (host, port), host, allowed_hosts=allowed_hosts, header_timeout=header_timeout, **kwargs)


#: The listen queue of a server :func:`make_server` binds (``backlog=`` changes it), as gunicorn's default.
DEFAULT_BACKLOG = 2048


def make_server_on(
    app: Any,
    listener: Any,
    host: str,
    *,
    allowed_hosts: Any = "auto",
    header_timeout: float | None = DEFAULT_HEADER_TIMEOUT,
    **kwargs: Any,
) -> Server:
    """:func:`make_server` on ``listener`` (an address, or a bound socket: the reloader's child), unchecked patching."""
    if allowed_hosts == "auto":
        allowed_hosts = list(phx_http.LOOPBACK_HOSTS) if _is_loopback(host) else None
    rules = phx_http.compile_hosts(allowed_hosts)
    header_timeout = check_header_timeout(header_timeout)
    kwargs.setdefault("handler_class", WebSocketHandler)
    if isinstance(listener, tuple):
        # gevent listens with a queue of 128: a reconnect storm overflows it, and a dropped SYN
        # costs its client a retry a second later. gunicorn's default instead (the kernel caps it).
        kwargs.setdefault("backlog", DEFAULT_BACKLOG)
    server = Server(listener, app, **kwargs)
    server.phx_allowed_hosts = rules
    server.phx_header_timeout = header_timeout
    server.init_socket()
    return server


def url_of(host: str, port: int) -> str:
    """``http://host:port`` (IPv6 hosts in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def say(text: str) -> None:
    """Write a line to stderr now (``serving on ...``)."""
    # Straight to stderr: the library configures no logging, and a development
    # server that does not say where it listens costs a new user minutes.
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def serve(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 4000,
    *,
    reload: bool = False,
    reload_interval: float = 1.0,
    extra_files: list[str] | None = None,
    gc_threshold: int | None = DEFAULT_THRESHOLD,
    **kwargs: Any,
) -> None:
    """Serve ``app`` until SIGTERM or Ctrl-C (development; use gunicorn in production).

    Either way the connections holding channels are drained first (close
    1012, so phoenix.js clients reconnect), as under the gunicorn worker.
    Writes ``phx_gevent: serving on http://HOST:PORT`` to stderr once it
    listens (``port=0`` picks a free port, and the line tells which).
    ``reload=True`` restarts the program whenever one of its Python files (or
    one of ``extra_files``) changes, like ``flask run --debug``: the program
    is re-run from the top in a child process, which keeps the listening
    socket (and so the port); active connections are closed by the restart
    and phoenix.js reconnects. Use it for development only.

    Make ``gevent.monkey.patch_all()`` the first lines of the program:
    unpatched, a warning is logged, and :class:`~phx_gevent.errors.NotMonkeyPatchedError`
    is raised if an endpoint uses the Redis adapter. Other keyword arguments
    as for :func:`make_server` (on loopback, only loopback host names are
    answered by default).

    Before it serves, the garbage collector is set up for a server process
    (:func:`~phx_gevent.collector.tune_collector`: start-up's objects frozen,
    first-generation threshold ``gc_threshold``); ``gc_threshold=None``
    leaves it as Python has it. Raises
    :class:`~phx_gevent.options.ConfigurationError` for a bad ``gc_threshold``.
    """
    gc_threshold = check_threshold(gc_threshold)
    if reload:
        from .reloader import serve_with_reloader

        serve_with_reloader(app, host, port, reload_interval, extra_files, kwargs, gc_threshold)
        return
    server = make_server(app, host, port, **kwargs)
    say(f"phx_gevent: serving on {url_of(host, server.server_port)} (Ctrl+C to quit)")
    serve_forever(server, gc_threshold)


def serve_forever(server: Server, gc_threshold: int | None = None) -> None:
    """Run ``server`` until SIGTERM or Ctrl-C (both drain first), the collector tuned first unless ``None``."""
    tune_collector(gc_threshold)
    try:
        server.serve_forever(stop_timeout=1)
    except KeyboardInterrupt:
        pass
