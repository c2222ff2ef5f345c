"""An in-memory transport for testing the connection rules without a network."""

from __future__ import annotations

import json
from typing import Any

from phx_gevent import Endpoint
from phx_gevent.connection import Connection
from phx_gevent.serializers import V2, Message, Serializer
from phx_gevent.testing import MemoryTransport


class FakeTransport(MemoryTransport):
    """The library's in-memory transport, with V2 frames decoded as plain lists for assertions."""

    name = "fake"

    def decoded(self) -> list[Any]:
        return [json.loads(f) if isinstance(f, str) else f for f in self.frames]

    def wait(self, pred: Any, timeout: float = 3.0) -> Any:
        """Wait until ``pred(decoded_frames)`` is truthy; return its value."""
        return self.wait_for(lambda _: pred(self.decoded()), timeout)

    def wait_count(self, n: int, timeout: float = 3.0) -> list[Any]:
        self.wait(lambda frames: len(frames) >= n, timeout)
        return self.decoded()

    def wait_event(self, event: str, timeout: float = 3.0, **fields: Any) -> list[Any]:
        """Wait for a V2 frame ``[jr, ref, topic, event, payload]`` with that event; return it."""

        def find(frames: list[Any]) -> Any:
            for f in frames:
                if isinstance(f, list) and f[3] == event and all(_field(f, k) == v for k, v in fields.items()):
                    return f
            return None

        return self.wait(find, timeout)


def _field(frame: list[Any], name: str) -> Any:
    return {"join_ref": frame[0], "ref": frame[1], "topic": frame[2], "event": frame[3], "payload": frame[4]}[name]


def make_connection(handler: Any, endpoint: Endpoint | None = None, serializer: Serializer = V2, **socket_opts: Any):
    """A started Connection for ``handler`` on a fake transport: ``(conn, transport, endpoint)``."""
    endpoint = endpoint or Endpoint()
    socket_opts.setdefault("log", False)
    mount = endpoint.socket("/socket", handler, **socket_opts)
    transport = FakeTransport(serializer)
    socket = mount.new_socket("websocket", serializer)
    socket = mount.handler.connect({}, socket, {}) or socket
    socket.id = mount.handler.id(socket)
    conn = Connection(mount, socket, serializer, transport)
    conn.start()
    return conn, transport, endpoint


def msg(join_ref: Any, ref: Any, topic: str, event: str, payload: Any = None) -> Message:
    return Message(join_ref, ref, topic, event, {} if payload is None else payload)
