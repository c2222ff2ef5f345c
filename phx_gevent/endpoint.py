"""The Endpoint: a Flask extension that mounts sockets and broadcasts from anywhere.

::

    endpoint = Endpoint(app)                       # or Endpoint(); endpoint.init_app(app)
    endpoint.socket("/socket", UserSocket, longpoll=True)
    endpoint.broadcast("room:lobby", "new_msg", {"body": "hi"})
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from flask import Blueprint, Flask, Response, request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from . import options
from .broadcaster import Broadcaster
from .flow import flow
from .mount import SocketMount, parse_log_level
from .options import DrainerOptions, LongPollOptions, WebSocketOptions
from .pubsub import Adapter, PubSub
from .runtime import runtime
from .serializers import V1, V2, Serializer
from .socket import Socket
from .transports import fastpath
from .transports import http as phx_http
from .transports.handshake import handshake

__all__ = ["Endpoint", "SocketMount"]  # SocketMount lives in mount.py (Flask-free)

log = logging.getLogger(__name__)

# Every method: a WebSocket route answers 400 to anything but an upgrade GET
# (PROTOCOL.md 3.2), rather than Flask's 405.
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]

#: Endpoints alive in this process (the gunicorn worker drains them at shutdown).
endpoints: weakref.WeakSet[Endpoint] = weakref.WeakSet()


def _flask_path(path: str) -> tuple[str, list[str]]:
    # Phoenix mounts may contain :name segments; Flask spells them <name>.
    names = []
    segments = []
    for seg in path.split("/"):
        if seg.startswith(":") and len(seg) > 1:
            names.append(seg[1:])
            segments.append(f"<{seg[1:]}>")
        else:
            segments.append(seg)
    return "/".join(segments), names


class Endpoint(Broadcaster):
    """A Flask extension serving Phoenix sockets, and the broadcast API.

    Keyword arguments:

    ``pubsub``
        ``None`` (one process), a Redis URL (``"redis://host:6379/0"``), an
        :class:`~phx_gevent.pubsub.Adapter`, or a ready
        :class:`~phx_gevent.pubsub.PubSub`.
    ``pubsub_prefix``
        Channel prefix on a shared Redis, so several apps can share one.
    ``check_origin``
        Default for every socket: ``True`` (the Origin's host must be the
        request's host or ``SERVER_NAME``), ``False``, a list of origins
        (``"//example.com"``, ``"https://*.example.com"``), or a callable
        ``f(origin, environ) -> bool``.
    ``max_queued_bytes``, ``broadcast_timeout``, ``max_connection_queue_bytes``, ``slow_client_timeout``, ``sndbuf``
        The process-wide overload policy (:mod:`phx_gevent.flow`). Process-wide
        means shared: this endpoint owns the values it passes while it lives
        (:mod:`phx_gevent.runtime`), and a second endpoint passing a different
        value raises :class:`~phx_gevent.options.ConfigurationError` instead of
        retuning the first.
    ``max_incomplete_input_bytes``, ``input_timeout``
        The process-wide bound on inputs still arriving: memory and time
        (:mod:`phx_gevent.flow`, docs/reliability.md); owned the same way.
    ``allowed_hosts``
        ``None`` (default: any ``Host``) or the host names the app answers;
        any other ``Host`` gets 400 before a view runs, sockets included
        (``"*.example.com"`` for subdomains, ports ignored). The default
        origin check compares ``Origin`` with ``Host``: without this list, a
        page on a DNS-rebinding domain passes it.
    ``trusted_proxies``
        Addresses or networks of reverse proxies (``["127.0.0.1",
        "10.0.0.0/8"]``). A request from one of them gets its client's
        address from ``X-Forwarded-For`` (read from the right, skipping
        trusted hops) in ``REMOTE_ADDR``, so ``request.remote_addr``,
        ``peer_data`` and the per-address limits see the real client (the
        proxy's own address stays in ``environ["phx_gevent.peer_addr"]``).
        Default: none (the header is ignored).
    ``direct_send``
        ``True`` (default) sends a frame at once while the server is idle
        (lower latency), within a budget, and coalesces in the flusher under
        load; ``False`` always coalesces (see :mod:`phx_gevent.flow`).
    ``name``
        The blueprint's name (``"phx_gevent"``).
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        pubsub: PubSub | Adapter | str | None = None,
        pubsub_prefix: str = "phx",
        check_origin: bool | Iterable[str] | Any = True,
        max_queued_bytes: int | None = None,
        broadcast_timeout: float | None = None,
        max_connection_queue_bytes: int | None = None,
        slow_client_timeout: float | None = None,
        sndbuf: int | None | bool = False,
        direct_send: bool | None = None,
        max_incomplete_input_bytes: int | None = None,
        input_timeout: float | None = None,
        allowed_hosts: Iterable[str] | None = None,
        trusted_proxies: Iterable[str] | None = None,
        name: str = "phx_gevent",
    ) -> None:
        self.name = name
        self.pubsub = self._make_pubsub(pubsub, pubsub_prefix)
        self.check_origin = self._compile_origin(check_origin)
        runtime.claim(
            self,
            max_queued_bytes=max_queued_bytes,
            broadcast_timeout=broadcast_timeout,
            max_connection_queue_bytes=max_connection_queue_bytes,
            slow_client_timeout=slow_client_timeout,
            sndbuf=sndbuf,
            direct_send=direct_send,
            max_incomplete_input_bytes=max_incomplete_input_bytes,
            input_timeout=input_timeout,
        )
        self.allowed_hosts = phx_http.compile_hosts(allowed_hosts)
        self.trusted_proxies = phx_http.compile_proxies(trusted_proxies)
        self.blueprint = Blueprint(name, __name__)
        self.mounts: list[SocketMount] = []
        self.apps: list[Flask] = []
        self._paths: list[str] = []
        self._missed: set[str] = set()
        #: True once a shutdown drain began (readiness answers 503).
        self.draining = False
        #: The stats sampler behind metrics and the dashboard (:mod:`phx_gevent.observe`), once enabled.
        self.observer: Any = None
        endpoints.add(self)
        if app is not None:
            self.init_app(app)

    @staticmethod
    def _make_pubsub(pubsub: Any, prefix: str) -> PubSub:
        if pubsub is None:
            return PubSub()
        if isinstance(pubsub, PubSub):
            return pubsub
        if isinstance(pubsub, str):
            from .pubsub.redis_cluster import redis_adapter

            return PubSub(redis_adapter(pubsub, prefix=prefix))
        if isinstance(pubsub, Adapter):
            return PubSub(pubsub)
        raise TypeError(f"pubsub must be None, a Redis URL, an Adapter or a PubSub; got {pubsub!r}")

    @staticmethod
    def _compile_origin(setting: Any) -> phx_http.OriginSetting:
        return phx_http.compile_check_origin(setting)

    # -- Flask integration --------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Register the blueprint on ``app`` (sockets mounted later are added to it too)."""
        app.register_blueprint(self.blueprint)
        app.extensions[self.name] = self
        app.register_error_handler(MethodNotAllowed, self._method_not_allowed)
        if self.allowed_hosts is not None or self.trusted_proxies:
            app.before_request(self._check_request)
        # A misspelled socket URL otherwise gives a bare 404 and phoenix.js
        # retries forever. An app's own 404 handler is left alone (one
        # registered later replaces this one anyway).
        if not app.error_handler_spec.get(None, {}).get(404):
            app.register_error_handler(NotFound, self._not_found)
        # Upgrades (transports/fastpath.py, innermost) and live long-polls skip Flask's dispatch.
        fastpath.install(app)
        from .transports.longpoll.routes import LongPollRoutes

        app.wsgi_app = LongPollRoutes(app, app.wsgi_app, self.mounts, self.admit)  # type: ignore[method-assign]
        # `flask phx run`: Flask's own `flask run` cannot serve our WebSockets.
        from .cli import phx

        if "phx" not in app.cli.commands:
            app.cli.add_command(phx)
        self.apps.append(app)

    def admit(self, environ: dict[str, Any]) -> bool:
        """Apply ``trusted_proxies`` (the real client address) to ``environ``; whether its Host is allowed.

        Runs before any view (sockets included) and before the long-poll
        requests served outside Flask. Idempotent; never raises.
        """
        if self.trusted_proxies and phx_http.ENVIRON_PEER not in environ:
            client = phx_http.client_address(environ, self.trusted_proxies)
            if client is not None:
                environ[phx_http.ENVIRON_PEER] = environ.get("REMOTE_ADDR")
                environ["REMOTE_ADDR"] = client
        return phx_http.host_allowed(environ, self.allowed_hosts)

    def _check_request(self) -> Any:
        environ = request.environ
        peer = environ.get("REMOTE_ADDR")
        allowed = self.admit(environ)
        if environ.get("REMOTE_ADDR") != peer:
            request.remote_addr = environ["REMOTE_ADDR"]  # Werkzeug copied it when it made the request
        if not allowed:
            return phx_http.close_after(Response("Host not allowed", status=400, mimetype="text/plain"))
        return None

    def _method_not_allowed(self, exc: MethodNotAllowed) -> Any:
        # A non-GET upgrade request to a socket path is routed to the
        # WebSocket rule and fails as 405 inside Werkzeug; Phoenix answers 400.
        if request.path in self._paths:
            return Response(status=400)
        return exc

    def _not_found(self, exc: NotFound) -> Any:
        path = request.path
        hint = self.socket_path_hint(path)
        if hint is None:
            return exc
        if len(self._missed) < 100 and path not in self._missed:
            self._missed.add(path)  # once per path: phoenix.js retries it every few seconds
            log.warning("%s", hint)
        return Response(hint + "\n", status=404, mimetype="text/plain")

    def socket_path_hint(self, path: str) -> str | None:
        """For a 404 on a path that looks like a socket URL, a message listing the mounted socket URLs.

        ``None`` when ``path`` does not look like one (it neither ends with
        ``/websocket`` or ``/longpoll`` nor lies under a mounted socket's path).
        """
        prefixes = [m.path.split("/:", 1)[0].rstrip("/") + "/" for m in self.mounts]
        if not (path.endswith(("/websocket", "/longpoll")) or any(path.startswith(p) for p in prefixes)):
            return None
        urls = ", ".join(dict.fromkeys(self._paths)) or "none"
        return (
            f"phx_gevent: no socket at {path}. Mounted socket URLs: {urls}. phoenix.js adds /websocket or "
            '/longpoll itself: give new Socket() the mount path (new Socket("/socket") for '
            'endpoint.socket("/socket", ...)), not the full URL'
        )

    def server_name(self) -> str | None:
        """The ``SERVER_NAME`` of the first app, used by the default origin check."""
        for app in self.apps:
            name = app.config.get("SERVER_NAME")
            if name:
                return str(name)
        return None

    @property
    def node_name(self) -> str:
        """This process's node name (host, pid and a random part)."""
        return self.pubsub.node_name

    # -- mounting -----------------------------------------------------------------------

    def socket(
        self,
        path: str,
        handler: type[Socket] | Socket,
        *,
        websocket: bool | Mapping[str, Any] | WebSocketOptions = True,
        longpoll: bool | Mapping[str, Any] | LongPollOptions = False,
        auth_token: bool = False,
        check_origin: Any = None,
        connect_info: Iterable[Any] = (),
        log: str | int | bool = "info",
        partitions: int | None = None,
        join_timeout: float | None = 10.0,
        drainer: bool | Mapping[str, Any] | DrainerOptions = True,
        check_csrf: bool = True,
        csrf_token_key: str = "_csrf_token",
        serializers: Iterable[Serializer] = (V1, V2),
        error_handler: Any = None,
    ) -> SocketMount:
        """Mount a socket handler at ``path`` (``<path>/websocket``, ``<path>/longpoll``).

        ``websocket``: ``True``, ``False`` or options (a dict or
        :class:`~phx_gevent.options.WebSocketOptions`).
        ``longpoll``: ``False`` (default), ``True`` or options
        (:class:`~phx_gevent.options.LongPollOptions`).
        ``auth_token``: expose phoenix.js's ``authToken`` as
        ``connect_info["auth_token"]``. ``check_origin``: overrides the
        endpoint's. ``connect_info``: keys to collect (``"peer_data"``,
        ``"x_headers"``, ``"uri"``, ``"user_agent"``,
        ``"trace_context_headers"``, ``"sec_websocket_headers"``, ``"session"``,
        or a dict of static pairs). ``check_csrf``/``csrf_token_key``: the
        ``session`` key is given only when the connect param
        ``csrf_token_key`` holds the session's :func:`~phx_gevent.csrf_token`
        (``check_csrf=False`` drops that check; refused together with
        ``check_origin=False``, as Phoenix does). ``log``: level of socket
        action logs, or ``False``.
        ``partitions``: channel pools (default: usable cores).
        ``join_timeout``: seconds a ``join`` may take. ``drainer``: ``False``
        or ``{"batch_size", "batch_interval", "shutdown"}`` for shutdown drains
        (only connections with joined channels are drained, as in Phoenix;
        :class:`~phx_gevent.options.DrainerOptions`). Times are in seconds
        (long-poll's ``*_ms`` in milliseconds, as in Phoenix).
        ``serializers``: the wire versions clients may ask for with ``vsn``
        (Phoenix's ``serializer:`` option; default both ``V1`` and ``V2``).
        ``error_handler``: ``f(reason) -> response`` for connects refused with
        :func:`~phx_gevent.refuse` (Phoenix's ``:error_handler``); default
        the handler's :meth:`~phx_gevent.Socket.handle_error` (403).

        Raises ``ValueError``/``TypeError`` for bad options: unknown option
        names and implausible values (a time in milliseconds where seconds are
        expected) raise :class:`~phx_gevent.options.ConfigurationError`, which is both.
        """
        if isinstance(handler, type):
            if not issubclass(handler, Socket):
                raise TypeError(f"handler must be a Socket subclass, got {handler!r}")
            handler = handler()
        elif not isinstance(handler, Socket):
            raise TypeError(f"handler must be a Socket subclass or instance, got {handler!r}")
        if not path.startswith("/"):
            raise ValueError(f"socket path must start with '/', got {path!r}")
        path = path.rstrip("/") or "/"
        ws_opts = options.parse(WebSocketOptions, websocket, "websocket")
        lp_opts = options.parse(LongPollOptions, longpoll, "longpoll")
        drain_opts = options.parse(DrainerOptions, drainer, "drainer")
        join_timeout = options.check_seconds("join_timeout", join_timeout, optional=True)
        keys = options.check_connect_info(connect_info)
        origin = self.check_origin if check_origin is None else self._compile_origin(check_origin)
        if origin is False and not check_csrf:
            raise ValueError("check_origin=False and check_csrf=False together leave the socket open to cross-site use")
        if not isinstance(csrf_token_key, str) or not csrf_token_key:
            raise ValueError(f"csrf_token_key must be a non-empty string, got {csrf_token_key!r}")
        serializer_list = tuple(serializers)
        if not serializer_list or not all(isinstance(x, Serializer) for x in serializer_list):
            raise TypeError(f"serializers must be a non-empty list of Serializer objects, got {serializers!r}")
        if error_handler is not None and not callable(error_handler):
            raise TypeError(f"error_handler must be callable, got {error_handler!r}")
        mount = SocketMount(
            self,
            path,
            handler,
            websocket=ws_opts,
            longpoll=lp_opts,
            auth_token=bool(auth_token),
            check_origin=origin,
            connect_info=keys,
            log_level=parse_log_level(log),
            partitions=partitions,
            join_timeout=join_timeout,
            drainer=drain_opts,
            check_csrf=bool(check_csrf),
            csrf_token_key=csrf_token_key,
            serializers=serializer_list,
            error_handler=error_handler,
        )
        for route in getattr(handler, "channels", ()):
            if getattr(route, "history", None) is not None:
                self.pubsub.keep_history(route.pattern, route.history)
        index = len(self.mounts)
        self.mounts.append(mount)
        base, names = _flask_path("" if path == "/" else path)
        if ws_opts is not None:
            view = _view(mount, names, handshake)
            rule = base + ws_opts.path
            for websocket_rule in (True, False):
                self._add_rule(rule, f"socket{index}_ws_{int(websocket_rule)}", view, websocket_rule)
        if lp_opts is not None:
            from .transports.longpoll import LongPoll

            mount.longpoll = LongPoll(mount, lp_opts)
            view = _view(mount, names, mount.longpoll.handle)
            self._add_rule(base + mount.longpoll.path, f"socket{index}_lp", view, False)
        return mount

    def _add_rule(self, rule: str, name: str, view: Any, websocket: bool) -> None:
        # Werkzeug lets WebSocket rules take only GET/HEAD/OPTIONS; the plain
        # twin of the rule takes every other method and answers 400.
        methods = ["GET", "HEAD", "OPTIONS"] if websocket else _ALL_METHODS
        self._paths.append(rule)
        if not self.apps:
            self.blueprint.add_url_rule(
                rule, name, view, methods=methods, websocket=websocket, provide_automatic_options=False
            )
            return
        # The blueprint is already registered: Flask forbids adding to it, so
        # the rule goes on each app under the blueprint's endpoint name.
        for app in self.apps:
            app.add_url_rule(
                rule,
                f"{self.blueprint.name}.{name}",
                view,
                methods=methods,
                websocket=websocket,
                provide_automatic_options=False,
            )

    # -- observability (docs/observability.md) --------------------------------------------

    def health(self, live: str = "/phx/health", ready: str = "/phx/ready") -> None:
        """Serve a liveness probe at ``live`` (200 while the process answers) and readiness at ``ready``.

        Ready (200) means accepting connections and connected to the PubSub
        adapter; 503 while the adapter is down or once a shutdown drain began.
        Both answer JSON (``status``, ``node``, ...). No authentication: they
        reveal only the node name and these flags.
        """
        from .observe import install_health

        install_health(self, live, ready)

    def metrics(self, path: str = "/metrics", *, auth: Any = None) -> None:
        """Serve Prometheus metrics at ``path`` (needs ``prometheus_client``: the ``metrics`` extra).

        ``auth(request)`` must return true for a scrape to be served (403
        otherwise); ``None`` serves everyone. With several gunicorn workers,
        set ``PROMETHEUS_MULTIPROC_DIR`` (see :mod:`phx_gevent.metrics`).
        Raises ``ImportError`` without prometheus_client.
        """
        from . import metrics

        metrics.install(self, path, auth)

    def dashboard(self, path: str = "/phx/dashboard", *, auth: Any, phoenix_js: str | None = None) -> None:
        """Serve the live dashboard at ``path``: every node's connections, channels, topics, rates, presence.

        ``auth(request)`` decides who may open it (the page and its socket):
        a false answer is 403; a string answer names the user in the audit
        log of the "disconnect" action. ``auth=None`` refuses everyone.
        ``phoenix_js``: the path of ``phoenix.mjs`` (default: the ``phoenix``
        npm package under ``node_modules`` of the working directory or the
        app's root). See :mod:`phx_gevent.dashboard`.
        """
        from . import dashboard

        dashboard.install(self, path, auth, phoenix_js)

    # -- operations ---------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> int:
        """Send what this process still has queued for the other nodes, then stop the PubSub adapter.

        For a process that ends: a script, a test, a worker shutting down.
        ``endpoint.broadcast`` delivers locally at once but only *queues* for
        the Redis adapter; this waits (at most ``timeout`` seconds, default
        the adapter's ``close_timeout``, 5 s; less when Redis is found
        unreachable) until Redis acknowledged the queue. Presences of this
        endpoint tell the other nodes they are gone first. Returns how many
        envelopes had to be dropped (also logged as a warning). A Redis
        adapter still running does the same by itself at interpreter exit.
        Open connections are not closed (the gunicorn worker drains them).
        The endpoint restarts its adapter if it is used again.
        """
        from .presence import trackers

        for presence in list(trackers):
            if presence.pubsub is self.pubsub:
                try:
                    presence.close()
                except Exception:
                    log.exception("phx_gevent: closing presence %r failed", presence.name)
        return self.pubsub.stop(timeout)

    def connection_count(self) -> int:
        """Open connections in this process, all mounts together."""
        return sum(len(m.connections) for m in self.mounts)

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring: connections, channels per partition, queued bytes."""
        return {
            "node": self.node_name,
            "connections": self.connection_count(),
            "queued_bytes": flow.queued,
            "broadcast_timeouts": flow.timeouts,
            "mounts": {m.path: m.partitions.stats() for m in self.mounts},
            "pubsub": self.pubsub.adapter.stats() if self.pubsub.adapter is not None else {},
        }


# The fast path runs this before_request function itself (the others send upgrades through Flask).
setattr(Endpoint._check_request, fastpath.HOOK_MARK, True)


def _view(mount: SocketMount, names: list[str], target: Any) -> Any:
    def view(**path_params: Any) -> Any:
        # :name path segments become connect params; names starting with _ are dropped.
        params = {k: v for k, v in path_params.items() if k in names and not k.startswith("_")}
        return target(mount, params)

    view.__name__ = f"phx_gevent_{target.__name__}"
    return view
