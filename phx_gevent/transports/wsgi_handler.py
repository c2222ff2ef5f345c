"""The WSGI handler that lets a Flask view accept a WebSocket (used by every phx_gevent server).

gevent-websocket's handler upgrades *before* the application runs, so a
refused connect could only be a close frame after a 101, and it bypasses
subprotocols, close codes and access logs (STACK_NOTES.md). Our handler,
a subclass of it, runs the application first: the view answers 403/400 like
any Flask view, or 101 with an upgrade callable that the handler runs after
the request context is gone. It also reads request heads without the email
parser (:mod:`.head`) and bounds the time they may take.
"""

from __future__ import annotations

import socket as _pysocket
from typing import Any

from gevent import Timeout, pywsgi
from geventwebsocket.handler import WebSocketHandler as _GeventWebSocketHandler

from . import http as phx_http
from .head import PlainHeaders, environ_headers, read_headers
from .http import ENVIRON_CLOSE
from .websocket import ENVIRON_HANDLER, ENVIRON_UPGRADE

__all__ = ["DEFAULT_HEADER_TIMEOUT", "WebSocketHandler"]

#: Seconds a request head (request line and headers) may take to arrive, also the longest an idle
#: keep-alive connection waits for its next request. Servers made by :func:`make_server` take a
#: ``header_timeout`` argument, the gunicorn worker reads ``PHX_HEADER_TIMEOUT``; this is the default.
DEFAULT_HEADER_TIMEOUT = 20.0

# The access log of a server made with log=None (gevent's private no-op; nothing if it is renamed).
_NOOP_LOG: Any = getattr(pywsgi, "_NoopLog", ())

# Headers a 101 response must not carry.
_DROP_ON_UPGRADE = {b"content-type", b"content-length", b"transfer-encoding"}
#: Environ keys of pywsgi's and gevent-websocket's that are never Flask's or werkzeug's.
_PLAIN_KEYS = frozenset(
    (
        "GATEWAY_INTERFACE SERVER_SOFTWARE SCRIPT_NAME wsgi.version wsgi.multithread wsgi.multiprocess "
        "wsgi.run_once wsgi.url_scheme wsgi.errors wsgi.input wsgi.input_terminated SERVER_NAME SERVER_PORT "
        "REQUEST_METHOD PATH_INFO QUERY_STRING SERVER_PROTOCOL REMOTE_ADDR REMOTE_PORT HTTP_HOST HTTP_UPGRADE "
        "HTTP_CONNECTION HTTP_SEC_WEBSOCKET_KEY HTTP_SEC_WEBSOCKET_VERSION HTTP_ORIGIN HTTP_USER_AGENT "
        "HTTP_ACCEPT_ENCODING HTTP_ACCEPT_LANGUAGE HTTP_PRAGMA HTTP_CACHE_CONTROL HTTP_COOKIE "
        "HTTP_SEC_WEBSOCKET_EXTENSIONS HTTP_SEC_WEBSOCKET_PROTOCOL RAW_URI gunicorn.socket"
    ).split()
)


def _bad_host(environ: Any, start_response: Any) -> list[bytes]:
    start_response("400 Bad Request", [("Content-Type", "text/plain"), ("Connection", "close")])
    return [b"Host not allowed"]


class _HeaderItems(tuple[tuple[str, str], ...]):
    """The request headers of an upgraded connection as (name, value) pairs, with ``items()``."""

    __slots__ = ()

    def items(self) -> tuple[tuple[str, str], ...]:
        return self


