"""A socket mount: one ``endpoint.socket(path, Handler, ...)``, Flask-free.

:class:`SocketMount` holds the handler, its typed options and its
connections, and owns the one connect path every transport (and
:mod:`phx_gevent.testing`) takes: :meth:`SocketMount.connect` negotiates the
serializer, runs the handler's ``connect`` and ``id`` and logs the outcome.
The Flask side (routes, the refusal's HTTP answer) is the Endpoint's and the
transports' (docs/architecture.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

from . import telemetry
from .channel import Reply
from .channels.pool import Partitions
from .errors import CallbackReturnError
from .options import DrainerOptions, LongPollOptions, WebSocketOptions
from .pubsub import PubSub
from .serializers import V1, V2, Serializer, negotiate
from .socket import Refuse, Socket, SocketState
from .transports import http as phx_http

if TYPE_CHECKING:  # pragma: no cover
    from .endpoint import Endpoint

__all__ = ["SocketMount", "parse_log_level"]

log = logging.getLogger(__name__)

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def parse_log_level(value: Any) -> int | None:
    """A mount's ``log`` option as a logging level (``None``: off). Raises ``ValueError`` for anything else."""
    if value is False or value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _LEVELS:
        return _LEVELS[value.lower()]
    raise ValueError(f"log must be a level name ('debug', 'info', ...), a logging level, or False; got {value!r}")


