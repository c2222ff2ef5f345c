"""The live dashboard: ``endpoint.dashboard("/phx/dashboard", auth=...)``.

Serves, under ``path``:

``path``
    The page (our own HTML and JavaScript, no third-party code): every node
    of the cluster with its connections, channels by route, top topics,
    broadcast and delivery rates (charts), queued bytes, drops, PubSub state
    and Redis round-trip time; presence per topic; a searchable connection
    list with a "disconnect" action.
``path/phoenix.mjs``
    phoenix.js from the ``phoenix`` npm package (found at run time, never
    copied into this repository).
``path/socket/websocket``
    A socket mount with one channel, ``phx:dashboard``: its join reply and
    its ``stats`` pushes (every second) carry the cluster view; its
    ``disconnect`` event (``{"node", "key"}``) closes one connection on any
    node.

Every request (the page, the socket) must pass ``auth(request)``: a false
answer is 403. Each node's figures reach the others through the PubSub
adapter (:mod:`phx_gevent.observe`); each "disconnect" is logged (warning)
with who asked, on the node that asked and on the node that closed it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flask import Response, current_app, request, send_file

from .channel import Channel, error, ok
from .observe import Observer, add_view, allowed, cluster_presence, observer_of
from .serializers import dumps
from .socket import Socket, SocketState, channel

if TYPE_CHECKING:  # pragma: no cover
    from .endpoint import Endpoint

__all__ = ["install", "DashboardChannel", "DashboardSocket", "TOPIC"]

log = logging.getLogger(__name__)

#: The dashboard channel's topic.
TOPIC = "phx:dashboard"
_PAGE = Path(__file__).resolve().parent / "static" / "dashboard.html"
_PHOENIX = ("node_modules", "phoenix", "priv", "static", "phoenix.mjs")


def view(observer: Observer) -> dict[str, Any]:
    """The cluster as the dashboard shows it: every node's latest snapshot and presence per topic."""
    endpoint = observer.endpoint
    # This node's own figures are taken now; the others' are their latest (at most a second old).
    observer.nodes[endpoint.node_name] = (time.monotonic(), observer.snapshot(advance=False))
    return {
        "served_by": endpoint.node_name,
        "time": time.time(),
        "interval": observer.interval,
        "nodes": observer.cluster(),
        "presence": cluster_presence(endpoint.pubsub),
    }


class DashboardChannel(Channel):
    """``phx:dashboard``: the cluster view on join and every second; ``disconnect`` closes a connection."""

    def join(self, topic: str, payload: Any, socket: SocketState) -> Any:
        observer: Observer = socket.handler.observer
        if not observer.nodes:
            observer.tick()
        return ok(view(observer))

    def handle_in(self, event: str, payload: Any, socket: SocketState) -> Any:
        if event != "disconnect":
            return error({"reason": "unknown event"})
        if not isinstance(payload, dict) or not all(isinstance(payload.get(k), str) for k in ("node", "key")):
            return error({"reason": "expected {node: string, key: string}"})
        handler: DashboardSocket = socket.handler
        actor = socket.assigns.get("actor")
        log.warning(
            "phx_gevent: dashboard: %s asked to disconnect connection %s on node %s",
            actor,
            payload["key"],
            payload["node"],
        )
        pubsub = socket.endpoint.pubsub
        pubsub.send_direct(payload["node"], handler.direct_name, {"key": payload["key"], "by": actor})
        return ok({"requested": True})


class DashboardSocket(Socket):
    """The dashboard's socket handler: connects only the requests ``auth`` allows."""

    channels = [channel(TOPIC, DashboardChannel)]

    def __init__(self, observer: Observer, auth: Callable[[Any], Any] | None) -> None:
        super().__init__()
        self.observer = observer
        self.auth = auth
        self.direct_name = f"phx:dashboard:disconnect:{observer.endpoint.name}"

    def connect(self, params: dict[str, Any], socket: SocketState, connect_info: dict[str, Any]) -> Any:
        # Runs inside the handshake's (or long-poll's) Flask request.
        who = allowed(self.auth, False)
        if not who:
            log.warning("phx_gevent: dashboard: refused a socket from %s", request.remote_addr)
            return None
        actor = who if isinstance(who, str) else f"{request.remote_addr} ({request.user_agent.string[:60]})"
        return socket.assign(actor=actor)

    def id(self, socket: SocketState) -> None:
        return None

    def disconnect_here(self, payload: Any, sender: str) -> None:
        """Node-to-node handler: close the connection ``payload["key"]`` of this node, if it is still here."""
        if not isinstance(payload, dict):
            return
        key, by = payload.get("key"), payload.get("by")
        for mount in self.observer.endpoint.mounts:
            for conn in list(mount.connections):
                if f"{id(conn):x}" == key:
                    log.warning(
                        "phx_gevent: dashboard: disconnecting %r on behalf of %s (asked on node %s)", conn, by, sender
                    )
                    conn.disconnect()
                    return
        log.info("phx_gevent: dashboard: connection %s (asked by %s) is no longer on this node", key, by)


def _phoenix_js(explicit: str | None) -> Path | None:
    candidates = [Path(explicit)] if explicit else []
    candidates += [Path.cwd().joinpath(*_PHOENIX), Path(current_app.root_path).joinpath(*_PHOENIX)]
    candidates.append(Path(current_app.root_path).parent.joinpath(*_PHOENIX))
    return next((p for p in candidates if p.is_file()), None)


def install(endpoint: Endpoint, path: str, auth: Callable[[Any], Any] | None, phoenix_js: str | None) -> None:
    """Mount the dashboard at ``path`` (see :meth:`Endpoint.dashboard`)."""
    if not path.startswith("/"):
        raise ValueError(f"dashboard path must start with '/', got {path!r}")
    path = path.rstrip("/")
    observer = observer_of(endpoint)
    observer.gossip = True
    handler = DashboardSocket(observer, auth)
    observer.register(handler.direct_name, handler.disconnect_here)
    endpoint.socket(path + "/socket", handler, longpoll=True)
    page = _PAGE.read_text(encoding="utf-8").replace("__BASE__", path)

    def push(snapshot: dict[str, Any]) -> None:
        # Every sample: the open dashboards of this node get the cluster view (nothing when none is open).
        if endpoint.pubsub.subscriber_count(TOPIC):
            endpoint.pubsub.local_broadcast(TOPIC, "stats", view(observer))

    observer.on_sample.append(push)

    def dashboard_page() -> Response:
        if not allowed(auth, False):
            log.warning("phx_gevent: dashboard: refused the page to %s", request.remote_addr)
            return Response("forbidden", status=403, mimetype="text/plain")
        observer.ensure_started()
        resp = Response(page, mimetype="text/html")
        resp.headers["Cache-Control"] = "no-store"
        return resp

    def dashboard_phoenix() -> Response:
        # Public library code, served to anyone (scripts carry no page query string).
        found = _phoenix_js(phoenix_js)
        if found is None:
            return Response("phoenix.js not found: npm install phoenix (or pass phoenix_js=...)", status=500)
        return send_file(found, mimetype="text/javascript")

    def dashboard_data() -> Response:
        if not allowed(auth, False):
            return Response("forbidden", status=403, mimetype="text/plain")
        observer.ensure_started()
        return Response(dumps(view(observer)), mimetype="application/json")

    add_view(endpoint, path, "phx_dashboard", dashboard_page, ["GET"])
    add_view(endpoint, path + "/phoenix.mjs", "phx_dashboard_js", dashboard_phoenix, ["GET"])
    add_view(endpoint, path + "/data.json", "phx_dashboard_data", dashboard_data, ["GET"])
