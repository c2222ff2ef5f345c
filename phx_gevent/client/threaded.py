"""A Phoenix client over websocket-client, driven by one background thread (works patched or not).

::

    from phx_gevent.client import Client

    client = Client("ws://localhost:4000/socket", params={"user": "bot"})
    client.connect()
    room = client.channel("room:lobby")
    print(room.join().wait())                          # Reply(status='ok', response={...})
    room.on("new_msg", lambda payload, ref, join_ref: print(payload))
    print(room.push("ping", {"n": 1}).wait())
    client.close()

The protocol is :mod:`phx_gevent.client.core` (phoenix.js's semantics); this
module only moves frames and time. One thread per client reads the socket,
runs the timers and the callbacks; the caller's threads may use the client
at any time (one lock). Under gevent's monkey-patching the thread is a
greenlet and everything stays cooperative. Callbacks run in the client's
thread: keep them short, and never wait on a reply inside one.
"""

from __future__ import annotations

import base64
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple
from urllib.parse import urlencode

from . import wire
from .core import LONGPOLL, WEBSOCKET, Channel, Push, SocketCore, reconnect_after, rejoin_after
from .poller import LongPollTransport

try:
    import websocket  # websocket-client
except ImportError:  # pragma: no cover - the "client" extra
    websocket = None  # type: ignore[assignment]

__all__ = ["Client", "ClientChannel", "ClientPush", "Reply"]

log = logging.getLogger(__name__)


class Reply(NamedTuple):
    """The outcome of a push: ``status`` ("ok", "error", any server status, or "timeout") and ``response``."""

    status: str
    response: Any


class ClientPush:
    """A push made through a :class:`Client` (thread-safe view of :class:`~phx_gevent.client.core.Push`)."""

    def __init__(self, client: Client, push: Push) -> None:
        self._client = client
        self._push = push
        self._done = threading.Event()
        self._reply: Reply | None = None
        with client._lock:
            push.receive_any(self._record)

    def _record(self, status: str, response: Any) -> None:
        self._reply = Reply(status, response)
        self._done.set()

    @property
    def ref(self) -> str | None:
        """The ref of the last send."""
        return self._push.ref

    def receive(self, status: str, callback: Callable[[Any], None]) -> ClientPush:
        """Call ``callback(response)`` (in the client's thread) when a reply with ``status`` arrives."""
        with self._client._lock:
            self._push.receive(status, callback)
        return self

    def wait(self, timeout: float | None = None) -> Reply:
        """Block until the reply (or the push's own timeout) arrives; returns the :class:`Reply`.

        ``timeout`` bounds this wait (default: the push's timeout plus 5 s);
        raises ``TimeoutError`` past it. Never call it inside a callback.
        """
        bound = self._push.timeout + 5.0 if timeout is None else timeout
        if not self._done.wait(bound):
            raise TimeoutError(f"no outcome for {self._push.event!r} on {self._push.channel.topic!r} within {bound}s")
        assert self._reply is not None
        return self._reply