class SocketMount:
    """One ``endpoint.socket(path, Handler, ...)``: the handler, its options, its connections."""

    def __init__(
        self,
        endpoint: Endpoint,
        path: str,
        handler: Socket,
        *,
        websocket: WebSocketOptions | None,
        longpoll: LongPollOptions | None,
        auth_token: bool,
        check_origin: Any,
        connect_info: list[Any],
        log_level: int | None,
        partitions: int | None,
        join_timeout: float | None,
        drainer: DrainerOptions | None,
        check_csrf: bool = True,
        csrf_token_key: str = "_csrf_token",
        serializers: tuple[Serializer, ...] = (V1, V2),
        error_handler: Any = None,
    ) -> None:
        self.endpoint = endpoint
        self.path = path
        self.handler = handler
        self.websocket = websocket
        self.longpoll_options = longpoll
        self.longpoll: Any = None
        self.auth_token = auth_token
        self.check_origin = check_origin
        self.connect_info = connect_info
        self.log_level = log_level
        self.partitions = Partitions(partitions)
        self.join_timeout = join_timeout
        self.drainer = drainer
        self.check_csrf = check_csrf
        self.csrf_token_key = csrf_token_key
        #: The serializers clients may pick with ``vsn``.
        self.serializers = serializers
        #: ``f(reason) -> response`` for ``refuse(reason)``; the handler's ``handle_error`` when ``None``.
        self.error_handler = error_handler if error_handler is not None else handler.handle_error
        #: Live connections of this mount (WebSocket and long-poll).
        self.connections: set[Any] = set()

    @property
    def pubsub(self) -> PubSub:
        return self.endpoint.pubsub

    def build_connect_info(
        self, environ: Mapping[str, Any], params: Mapping[str, Any], keys: list[Any], extra: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """``connect_info`` for a connection of this mount (inside the handshake's request)."""
        return phx_http.connect_info(
            environ, keys, extra, params=params, check_csrf=self.check_csrf, csrf_token_key=self.csrf_token_key
        )

    def new_socket(self, transport: str, serializer: Serializer) -> SocketState:
        """A fresh socket struct for a connection being established."""
        self.endpoint.pubsub.start()
        if self.endpoint.observer is not None:
            self.endpoint.observer.ensure_started()
        return SocketState(
            endpoint=self.endpoint,
            handler=self.handler,
            transport=transport,
            serializer=serializer,
            pubsub_server=self.endpoint.pubsub,
        )

    def connect(
        self, transport: str, params: dict[str, Any], connect_info: dict[str, Any]
    ) -> SocketState | Refuse | None:
        """The one connect path of every transport (and of :mod:`phx_gevent.testing`).

        Picks the serializer from ``params["vsn"]``, runs the handler's
        ``connect`` and ``id``, and returns the accepted socket (its
        ``serializer`` and ``id`` set), ``None`` for a plain refusal (bad vsn,
        ``connect`` returned ``None``/``False``, ``id`` not a str: Phoenix's
        ``:error``), or a :class:`~phx_gevent.socket.Refuse` with the reason
        ``connect`` gave (``{:error, reason}``). Raises
        :class:`~phx_gevent.errors.CallbackReturnError` when ``connect``
        returns anything else; exceptions of ``connect`` propagate.
        """
        serializer = negotiate(params.get("vsn"), self.serializers)
        if serializer is None:
            log.warning(
                "phx_gevent: refused %s connection with unsupported vsn %r (phoenix.js sends 2.0.0; "
                "1.0.x and 2.0.x are supported)",
                transport,
                params.get("vsn"),
            )
            return None
        socket = self.new_socket(transport, serializer)
        started = perf_counter()
        # object: a user callback may return anything; what it means is checked below.
        result: object = self.handler.connect(params, socket, connect_info)
        name = type(self.handler).__name__
        if result is None or result is False:
            self.log_refused(transport, params, result, started, socket)
            return None
        if isinstance(result, Reply) and result.status == "error":
            result = Refuse(result.response)  # error(reason) reads as Phoenix's {:error, reason}
        if isinstance(result, Refuse):
            self.log("refused", transport, params, started, socket)
            return result
        if not isinstance(result, SocketState):
            raise CallbackReturnError(
                f"{name}.connect must return the socket (accept), None (refuse with 403) "
                f"or refuse(reason) (refuse through the error handler), got {result!r}"
            )
        sid = self.handler.id(result)
        if sid is not None and not isinstance(sid, str):
            log.error("phx_gevent: %s.id must return a str or None, got %r", name, sid)
            return None
        result.id = sid
        self.log("connected", transport, params, started, result)
        return result

    def log(
        self,
        what: str,
        transport: str,
        params: Mapping[str, Any],
        started: float | None = None,
        socket: SocketState | None = None,
        note: str = "",
    ) -> None:
        """Log a connect outcome (``"connected"``/``"refused"``) at the mount's ``log`` level, emit the event.

        ``started`` is the ``time.perf_counter()`` before ``connect`` ran. The
        log shows the params' names, never their values; ``note`` is appended.
        """
        duration = 0.0 if started is None else perf_counter() - started
        if telemetry.socket_connected.receivers:
            telemetry.emit(
                telemetry.socket_connected,
                self.endpoint,
                {"duration": duration},
                {
                    "endpoint": self.endpoint,
                    "mount": self.path,
                    "handler": type(self.handler).__name__,
                    "transport": transport,
                    "serializer": "{}.{}".format(*socket.serializer.version) if socket is not None else None,
                    "result": "ok" if what == "connected" else "error",
                    "socket_id": socket.id if socket is not None else None,
                    "params": sorted(map(str, params)),
                },
            )
        if self.log_level is not None and log.isEnabledFor(self.log_level):
            log.log(
                self.log_level,
                "%s %s in %s (path %s, transport %s, params: %s)%s",
                "CONNECTED TO" if what == "connected" else "REFUSED CONNECTION TO",
                type(self.handler).__name__,
                telemetry.format_duration(duration),
                self.path,
                transport,
                ", ".join(sorted(str(k) for k in params)),
                note,
            )

    def log_refused(
        self,
        transport: str,
        params: Mapping[str, Any],
        result: Any,
        started: float | None = None,
        socket: SocketState | None = None,
    ) -> None:
        """Log a refused ``connect`` at the mount's level, with the handler's name and what it returned."""
        self.log(
            "refused",
            transport,
            params,
            started,
            socket,
            note=f": {type(self.handler).__name__}.connect returned {result!r}, so the client got HTTP 403 "
            "(phoenix.js retries with backoff); return the socket to accept",
        )
