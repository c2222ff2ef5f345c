"""Socket handlers and channels shared by several test modules (one definition each)."""

from __future__ import annotations

from typing import Any

from phx_gevent import Channel, Socket, channel, ok


class EchoChannel(Channel):
    """Joins anything; replies to every push with its payload."""

    def join(self, topic: str, payload: Any, socket: Any) -> Any:
        return ok()

    def handle_in(self, event: str, payload: Any, socket: Any) -> Any:
        return ok(payload)


class UserSocket(Socket):
    """``room:*`` on :class:`EchoChannel`; assigns the ``user`` param (``nobody`` refused); id ``user:<user>``."""

    channels = [channel("room:*", EchoChannel)]

    def connect(self, params: dict[str, Any], socket: Any, connect_info: dict[str, Any]) -> Any:
        if params.get("user") == "nobody":
            return None
        return socket.assign(user=params.get("user"))

    def id(self, socket: Any) -> str:
        return f"user:{socket.assigns['user']}"
