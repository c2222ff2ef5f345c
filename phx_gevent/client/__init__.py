"""A Python client for Phoenix Channels (phoenix.js's semantics): ``phx_gevent.client``.

:class:`Client` (websocket-client in a background thread; works with or
without gevent's patching; ``long_poll_fallback=`` falls back to long-poll as
phoenix.js does) and :class:`LongPollClient` (HTTP long-polling only,
:mod:`~phx_gevent.client.poller`) on top of the protocol as a state machine
with no I/O (:mod:`~phx_gevent.client.core`: the socket;
:mod:`~phx_gevent.client.channel`: channels and pushes;
:mod:`~phx_gevent.client.timers`) and :mod:`phx_gevent.client.wire`, the V2
frames and connect params; :class:`Presence` applies ``presence_state`` and
``presence_diff`` as phoenix.js's does. It speaks Phoenix's wire format, so it
talks to Phoenix servers as well as to phx_gevent. Needs the ``client`` extra
(``pip install 'phx_gevent[client]'``: websocket-client).
"""

from .core import (
    CLOSED,
    ERRORED,
    JOINED,
    JOINING,
    LEAVING,
    LONGPOLL,
    WEBSOCKET,
    Channel,
    Push,
    SocketCore,
    reconnect_after,
    rejoin_after,
)
from .longpoll import LongPollClient
from .presence import Presence, sync_diff, sync_state
from .threaded import Client, ClientChannel, ClientPush, Reply

__all__ = [
    "CLOSED",
    "ERRORED",
    "JOINED",
    "JOINING",
    "LEAVING",
    "LONGPOLL",
    "WEBSOCKET",
    "LongPollClient",
    "Channel",
    "Presence",
    "Client",
    "ClientChannel",
    "ClientPush",
    "Push",
    "Reply",
    "SocketCore",
    "reconnect_after",
    "rejoin_after",
    "sync_diff",
    "sync_state",
]
