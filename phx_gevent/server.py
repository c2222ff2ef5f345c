"""The WSGI handler that lets a Flask view accept a WebSocket, and a development server.

gevent-websocket's handler upgrades *before* the application runs, so a
refused connect could only be a close frame after a 101, and it bypasses
subprotocols, close codes and access logs (STACK_NOTES.md). Our handler,
a subclass of it, runs the application first: the view answers 403/400 like
any Flask view, or 101 with an upgrade callable that the handler runs after
the request context is gone.
"""

from __future__ import annotations

import logging
import socket as _pysocket
from typing import Any

from gevent import pywsgi
from geventwebsocket.handler import WebSocketHandler as _GeventWebSocketHandler

from .transports.http import ENVIRON_CLOSE
from .transports.websocket import ENVIRON_HANDLER, ENVIRON_UPGRADE

__all__ = ["WebSocketHandler", "make_server", "serve"]

log = logging.getLogger(__name__)

# Headers a 101 response must not carry.
_DROP_ON_UPGRADE = {b"content-type", b"content-length", b"transfer-encoding"}


class WebSocketHandler(_GeventWebSocketHandler):
    """A gevent-websocket handler that lets the WSGI application decide the handshake."""

    def handle(self) -> None:
        # TCP_NODELAY for every connection: a long-poll answer is written as
        # headers then body, and Nagle would hold the body ~40 ms.
        try:
            self.socket.setsockopt(_pysocket.IPPROTO_TCP, _pysocket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass
        super().handle()

    def run_application(self) -> None:
        environ = self.environ
        environ[ENVIRON_HANDLER] = self
        self.result = self.application(environ, self.start_response)
        upgrade = environ.pop(ENVIRON_UPGRADE, None)
        if upgrade is None or self.code != 101:
            if environ.get(ENVIRON_CLOSE):
                self._close_unread()
            try:
                self.process_result()
            finally:
                self._close_result()
            return
        self._close_result()
        environ.pop(ENVIRON_HANDLER, None)
        # Werkzeug leaves the whole request object in the environ, and the
        # connection may live for days: keep only what the access log reads.
        for key in [k for k in environ if k.startswith(("werkzeug.", "flask."))]:
            del environ[key]
        self.close_connection = True
        self._write_upgrade()
        upgrade(self)

    def _close_unread(self) -> None:
        # The answer went out on the headers (413, a bad token, a slow body):
        # close after it, and never read or discard what is left of the body.
        self.close_connection = True
        wsgi_input = getattr(self, "wsgi_input", None)
        if wsgi_input is not None:
            # gevent's Input skips its discard-the-rest step in this state.
            wsgi_input._chunked_input_error = True

    def _close_result(self) -> None:
        close = getattr(self.result, "close", None)
        try:
            if close is not None:
                close()
        finally:
            self.result = None

    def _write_upgrade(self) -> None:
        self.headers_sent = True
        out = bytearray(b"HTTP/1.1 ")
        out += self.status
        out += b"\r\n"
        for name, value in self.response_headers:
            if name.lower() in _DROP_ON_UPGRADE:
                continue
            out += name + b": " + value + b"\r\n"
        out += b"\r\n"
        self._sendall(bytes(out))

    def log_request(self) -> None:
        # gevent-websocket skips 101s; we log every request, WebSockets included
        # (their line is written when the connection ends).
        super(_GeventWebSocketHandler, self).log_request()


def make_server(app: Any, host: str = "127.0.0.1", port: int = 4000, **kwargs: Any) -> pywsgi.WSGIServer:
    """A gevent WSGI server with phx_gevent's handler, bound and ready to ``serve_forever()``.

    ``port=0`` picks a free port: read it back from ``server.server_port``.
    Extra keyword arguments go to :class:`gevent.pywsgi.WSGIServer`.
    """
    kwargs.setdefault("handler_class", WebSocketHandler)
    server = pywsgi.WSGIServer((host, port), app, **kwargs)
    server.init_socket()
    return server


def serve(app: Any, host: str = "127.0.0.1", port: int = 4000, **kwargs: Any) -> None:
    """Serve ``app`` until interrupted (development; use gunicorn in production).

    The caller must have run ``gevent.monkey.patch_all()`` first if the app
    uses blocking libraries.
    """
    server = make_server(app, host, port, **kwargs)
    log.info("phx_gevent: serving on http://%s:%s", host, server.server_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(timeout=1)