class ClientChannel:
    """A channel of a :class:`Client` (thread-safe view of :class:`~phx_gevent.client.core.Channel`)."""

    def __init__(self, client: Client, channel: Channel) -> None:
        self._client = client
        self._channel = channel

    def __repr__(self) -> str:
        return repr(self._channel)

    @property
    def topic(self) -> str:
        """The channel's topic."""
        return self._channel.topic

    @property
    def state(self) -> str:
        """``closed``, ``joining``, ``joined``, ``errored`` or ``leaving``."""
        return self._channel.state

    @property
    def join_ref(self) -> str | None:
        """The ref of the current join."""
        return self._channel.join_ref

    @property
    def offset(self) -> str | None:
        """With ``recover=True``: the offset of the last message received (sent as ``since`` on rejoin)."""
        return self._channel.offset

    @offset.setter
    def offset(self, value: str | None) -> None:
        # Resume from an offset stored elsewhere (set before join()).
        with self._client._lock:
            self._channel.offset = value

    @property
    def recovered(self) -> bool | None:
        """With ``recover=True``: the last join reply's ``recovered`` (``False``: refetch), else ``None``."""
        return self._channel.recovered

    def join(self, timeout: float | None = None) -> ClientPush:
        """Join (rejoins are automatic); the join's push. Raises ``RuntimeError`` when called twice."""
        return self._client._call(lambda: self._channel.join(timeout))

    def push(self, event: str, payload: Any = None, timeout: float | None = None) -> ClientPush:
        """Send ``event`` (JSON value or bytes), buffered until joined; the push, to wait on or hook."""
        return self._client._call(lambda: self._channel.push(event, payload, timeout))

    def leave(self, timeout: float | None = None) -> ClientPush:
        """Leave the channel; it closes on the reply (or its timeout)."""
        return self._client._call(lambda: self._channel.leave(timeout))

    def on(self, event: str, callback: Callable[..., None]) -> int:
        """Call ``callback(payload, ref, join_ref)`` in the client's thread for every ``event``."""
        with self._client._lock:
            return self._channel.on(event, callback)

    def off(self, event: str, ref: int | None = None) -> None:
        """Remove bindings of ``event``."""
        with self._client._lock:
            self._channel.off(event, ref)


