"""The client over phoenix.js's LongPoll transport (plain HTTP): :class:`LongPollClient`.

Same API and protocol core as :class:`~phx_gevent.client.Client`; only the
transport differs (PROTOCOL.md 4): a GET without a token creates the session
(status 410 with a token: the transport is open), GETs with the token poll
for frames (200 with messages, 204 when none came), frames to the server go
in ndjson POSTs of at most 100 lines (JSON text, or base64 of a binary frame)
with at most one POST in flight. A 410 while holding a token means the
session is gone (closed as 3410, then reconnected); 403 closes as 1008; any
other outcome as 1011. No heartbeats over long-poll, as in phoenix.js. The
server cannot send binary frames over long-poll.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlencode

from .threaded import Client

__all__ = ["LongPollClient"]

log = logging.getLogger(__name__)

_MAX_LINES = 100


class _Gone(Exception):
    """The long-poll session ended: (code, reason)."""


class LongPollClient(Client):
    """:class:`~phx_gevent.client.Client` over HTTP long-polling (``longpoll=True`` mounts).

    ``url`` is the socket's mount as for the WebSocket client (``ws://`` or
    ``http://``; ``/longpoll`` is added). ``poll_timeout``: seconds one HTTP
    request may take (phoenix.js's ``longpollerTimeout``, 20).
    """

    def __init__(self, url: str, params: Any = None, *, poll_timeout: float = 20.0, **options: Any) -> None:
        options.setdefault("heartbeat_interval", 0)  # phoenix.js skips heartbeats over long-poll
        self.poll_timeout = poll_timeout
        self._token: str | None = None
        self._session = 0  # bumped when a session ends: its poller and poster stop
        self._outbox: list[str] = []
        self._posting = False
        super().__init__(url, params, **options)

    def _endpoint(self, token: str | None) -> str:
        base = self.url
        for ws, http in (("wss://", "https://"), ("ws://", "http://")):
            if base.startswith(ws):
                base = http + base[len(ws) :]
        params = self.params() if callable(self.params) else (self.params or {})
        query = [*dict(params).items(), ("vsn", "2.0.0")]
        if token is not None:
            query.append(("token", token))
        return f"{base}/longpoll?{urlencode(query)}"

    def _request(self, method: str, token: str | None, body: bytes | None = None) -> dict[str, Any]:
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/x-ndjson"
        if token is None and self.auth_token is not None:
            headers["X-Phoenix-AuthToken"] = self.auth_token
        req = urllib.request.Request(self._endpoint(token), data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.poll_timeout) as resp:
                data = json.loads(resp.read())
        except (OSError, ValueError, urllib.error.URLError) as exc:
            raise _Gone(1011, f"{type(exc).__name__}: {exc}") from None
        if not isinstance(data, dict):
            raise _Gone(1011, "unexpected long-poll answer")
        return data

    # -- the transport (called by Client's I/O thread and by _perform) --------------------

    def _open(self) -> None:
        try:
            data = self._request("GET", None)
            if data.get("status") == 403:
                raise _Gone(1008, "forbidden")
            if data.get("status") != 410 or not isinstance(data.get("token"), str):
                raise _Gone(1011, f"unexpected status {data.get('status')!r}")
        except _Gone as gone:
            with self._lock:
                self.core.transport_closed(*gone.args)
                self._perform()
            return
        with self._lock:
            if self.core.state != "connecting":
                self.core.transport_closed(1000, "disconnected while connecting")
                self._perform()
                return
            self._token = data["token"]
            session = self._session
            self.core.transport_opened()
            self._perform()
        threading.Thread(target=self._poll, args=(session,), name=f"phx-longpoll {self.url}", daemon=True).start()

    def _current(self, session: int) -> bool:
        return session == self._session and self._token is not None

    def _poll(self, session: int) -> None:
        while self._current(session) and not self._stopped:
            try:
                data = self._request("GET", self._token)
                status = data.get("status")
                if not self._current(session):
                    return
                if status == 200:
                    for message in data.get("messages") or []:
                        with self._lock:
                            if not self._current(session):
                                return
                            self.core.receive(message)
                            self._perform()
                elif status == 410:
                    raise _Gone(3410, "session_gone")
                elif status == 403:
                    raise _Gone(1008, "forbidden")
                elif status != 204:
                    raise _Gone(1011, f"unexpected poll status {status!r}")
            except _Gone as gone:
                self._lost(session, *gone.args)
                return

    def _lost(self, session: int, code: Any, reason: Any) -> None:
        with self._lock:
            if session != self._session:
                return
            self._session += 1
            self._token = None
            self._outbox.clear()  # phoenix.js discards what it had not posted
            self.core.transport_closed(code, reason)
            self._perform()

    def _send(self, data: str | bytes) -> None:
        # Under the lock (from _perform): queue, and start the single poster if idle.
        line = data if isinstance(data, str) else base64.b64encode(data).decode("ascii")
        self._outbox.append(line)
        if not self._posting:
            self._posting = True
            threading.Thread(target=self._post, args=(self._session,), daemon=True).start()

    def _post(self, session: int) -> None:
        while True:
            with self._lock:
                if not self._current(session) or not self._outbox:
                    self._posting = False
                    return
                batch, self._outbox = self._outbox[:_MAX_LINES], self._outbox[_MAX_LINES:]
                token = self._token
            try:
                data = self._request("POST", token, "\n".join(batch).encode("utf-8"))
                if data.get("status") != 200:
                    raise _Gone(1011, f"post status {data.get('status')!r}")
            except _Gone as gone:
                with self._lock:
                    self._posting = False
                self._lost(session, *gone.args)
                return

    def _close_transport(self, code: Any, reason: Any) -> None:
        # Nothing to tell the server: the session expires once nobody polls it.
        if self._token is not None:
            self._lost(self._session, code, reason)

    def _perform(self) -> None:
        for action in self.core.take_actions():
            kind = action[0]
            if kind == "send":
                if self._token is not None:
                    self._send(action[1])
            elif kind == "open":
                self._open_wanted = True
            elif kind == "close":
                self._close_transport(action[1], action[2])
        self._wake()
