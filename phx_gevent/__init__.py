"""phx_gevent: Phoenix Channels for Flask on gevent.

The official phoenix.js client works unchanged against a Flask app: sockets
that multiplex topic-routed channels, replies, pushes, broadcasts across
workers and machines. This module only re-exports the public API; importing
it never monkey-patches anything.
"""

from .channel import (
    CLOSED,
    DISCONNECTED,
    DRAINING,
    DUPLICATE_JOIN,
    INACTIVE,
    LEFT,
    NORMAL,
    SHUTDOWN,
    TIMEOUT,
    Channel,
    NoReply,
    Reply,
    SocketRef,
    Stop,
    broadcast,
    broadcast_from,
    error,
    is_graceful,
    noreply,
    ok,
    push,
    reply,
    socket_ref,
    stop,
)
from .channels.process import Broadcast, CallFrom
from .emitter import Emitter
from .endpoint import Endpoint
from .errors import (
    BroadcastTimeout,
    CallbackReturnError,
    CallTimeout,
    ChannelError,
    ChannelExited,
    EmitterError,
    EmitterUnavailable,
    NotMonkeyPatchedError,
    PayloadError,
    PhxError,
    TokenError,
    TokenExpired,
    TokenInvalid,
    TokenMissing,
)
from .presence import Presence
from .server import make_server, serve
from .socket import Refuse, Socket, SocketState, channel, refuse
from .transports.http import csrf_token

__version__ = "0.1.0"

__all__ = [
    "Broadcast",
    "BroadcastTimeout",
    "CLOSED",
    "CallFrom",
    "CallTimeout",
    "CallbackReturnError",
    "Channel",
    "ChannelError",
    "ChannelExited",
    "DISCONNECTED",
    "DRAINING",
    "DUPLICATE_JOIN",
    "Emitter",
    "EmitterError",
    "EmitterUnavailable",
    "Endpoint",
    "INACTIVE",
    "LEFT",
    "NORMAL",
    "NoReply",
    "NotMonkeyPatchedError",
    "PayloadError",
    "PhxError",
    "Presence",
    "Refuse",
    "Reply",
    "SHUTDOWN",
    "Socket",
    "SocketRef",
    "SocketState",
    "Stop",
    "TIMEOUT",
    "TokenError",
    "TokenExpired",
    "TokenInvalid",
    "TokenMissing",
    "broadcast",
    "broadcast_from",
    "channel",
    "csrf_token",
    "error",
    "is_graceful",
    "make_server",
    "noreply",
    "ok",
    "push",
    "refuse",
    "reply",
    "serve",
    "socket_ref",
    "stop",
]