class WebSocketHandler(_GeventWebSocketHandler):
    """A gevent-websocket handler that lets the WSGI application decide the handshake.

    It also bounds the time a request head may take (``header_timeout``,
    against slowloris) and refuses (400) a ``Host`` its server does not
    allow (``allowed_hosts`` of :func:`make_server`).
    """

    _head_timer: Any = None
    _phx_timer: Any = None
    # pywsgi's per-request attributes (untyped there): the status line (bytes, or an error text) and code.
    status: Any = None
    code: Any = None

    def MessageClass(self, *args: Any) -> Any:
        # The request's headers without the email parser in the usual case (transports/head.py).
        return read_headers(*args)

    def _headers(self) -> Any:
        headers = self.headers
        if headers.__class__ is PlainHeaders:
            return environ_headers(headers)  # no folded lines to join: straight from the pairs
        return super()._headers()

    def _sendall(self, data: Any) -> None:
        # Most responses fit the socket's send buffer: one send() does it (gevent's
        # sendall() asks the kernel for SO_SNDBUF first, a second syscall each time).
        if not data:
            return
        sock = self.socket
        try:
            sent = sock.send(data)
            if sent < len(data):
                sock.sendall(memoryview(data)[sent:])
        except OSError as ex:
            # What pywsgi records for a failed write (the access log shows it).
            self.status = f"socket error: {ex}"
            if self.code > 0:
                self.code = -self.code
            raise
        self.response_length += len(data)

    def handle_one_request(self) -> Any:
        timeout = getattr(self.server, "phx_header_timeout", DEFAULT_HEADER_TIMEOUT)
        if not timeout:
            return super().handle_one_request()
        # One timer per connection, restarted for each request of a keep-alive
        # connection (a long-poll client sends hundreds a second); closed in handle().
        timer = self._phx_timer
        if timer is None:
            timer = self._phx_timer = Timeout(timeout)
        self._head_timer = timer
        timer.start()
        try:
            return super().handle_one_request()
        except Timeout as exc:
            if exc is not timer:
                raise
            # The head did not arrive in time (or an idle keep-alive connection
            # sent nothing): close without an answer, as nginx does.
            self.close_connection = True
            return None
        finally:
            timer.cancel()
            self._head_timer = None

    def handle_one_response(self) -> None:
        # The head is in: the timeout covers reading it, never the application.
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().handle_one_response()

    def handle(self) -> None:
        # TCP_NODELAY for every connection: a long-poll answer is written as
        # headers then body, and Nagle would hold the body ~40 ms.
        try:
            self.socket.setsockopt(_pysocket.IPPROTO_TCP, _pysocket.TCP_NODELAY, 1)
            self.phx_nodelay = True  # an upgrade's transport need not set it again (a syscall per connection)
        except (OSError, AttributeError):
            pass
        try:
            super().handle()
        finally:
            timer = self._phx_timer
            if timer is not None:
                self._phx_timer = None
                timer.close()

    def run_application(self) -> None:
        environ = self.environ
        environ[ENVIRON_HANDLER] = self
        rules = getattr(self.server, "phx_allowed_hosts", None)
        if rules is not None and not phx_http.host_allowed(environ, rules):
            environ[ENVIRON_CLOSE] = True
            self._close_unread()
            self.result: Any = _bad_host(environ, self.start_response)
            try:
                self.process_result()
            finally:
                self._close_result()
            return
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
        for key in environ.keys() - _PLAIN_KEYS:  # the few keys of no standard name, not all of them
            if key.startswith(("werkzeug.", "flask.")):
                del environ[key]
        # The parsed request headers (an email.message.Message, ~1 KB) are only read again by
        # gunicorn's access log, through ``.items()`` (of plain lines, head.py: the pairs as they are).
        headers = getattr(self, "headers", None)
        if headers is not None and not isinstance(headers, _HeaderItems):
            self.headers = _HeaderItems(headers._headers if type(headers) is PlainHeaders else headers.items())
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
        # (their line is written when the connection ends: a watched
        # connection outlives this handler's greenlet and logs from its end).
        if self.__dict__.get("phx_log_deferred"):
            return
        if isinstance(self.server.log, _NOOP_LOG):
            return  # access log off (log=None): do not format a line nobody writes
        super(_GeventWebSocketHandler, self).log_request()