class Client:
    """A phoenix.js-compatible client: one socket, many channels, its own thread.

    ``url``
        The socket's mount, e.g. ``ws://host:4000/socket`` (``/websocket``
        and the query are added) or ``wss://...``.
    ``params``
        Connect params (a dict, or a function returning one, evaluated at
        every connection), sent in the query string with ``vsn=2.0.0``;
        nested dicts and lists as phoenix.js and Plug nest them
        (:func:`~phx_gevent.client.wire.query_params`).
    ``auth_token``
        phoenix.js's ``authToken``: sent in ``Sec-WebSocket-Protocol``.
    ``heartbeat_interval``, ``timeout``, ``reconnect_after``, ``rejoin_after``
        As :class:`~phx_gevent.client.core.SocketCore` (phoenix.js's defaults).
    ``headers``, ``connect_timeout``
        Extra handshake headers; seconds for one connection attempt.
    ``long_poll_fallback``
        Seconds (phoenix.js's ``longPollFallbackMs``): fall back to long-poll
        when the WebSocket does not open, or does not answer a first
        heartbeat, within this time (see docs/python-client.md). Default
        off. Raises ``ConfigurationError`` for a value in milliseconds.
    ``poll_timeout``
        Seconds one long-poll request may take (phoenix.js's ``longpollerTimeout``).
    ``transport``
        ``"websocket"`` (default) or ``"longpoll"`` (what :class:`LongPollClient` sets).
    """

    def __init__(
        self,
        url: str,
        params: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
        *,
        auth_token: str | None = None,
        heartbeat_interval: float = 30.0,
        timeout: float = 10.0,
        reconnect_after: Callable[[int], float] = reconnect_after,
        rejoin_after: Callable[[int], float] = rejoin_after,
        headers: Mapping[str, str] | None = None,
        connect_timeout: float = 10.0,
        long_poll_fallback: float | None = None,
        poll_timeout: float = 20.0,
        transport: str = WEBSOCKET,
    ) -> None:
        if websocket is None:  # pragma: no cover
            raise ImportError("the client needs websocket-client: pip install 'phx_gevent[client]'")
        self.url = url.rstrip("/")
        self.params = params
        self.auth_token = auth_token
        self.headers = dict(headers or {})
        self.connect_timeout = connect_timeout
        self._lock = threading.RLock()
        self.core = SocketCore(
            time.monotonic,
            heartbeat_interval=heartbeat_interval,
            timeout=timeout,
            reconnect_after=reconnect_after,
            rejoin_after=rejoin_after,
            transport=transport,
            long_poll_fallback=long_poll_fallback,
        )
        self.poll_timeout = poll_timeout
        self._longpoll = LongPollTransport(
            self.core,
            self.url,
            self._query,
            lock=self._lock,
            perform=self._perform,
            running=lambda: not self._stopped,
            headers=self.headers,
            auth_token=auth_token,
            poll_timeout=poll_timeout,
        )
        self._ws: Any = None
        self._closing: tuple[Any, Any] | None = None
        self._stopped = False
        self._open_wanted = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"phx-client {self.url}", daemon=True)
        self._thread.start()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the API --------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect now, and reconnect with phoenix.js's backoff whenever the connection is lost."""
        self._call(self.core.connect)

    def disconnect(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection and stop reconnecting (``connect()`` again to resume)."""
        self._call(lambda: self.core.disconnect(code, reason))

    def channel(
        self, topic: str, params: Any = None, *, recover: bool = False, last: int | None = None
    ) -> ClientChannel:
        """A new channel for ``topic`` (``params``: the join payload, or a function returning it).

        ``recover=True``: history recovery on rejoin (``since``), and ``last``
        messages on the first join, as docs/recovery.md's phoenix.js snippet;
        see docs/python-client.md. Raises ``TypeError`` when ``recover`` is
        set and ``params`` is not a dict, ``ValueError`` for a bad ``last``.
        """
        with self._lock:
            return ClientChannel(self, self.core.channel(topic, params, recover=recover, last=last))

    def on_open(self, callback: Callable[[], None]) -> None:
        """``callback()`` in the client's thread each time the socket opens."""
        with self._lock:
            self.core.on_open(callback)

    def on_close(self, callback: Callable[[Any, Any], None]) -> None:
        """``callback(code, reason)`` in the client's thread each time the socket closes."""
        with self._lock:
            self.core.on_close(callback)

    def on_message(self, callback: Callable[[Any], None]) -> None:
        """``callback(message)`` in the client's thread for every frame received (a decoded ``Message``)."""
        with self._lock:
            self.core.on_message(callback)

    @property
    def connected(self) -> bool:
        """True while the connection (WebSocket or long-poll) is open."""
        return self.core.connected

    @property
    def transport(self) -> str:
        """``"websocket"``, or ``"longpoll"`` (a :class:`LongPollClient`, or after a fallback)."""
        return self.core.transport

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect and end the client's thread (within ``timeout`` seconds)."""
        self.disconnect()
        deadline = time.monotonic() + timeout
        while self.core.state not in ("closed",) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stopped = True
        self._wake()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        for s in (self._wake_r, self._wake_w):
            s.close()

    # -- internals ------------------------------------------------------------------------

    def _call(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            result = fn()
            self._perform()
        if isinstance(result, Push):
            return ClientPush(self, result)
        return result

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _perform(self) -> None:
        # Under the lock: carry out what the core asked for, in order.
        for action in self.core.take_actions():
            kind = action[0]
            if kind == "send":
                ws = self._ws
                if ws is None:
                    if self._longpoll.is_open:
                        self._longpoll.send(action[1])
                    continue
                data = action[1]
                try:
                    if isinstance(data, bytes):
                        ws.send_bytes(data)
                    else:
                        ws.send_text(data)
                except Exception as exc:  # the reader notices the broken socket and reports the close
                    log.debug("phx_gevent client: send failed: %s", exc)
            elif kind == "open":
                self._open_wanted = True
                self._wake()
            elif kind == "close":
                if self._ws is None:
                    self._longpoll.close(action[1], action[2])
                else:
                    self._close_transport(action[1], action[2])
        # Timers may have moved earlier: let the reader recompute its wait.
        self._wake()

    def _close_transport(self, code: Any, reason: Any) -> None:
        ws = self._ws
        if ws is None:
            return
        self._closing = (code, reason)
        try:
            ws.send_close(status=code, reason=str(reason or "").encode())
        except Exception:
            pass
        try:
            ws.sock.shutdown(socket.SHUT_RDWR)
        except Exception:
            pass

    def _query(self) -> list[tuple[str, str]]:
        params = self.params() if callable(self.params) else (self.params or {})
        return [*wire.query_params(params), ("vsn", "2.0.0")]

    def _open(self) -> None:
        if self.core.transport == LONGPOLL:
            self._longpoll.open()
            return
        timeout = self.connect_timeout
        fallback = self.core.fallback_deadline()
        if fallback is not None:
            # The attempt ends when the fallback is due (this thread runs the timers, so it must not block past it).
            timeout = max(0.01, min(timeout, fallback - time.monotonic()))
        subprotocols = None
        if self.auth_token is not None:
            token = base64.b64encode(self.auth_token.encode()).decode().rstrip("=")
            subprotocols = ["phoenix", "base64url.bearer.phx." + token]
        try:
            ws = websocket.create_connection(
                f"{self.url}/websocket?{urlencode(self._query())}",
                timeout=timeout,
                subprotocols=subprotocols,
                header=[f"{k}: {v}" for k, v in self.headers.items()],
                enable_multithread=True,
            )
        except Exception as exc:
            log.debug("phx_gevent client: connecting to %s failed: %s", self.url, exc)
            with self._lock:
                self.core.transport_closed(None, f"{type(exc).__name__}: {exc}")
                self._perform()
            return
        # Reads start only once select() saw data; the bound is for a frame that stops halfway.
        ws.settimeout(30.0)
        with self._lock:
            if self.core.state != "connecting":
                # disconnect() came while the handshake was under way.
                try:
                    ws.close(timeout=1)
                except Exception:
                    pass
                self.core.transport_closed(1000, "disconnected while connecting")
                self._perform()
                return
            self._ws = ws
            self._closing = None
            self.core.transport_opened()
            self._perform()

    def _transport_gone(self, code: Any, reason: Any) -> None:
        with self._lock:
            ws, self._ws = self._ws, None
            if self._closing is not None:
                code, reason = self._closing
                self._closing = None
            if ws is not None:
                try:
                    ws.sock.close() if ws.sock is not None else None
                except Exception:
                    pass
            self.core.transport_closed(code, reason)
            self._perform()

    def _run(self) -> None:
        while not self._stopped:
            try:
                self._step()
            except Exception:
                log.exception("phx_gevent client: I/O loop failed")
                time.sleep(0.1)
        ws = self._ws
        if ws is not None:
            try:
                ws.sock.close()
            except Exception:
                pass

    def _step(self) -> None:
        with self._lock:
            self.core.advance()
            self._perform()
            open_wanted, self._open_wanted = self._open_wanted, False
            deadline = self.core.next_deadline()
            ws = self._ws
        if open_wanted and ws is None:
            self._open()
            return
        wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
        sources: list[Any] = [self._wake_r]
        sock = ws.sock if ws is not None else None
        # TLS may hold decrypted bytes that select() cannot see.
        buffered = sock is not None and bool(getattr(sock, "pending", lambda: 0)())
        if sock is not None:
            sources.append(sock)
        try:
            readable, _, _ = select.select(sources, [], [], 0.0 if buffered else wait)
        except (OSError, ValueError):
            readable = [sock] if sock is not None else []  # closed under us: the read reports it
        if self._wake_r in readable:
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:
                pass
        if sock is not None and (buffered or sock in readable):
            self._read(ws)

    def _read(self, ws: Any) -> None:
        try:
            opcode, data = ws.recv_data()
        except Exception as exc:
            self._transport_gone(1006, f"{type(exc).__name__}: {exc}")
            return
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
            reason = data[2:].decode("utf-8", "replace")
            self._transport_gone(code, reason)
            return
        if opcode == websocket.ABNF.OPCODE_TEXT:
            data = data.decode("utf-8")
        elif opcode != websocket.ABNF.OPCODE_BINARY:
            return
        with self._lock:
            self.core.receive(data)
            self._perform()
