"""The WebSocket handshake: the Flask view of ``<mount>/websocket`` and the start of the connection.

The handshake runs as an ordinary Flask view (origin check, auth token,
subprotocol, then the mount's one connect path: serializer, ``connect``,
``id``), so a refusal is a real HTTP answer before any upgrade: 403, or
what the socket's error handler makes of ``refuse(reason)``. Accepting returns a 101 response and leaves a callable
in the WSGI environ; our WSGI handler (:mod:`phx_gevent.server`) writes the
101 and calls it once Flask has finished the request, so no request context
stays alive for the connection's lifetime. That callable (:func:`_run`)
hands the socket to a :class:`~phx_gevent.transports.websocket.WebSocketTransport`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
from functools import partial
from typing import TYPE_CHECKING, Any

from flask import Response, make_response, request
from gevent import socket as _gsocket

from ..connection import Connection
from ..errors import CallbackReturnError
from ..serializers import Serializer
from ..socket import Refuse, SocketState
from . import frames, websocket
from . import http as phx_http
from .websocket import ENVIRON_HANDLER, ENVIRON_UPGRADE, WebSocketTransport
from .writer import configure_socket

if TYPE_CHECKING:  # pragma: no cover
    from ..mount import SocketMount

__all__ = ["handshake", "refusal_response"]

log = logging.getLogger(__name__)

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: ``wsgi.input`` of an upgraded connection's environ: nothing left to read.
_NO_INPUT = io.BytesIO(b"")


def _empty(status: int, body: str = "") -> Response:
    return Response(body, status=status, mimetype="text/plain")


def refusal_response(mount: SocketMount, refusal: Refuse | None) -> Response:
    """The WebSocket handshake's answer to a refused connect (inside its Flask request).

    A plain refusal is an empty 403; ``refuse(reason)`` goes through the
    mount's error handler, whose return value may be anything a Flask
    view returns. Raises :class:`~phx_gevent.errors.CallbackReturnError`
    (HTTP 500) when it returns something else.
    """
    if refusal is None:
        return Response("", status=403, mimetype="text/plain")
    answer = mount.error_handler(refusal.reason)
    try:
        return make_response(answer)
    except TypeError as exc:
        raise CallbackReturnError(
            f"the error handler of {mount.path!r} must return a Flask response, (body, status) or "
            f"(body, status, headers), got {answer!r}"
        ) from exc


def handshake(mount: SocketMount, path_params: dict[str, Any]) -> Response:
    """The Flask view of ``<mount>/websocket``: validate, connect, answer 101 or an error."""
    answer = accept(mount, request.environ, path_params)
    if isinstance(answer, Response):
        return answer
    return Response(status=101, headers=answer)


def accept(
    mount: SocketMount, environ: dict[str, Any], path_params: dict[str, Any]
) -> Response | list[tuple[str, str]]:
    """Validate the upgrade request and run the mount's connect path (inside the request's context).

    Returns the 101's headers (the upgrade callable is then left in the
    environ), or the HTTP answer of a refusal or malformed request. Raises
    what ``connect`` raises, and :class:`~phx_gevent.errors.CallbackReturnError`
    for a bad ``connect`` or error-handler return value.
    """
    if environ.get("REQUEST_METHOD") != "GET":
        return _empty(400)
    if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
        return _empty(400, "expected a WebSocket upgrade")
    wsgi_handler = environ.get(ENVIRON_HANDLER)
    if wsgi_handler is None:
        log.error(
            "phx_gevent: WebSocket request served without phx_gevent's WSGI handler (flask run, a plain "
            "gevent WSGIServer and gunicorn's own workers cannot hand the socket over); run with "
            "phx_gevent.serve(app) (reload=True for development), flask phx run, or gunicorn -k "
            "phx_gevent.worker.GeventWebSocketWorker"
        )
        return _empty(
            500,
            "WebSocket support needs phx_gevent's server or gunicorn worker: phx_gevent.serve(app), "
            "flask phx run (not flask run), or gunicorn -k phx_gevent.worker.GeventWebSocketWorker",
        )
    opts = mount.websocket
    assert opts is not None
    try:
        params = phx_http.parse_params(environ.get("QUERY_STRING", ""))
    except phx_http.ParamsError:
        return _empty(400, "bad query string")
    params.update(path_params)
    if not phx_http.check_origin(environ, mount.check_origin, mount.endpoint.server_name()):
        log.warning("%s", phx_http.origin_refusal(environ, mount.check_origin, "WebSocket connection", mount.path))
        return _empty(403)
    protocols = phx_http.split_protocols(environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL"))
    token = None
    if mount.auth_token:
        entries = [p for p in protocols if p.startswith(phx_http.AUTH_TOKEN_PREFIX)]
        if len(entries) == 1:
            token = phx_http.decode_auth_token(entries[0])
            if token is None:
                return _empty(403)
            protocols.remove(entries[0])
    chosen = None
    if protocols:
        chosen = next((p for p in opts.subprotocols if p in protocols), None)
        if chosen is None:
            return _empty(403)
    # Malformed upgrades are refused before any user code runs.
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION") != "13":
        resp = _empty(426, "unsupported WebSocket version")
        resp.headers["Sec-WebSocket-Version"] = "13"
        return resp
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (binascii.Error, ValueError):
        return _empty(400, "invalid Sec-WebSocket-Key")
    extra = {"auth_token": token} if mount.auth_token else None
    info = mount.build_connect_info(environ, params, mount.connect_info, extra)
    socket = mount.connect("websocket", params, info)
    if not isinstance(socket, SocketState):
        return refusal_response(mount, socket)
    serializer = socket.serializer
    accept = base64.b64encode(hashlib.sha1((key + _GUID).encode("latin-1")).digest()).decode("ascii")
    headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept)]
    if chosen is not None:
        headers.append(("Sec-WebSocket-Protocol", chosen))
    deflate = frames.negotiate_deflate(environ.get("HTTP_SEC_WEBSOCKET_EXTENSIONS")) if opts.compress else None
    if deflate is not None:
        headers.append(("Sec-WebSocket-Extensions", deflate))
    environ[ENVIRON_UPGRADE] = partial(_run, mount, socket, serializer, deflate is not None)
    return headers


def _run(mount: SocketMount, socket: SocketState, serializer: Serializer, deflate: bool, wsgi_handler: Any) -> None:
    """Called by the WSGI handler after the 101 went out: serve the connection until it ends."""
    sock = wsgi_handler.socket
    server = getattr(wsgi_handler, "server", None)  # its stop() closes the connection (phx_gevent.shutdown)
    configure_socket(sock, nodelay=not getattr(wsgi_handler, "phx_nodelay", False))
    leftover = b""
    rfile = getattr(wsgi_handler, "rfile", None)
    if rfile is not None:
        # Bytes the client sent right behind its request are in rfile's buffer.
        sock.settimeout(0)
        try:
            leftover = rfile.peek(65536)
            if leftover:
                rfile.read(len(leftover))
        except OSError:
            leftover = b""
        # From here the reader reads the socket itself: release the request's
        # 8 KB read buffer for the connection's lifetime (the request body
        # reader keeps a reference too; a GET has no body left to discard).
        wsgi_handler.rfile = None
        wsgi_input = getattr(wsgi_handler, "wsgi_input", None)
        if wsgi_input is not None:
            wsgi_input.rfile = None
        # pywsgi hands an upgrade request the buffered reader itself as
        # ``wsgi.input``; the environ lives as long as the connection (the
        # access log reads it at the end), so the 8 KB buffer did too.
        environ = getattr(wsgi_handler, "environ", None)
        if environ is not None and environ.get("wsgi.input") is rfile:
            environ["wsgi.input"] = _NO_INPUT
    assert mount.websocket is not None  # the view is only routed when the mount has WebSocket options
    if websocket.WATCH_READS and rfile is not None and not hasattr(sock, "_sslobj") and hasattr(sock, "_sock"):
        # Detach the connection from the handler's greenlet, which ends now:
        # reads are served by an I/O watcher (see WebSocketTransport.watch).
        sock = _detach(wsgi_handler, sock)
        transport = WebSocketTransport(sock, mount.websocket, serializer, leftover, deflate)
        transport.server = server
        conn = Connection(mount, socket, serializer, transport)
        transport.conn = conn
        conn.start()
        transport.watch(wsgi_handler)
        return
    transport = WebSocketTransport(sock, mount.websocket, serializer, leftover, deflate)
    transport.server = server
    conn = Connection(mount, socket, serializer, transport)
    transport.conn = conn
    conn.start()
    try:
        transport.run()
    finally:
        conn.terminate()
        transport.finish()


def _detach(wsgi_handler: Any, sock: Any) -> Any:
    """``sock``, or a new gevent socket for its descriptor: neither the handler nor its server closes it now."""
    wsgi_handler.socket = None  # pywsgi's keep-alive loop ends without touching the descriptor
    # The access log line is written when the connection ends (WebSocketTransport._end).
    wsgi_handler.phx_log_deferred = True
    keep = getattr(getattr(wsgi_handler, "server", None), "phx_keep", None)
    if keep is not None:
        keep(sock)  # our servers (accepting.PacedAccept) skip their close of this socket
        return sock
    family, type_, proto = sock.family, sock.type, sock.proto
    fd = sock.detach()  # another server's own close() of the old object is now a no-op
    return _gsocket.socket(family, type_, proto, fileno=fd)
