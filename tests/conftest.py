"""Shared fixtures: live servers on port 0 and the phoenix.js driver.

gevent must patch the standard library before anything imports socket.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from phx_gevent import make_server  # noqa: E402
from tests.jsclient import JSClient, node_available  # noqa: E402

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


class LiveServer:
    """A phx_gevent server for one Flask app, on 127.0.0.1 and a free port."""

    def __init__(self, app: Any) -> None:
        self.server = make_server(app, "127.0.0.1", 0)
        self.port = self.server.server_port
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(timeout=2)


@pytest.fixture
def live_server() -> Iterator[Any]:
    """A factory: ``live_server(app)`` starts a server for ``app``; all are stopped afterwards."""
    servers: list[LiveServer] = []

    def start(app: Any) -> LiveServer:
        server = LiveServer(app)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def mounted(live_server: Any) -> Iterator[Any]:
    """A factory: ``mounted(SocketClass, endpoint_opts=None, **socket_opts)`` serves a fresh app.

    The app has its own Endpoint (``endpoint_opts``: its overload settings,
    which it owns while it lives) with ``SocketClass`` at ``/socket``. The
    returned server carries ``.endpoint`` and ``.mount``; afterwards each
    endpoint's settings are released, as if the endpoint were gone.
    """
    from flask import Flask

    from phx_gevent import Endpoint
    from phx_gevent.runtime import runtime

    endpoints: list[Any] = []

    def start(handler: Any, endpoint_opts: dict[str, Any] | None = None, **socket_opts: Any) -> LiveServer:
        app = Flask(__name__)
        endpoint = Endpoint(app, **(endpoint_opts or {}))
        endpoints.append(endpoint)
        mount = endpoint.socket("/socket", handler, **socket_opts)
        server = live_server(app)
        server.endpoint, server.mount = endpoint, mount
        return server

    yield start
    for endpoint in endpoints:
        runtime.release(endpoint)


@pytest.fixture
def example() -> Iterator[Any]:
    """A fresh instance of the example app (its own Endpoint), served on a free port."""
    import app_example

    app, endpoint = app_example.create_app()
    server = LiveServer(app)
    server.app = app
    server.endpoint = endpoint
    yield server
    server.stop()


@pytest.fixture
def js() -> Iterator[JSClient]:
    """A phoenix.js client process (skipped without Node, except under CI where that fails)."""
    reason = node_available()
    if reason is not None:
        if CI:
            pytest.fail(f"Node end-to-end tests cannot run under CI: {reason}")
        pytest.skip(reason)
    client = JSClient()
    yield client
    client.close()
