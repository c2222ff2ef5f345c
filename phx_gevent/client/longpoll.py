"""The client over phoenix.js's LongPoll transport (plain HTTP): :class:`LongPollClient`.

Same API and protocol core as :class:`~phx_gevent.client.Client`; only the
transport differs (:mod:`phx_gevent.client.poller`, PROTOCOL.md 4). No
heartbeats over long-poll, as in phoenix.js.
"""

from __future__ import annotations

from typing import Any

from .threaded import Client

__all__ = ["LongPollClient"]


class LongPollClient(Client):
    """:class:`~phx_gevent.client.Client` over HTTP long-polling (``longpoll=True`` mounts).

    ``url`` is the socket's mount as for the WebSocket client (``ws://`` or
    ``http://``; ``/longpoll`` is added). ``poll_timeout``: seconds one HTTP
    request may take (phoenix.js's ``longpollerTimeout``, 20).
    """

    def __init__(self, url: str, params: Any = None, *, poll_timeout: float = 20.0, **options: Any) -> None:
        super().__init__(url, params, poll_timeout=poll_timeout, transport="longpoll", **options)
