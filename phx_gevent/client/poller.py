"""phoenix.js's LongPoll transport for the threaded client: plain HTTP, one session at a time.

PROTOCOL.md 4: a GET without a token creates the session (status 410 with a
token: the transport is open), GETs with the token poll for frames (200 with
messages, 204 when none came), frames to the server go in ndjson POSTs of at
most 100 lines (JSON text, or base64 of a binary frame) with at most one POST
in flight. A 410 while holding a token means the session is gone (closed as
3410, then reconnected); 403 closes as 1008; any other outcome as 1011. The
server cannot send binary frames over long-poll.

Used by :class:`~phx_gevent.client.LongPollClient`, and by
:class:`~phx_gevent.client.Client` once it fell back to long-poll.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import urlencode

from .core import SocketCore

__all__ = ["LongPollTransport", "http_url"]

_MAX_LINES = 100


class _Gone(Exception):
    """The long-poll session ended: (code, reason)."""


def http_url(url: str) -> str:
    """``url`` with a ``ws://``/``wss://`` scheme turned into ``http://``/``https://``."""
    for ws, http in (("wss://", "https://"), ("ws://", "http://")):
        if url.startswith(ws):
            return http + url[len(ws) :]
    return url


class LongPollTransport:
    """One long-poll connection at a time for a client's :class:`~phx_gevent.client.core.SocketCore`.

    ``url``: the socket's mount (``/longpoll`` is added); ``query()``: the
    connect params as query pairs, evaluated per request; ``lock`` guards
    ``core``; ``perform()`` (called under ``lock``) carries out the core's
    actions; ``running()`` is false once the client is closed. ``open``
    blocks for one request; polling and posting run in threads of their own.
    """

    def __init__(
        self,
        core: SocketCore,
        url: str,
        query: Callable[[], Sequence[tuple[str, str]]],
        *,
        lock: AbstractContextManager[Any],
        perform: Callable[[], None],
        running: Callable[[], bool],
        headers: dict[str, str],
        auth_token: str | None,
        poll_timeout: float,
    ) -> None:
        self.core = core
        self.url = http_url(url) + "/longpoll"
        self.query = query
        self.lock = lock
        self.perform = perform
        self.running = running
        self.headers = headers
        self.auth_token = auth_token
        self.poll_timeout = poll_timeout
        self.token: str | None = None
        self._session = 0  # bumped when a session ends: its poller and poster stop
        self._outbox: list[str] = []
        self._posting = False

    @property
    def is_open(self) -> bool:
        """True while a session is open."""
        return self.token is not None

    def _request(self, method: str, token: str | None, body: bytes | None = None) -> dict[str, Any]:
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/x-ndjson"
        if token is None and self.auth_token is not None:
            headers["X-Phoenix-AuthToken"] = self.auth_token
        query = [*self.query(), *([("token", token)] if token is not None else [])]
        req = urllib.request.Request(f"{self.url}?{urlencode(query)}", data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.poll_timeout) as resp:
                data = json.loads(resp.read())
        except (OSError, ValueError, urllib.error.URLError) as exc:
            raise _Gone(1011, f"{type(exc).__name__}: {exc}") from None
        if not isinstance(data, dict):
            raise _Gone(1011, "unexpected long-poll answer")
        return data

    def open(self) -> None:
        """Create a session (blocking), report the outcome to the core, and start polling."""
        try:
            data = self._request("GET", None)
            if data.get("status") == 403:
                raise _Gone(1008, "forbidden")
            if data.get("status") != 410 or not isinstance(data.get("token"), str):
                raise _Gone(1011, f"unexpected status {data.get('status')!r}")
        except _Gone as gone:
            with self.lock:
                self.core.transport_closed(*gone.args)
                self.perform()
            return
        with self.lock:
            if self.core.state != "connecting":
                self.core.transport_closed(1000, "disconnected while connecting")
                self.perform()
                return
            self.token = data["token"]
            session = self._session
            self.core.transport_opened()
            self.perform()
        threading.Thread(target=self._poll, args=(session,), name=f"phx-longpoll {self.url}", daemon=True).start()

    def _current(self, session: int) -> bool:
        return session == self._session and self.token is not None

    def _poll(self, session: int) -> None:
        while self._current(session) and self.running():
            try:
                data = self._request("GET", self.token)
                status = data.get("status")
                if not self._current(session):
                    return
                if status == 200:
                    for message in data.get("messages") or []:
                        with self.lock:
                            if not self._current(session):
                                return
                            self.core.receive(message)
                            self.perform()
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
        with self.lock:
            if session != self._session:
                return
            self._session += 1
            self.token = None
            self._outbox.clear()  # phoenix.js discards what it had not posted
            self.core.transport_closed(code, reason)
            self.perform()

    def send(self, data: str | bytes) -> None:
        """Queue one frame (under ``lock``) and start the single poster if idle."""
        line = data if isinstance(data, str) else base64.b64encode(data).decode("ascii")
        self._outbox.append(line)
        if not self._posting:
            self._posting = True
            threading.Thread(target=self._post, args=(self._session,), daemon=True).start()

    def _post(self, session: int) -> None:
        while True:
            with self.lock:
                if not self._current(session) or not self._outbox:
                    self._posting = False
                    return
                batch, self._outbox = self._outbox[:_MAX_LINES], self._outbox[_MAX_LINES:]
                token = self.token
            try:
                data = self._request("POST", token, "\n".join(batch).encode("utf-8"))
                if data.get("status") != 200:
                    raise _Gone(1011, f"post status {data.get('status')!r}")
            except _Gone as gone:
                with self.lock:
                    self._posting = False
                self._lost(session, *gone.args)
                return

    def close(self, code: Any, reason: Any) -> None:
        """End the session (under ``lock``); nothing to tell the server: it expires once nobody polls."""
        if self.token is not None:
            self._lost(self._session, code, reason)
