"""The fastlane encoders of WebSocket connections: a broadcast becomes one ready frame, shared by all.

Plain frames, or permessage-deflate frames for connections that negotiated it
(compressed once per broadcast, no context takeover). Used by the WebSocket
transport (:mod:`.websocket`) and the fan-out (:mod:`phx_gevent.pubsub.topic`).
"""

from __future__ import annotations

from typing import Any

from ..serializers import FastlaneEncoder, Serializer
from . import frames
from .frames import OP_BINARY, OP_TEXT, frame, text_frame

__all__ = ["DeflateWebSocketEncoder", "WebSocketEncoder", "deflate_message", "encoder_for"]


class WebSocketEncoder(FastlaneEncoder):
    """Fastlane encoder: a broadcast becomes one ready WebSocket frame, shared by all connections."""

    __slots__ = ()

    def broadcast(self, topic: str, event: str, payload: Any) -> bytes:
        data = self.serializer.encode_broadcast(topic, event, payload)
        if isinstance(data, str):
            return text_frame(data)
        return frame(OP_BINARY, data)

    def wrap(self, data: str | bytes) -> bytes:
        if isinstance(data, str):
            return text_frame(data)
        return frame(OP_BINARY, data)


class DeflateWebSocketEncoder(FastlaneEncoder):
    """Fastlane encoder of connections that negotiated permessage-deflate: large broadcasts compressed once."""

    __slots__ = ()

    def broadcast(self, topic: str, event: str, payload: Any) -> bytes:
        data = self.serializer.encode_broadcast(topic, event, payload)
        return deflate_message(data)

    def wrap(self, data: str | bytes) -> bytes:
        return deflate_message(data)


def deflate_message(data: str | bytes) -> bytes:
    """One message as a WebSocket frame, compressed (RSV1) when it is big enough to gain from it."""
    if isinstance(data, str):
        raw = data.encode("utf-8")
        op = OP_TEXT
    else:
        raw = bytes(data)
        op = OP_BINARY
    if len(raw) >= frames.COMPRESS_THRESHOLD:
        return frames.deflate_frame(op, raw)
    return frame(op, raw)


def encoder_for(serializer: Serializer, deflate: bool = False) -> FastlaneEncoder:
    """The shared WebSocket encoder of ``serializer`` (one per serializer and compression, per process)."""
    return (DeflateWebSocketEncoder if deflate else WebSocketEncoder).of(serializer)


# -- the handshake -------------------------------------------------------------------------
