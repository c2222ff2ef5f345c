"""Test helpers for your own channels, in the spirit of ``Phoenix.ChannelTest``.

They run your real ``connect``, routing, ``join`` and callbacks through the
real connection rules and serializer, on an in-memory transport: no server,
no network. Every assertion waits with a timeout::

    from phx_gevent.testing import ChannelTest

    def test_ping():
        client = ChannelTest(endpoint).connect({"user": "alice"})
        room = client.join("room:lobby")
        assert room.reply.status == "ok"
        ref = room.push("ping", {"x": 1})
        assert room.assert_reply(ref, "ok") == {"x": 1}
        endpoint.broadcast("room:lobby", "new_msg", {"body": "hi"})
        assert room.assert_push("new_msg") == {"body": "hi"}

Phoenix's ``ChannelTest`` names map as: ``connect/3`` → :meth:`ChannelTest.connect`,
``socket/3`` → :meth:`ChannelTest.socket`, ``join``/``subscribe_and_join`` →
:meth:`TestClient.join`/:meth:`TestClient.subscribe_and_join`, ``push``,
``leave``, ``close``, ``broadcast_from`` and the ``assert_*``/``refute_*``
macros → the :class:`TestChannel` methods of the same names.

Run them with gevent's monkey-patching active (``gevent.monkey.patch_all()``
at the top of ``conftest.py``) if your channels do I/O.
"""

from __future__ import annotations

import itertools
from typing import Any

import gevent
from gevent.event import Event

from .channel import CLOSED, Reply
from .connection import Connection
from .endpoint import Endpoint
from .errors import PhxError
from .mount import SocketMount
from .serializers import V2, FastlaneEncoder, Message, Serializer, decode_server_frame, negotiate
from .socket import Refuse, SocketState

__all__ = ["ChannelTest", "TestClient", "TestChannel", "MemoryTransport", "ConnectRefused"]

_MISSING = object()


class ConnectRefused(PhxError, AssertionError):
    """``connect`` refused the connection.

    ``reason`` is what ``refuse(reason)`` gave (the error handler's input), or
    ``None`` for a plain refusal (the handshake would have been a 403).
    """

    def __init__(self, message: str, reason: Any = None) -> None:
        super().__init__(message)
        self.reason = reason


class _Encoder(FastlaneEncoder):
    __slots__ = ()

    def broadcast(self, topic: str, event: str, payload: Any) -> Any:
        return self.serializer.encode_broadcast(topic, event, payload)

    def wrap(self, data: Any) -> Any:
        return data


class _Writer:
    __slots__ = ("transport", "encoder")

    def __init__(self, transport: MemoryTransport, serializer: Serializer) -> None:
        self.transport = transport
        self.encoder = _Encoder.of(serializer)

    def write(self, frame: Any) -> None:
        self.transport.record(frame)


class MemoryTransport:
    """A transport that keeps every encoded frame in memory, for assertions.

    ``frames`` holds what the connection wrote (``str`` for text, ``bytes``
    for binary); :meth:`messages` decodes V2 frames into ``Message`` objects.
    """

    name = "memory"

    def __init__(self, serializer: Serializer = V2) -> None:
        self.serializer = serializer
        self.writer = _Writer(self, serializer)
        self.frames: list[Any] = []
        self.closed: tuple[int | None, str] | None = None
        self._changed = Event()

    def record(self, frame: Any) -> None:
        if self.closed is None:
            self.frames.append(frame)
            self._changed.set()

    def send(self, data: Any) -> None:
        self.record(data)

    def close(self, code: int | None = None, reason: str = "") -> None:
        self.closed = (code, reason)
        self._changed.set()

    def messages(self) -> list[Message]:
        """Every frame so far, decoded (V2 JSON and binary frames)."""
        return [decode_server_frame(f) for f in self.frames]

    def wait_for(self, pred: Any, timeout: float) -> Any:
        """Wait until ``pred(messages)`` returns something truthy and return it; AssertionError on timeout."""
        with gevent.Timeout(timeout, False):
            while True:
                self._changed.clear()
                value = pred(self.messages())
                if value:
                    return value
                # Re-check now and then: some conditions write no frame.
                self._changed.wait(0.01)
        raise AssertionError(f"timed out after {timeout}s; frames so far: {self.messages()!r}")


class ChannelTest:
    """Entry point: ``ChannelTest(endpoint, "/socket").connect(params)``."""

    def __init__(self, endpoint: Endpoint, path: str | None = None) -> None:
        mounts = [m for m in endpoint.mounts if path is None or m.path == path]
        if not mounts:
            raise ValueError(f"no socket mounted at {path!r}")
        self.mount: SocketMount = mounts[0]

    def connect(
        self, params: dict[str, Any] | None = None, connect_info: dict[str, Any] | None = None, vsn: str = "2.0.0"
    ) -> TestClient:
        """Run the real ``connect`` and ``id`` (the transports' connect path).

        Raises :class:`ConnectRefused` when refused (its ``reason`` is what
        ``refuse(reason)`` gave, ``None`` for a plain refusal) and
        :class:`~phx_gevent.errors.CallbackReturnError` for a wrong return value.
        """
        params = {**(params or {}), "vsn": vsn}
        result = self.mount.connect("websocket", params, dict(connect_info or {}))
        if isinstance(result, Refuse):
            raise ConnectRefused(f"connect refused the connection with reason {result.reason!r}", result.reason)
        if result is None:
            raise ConnectRefused("connect refused the connection (403)")
        return self._client(result)

    def socket(self, id: str | None = None, assigns: dict[str, Any] | None = None, vsn: str = "2.0.0") -> TestClient:
        """A client whose socket has ``id`` and ``assigns``, without running ``connect`` (Phoenix's ``socket/3``).

        For testing channels alone: ``ChannelTest(endpoint).socket("user:1",
        {"user": "ann"}).join("room:1")``. Raises ``ValueError`` for a ``vsn``
        the mount does not serve.
        """
        serializer = negotiate(vsn, self.mount.serializers)
        if serializer is None:
            raise ValueError(f"unsupported vsn {vsn!r}")
        socket = self.mount.new_socket("websocket", serializer)
        socket.assign(dict(assigns or {}))
        socket.id = id
        return self._client(socket)

    def _client(self, socket: SocketState) -> TestClient:
        transport = MemoryTransport(socket.serializer)
        conn = Connection(self.mount, socket, socket.serializer, transport)
        conn.start()
        return TestClient(conn, transport)


class TestClient:
    """One connected client: join channels, send heartbeats, close."""

    __test__ = False  # not a pytest test class

    def __init__(self, conn: Connection, transport: MemoryTransport) -> None:
        self.conn = conn
        self.transport = transport
        self._refs = itertools.count(1)
        #: Broadcasts seen on topics joined with :meth:`subscribe_and_join`: ``(topic, event, payload)``.
        self.broadcasts: list[tuple[str, str, Any]] = []
        self._subscribed: set[str] = set()

    @property
    def socket(self) -> SocketState:
        """The connection's socket struct (its assigns are those ``connect`` set)."""
        return self.conn.socket

    def next_ref(self) -> str:
        return str(next(self._refs))

    def join(self, topic: str, payload: Any = None, timeout: float = 5.0) -> TestChannel:
        """Join ``topic``; the returned channel's ``reply`` holds the join reply (ok or error).

        What the join queued (``after_join``) has run when this returns, unless it waits.
        """
        ref = self.next_ref()
        self.conn.handle(Message(ref, ref, topic, "phx_join", {} if payload is None else payload))
        gevent.sleep(0)  # the channel's greenlet runs what the join queued first
        reply = _wait_reply(self.transport, ref, timeout)
        return TestChannel(self, topic, ref, Reply(reply["status"], reply["response"]))

    def subscribe_and_join(self, topic: str, payload: Any = None, timeout: float = 5.0) -> TestChannel:
        """Subscribe the test to ``topic``, then :meth:`join` it (Phoenix's ``subscribe_and_join``).

        Every broadcast on the topic from then on (from the channel or
        anywhere else) is recorded for :meth:`TestChannel.assert_broadcast`,
        except those sent with :meth:`TestChannel.broadcast_from`.
        """
        if topic not in self._subscribed:
            self._subscribed.add(topic)
            self.conn.mount.pubsub.connect(self._on_broadcast, topic)
        return self.join(topic, payload, timeout)

    def _on_broadcast(self, topic: str, *, event: str, payload: Any, from_: Any = None) -> None:
        if from_ is not self:
            self.broadcasts.append((topic, event, payload))
            self.transport._changed.set()

    def close(self, reason: Any = None) -> None:
        """End the connection: every channel terminates (with ``CLOSED`` by default)."""
        for topic in self._subscribed:
            self.conn.mount.pubsub.disconnect(self._on_broadcast, topic)
        self._subscribed.clear()
        self.conn.terminate(reason)

    def assert_closed(self, timeout: float = 1.0) -> tuple[int | None, str]:
        """Wait until the server closed the connection (e.g. a disconnect); returns (code, reason)."""
        self.transport.wait_for(lambda _: self.transport.closed, timeout)
        assert self.transport.closed is not None
        return self.transport.closed


class TestChannel:
    """A joined (or refused) channel of a :class:`TestClient`."""

    __test__ = False

    def __init__(self, client: TestClient, topic: str, join_ref: str, reply: Reply) -> None:
        self.client = client
        self.topic = topic
        self.join_ref = join_ref
        #: The join reply.
        self.reply = reply
        self._seen = 0
        self._seen_broadcasts = 0
        self._proc = client.conn.channels.get(topic) if reply.status == "ok" else None

    @property
    def joined(self) -> bool:
        """True when the join was accepted."""
        return self.reply.status == "ok"

    @property
    def channel_pid(self) -> Any:
        """The channel process (``socket.channel_pid``): ``call``, ``cast``, ``send`` into it; ``None`` if refused."""
        return self._proc

    @property
    def socket(self) -> SocketState | None:
        """The channel's socket struct (its assigns as the channel left them); ``None`` if refused."""
        return None if self._proc is None else self._proc.socket

    def push(self, event: str, payload: Any = None) -> str:
        """Send ``event`` to ``handle_in``; returns the ref for :meth:`assert_reply`."""
        ref = self.client.next_ref()
        self.client.conn.handle(Message(self.join_ref, ref, self.topic, event, {} if payload is None else payload))
        return ref

    def leave(self) -> str:
        """Send ``phx_leave``; returns its ref."""
        return self.push("phx_leave")

    def close(self, timeout: float = 5.0) -> None:
        """End this channel alone as if its connection closed (Phoenix's ``close/1``).

        ``terminate`` runs with ``CLOSED`` after what is queued; the client
        gets no frame. Waits until the channel has ended (AssertionError
        after ``timeout``).
        """
        proc = self._proc
        if proc is None:
            return
        proc.transport_down(CLOSED)
        self.client.transport.wait_for(lambda _: not proc.alive, timeout)

    def broadcast_from(self, event: str, payload: Any) -> None:
        """Broadcast on the topic from the test (Phoenix's ``broadcast_from``): not recorded for assert_broadcast.

        The channel gets it like any broadcast (``handle_out`` if intercepted).
        """
        self.client.conn.mount.endpoint.broadcast_from(self.client, self.topic, event, payload)

    def assert_broadcast(self, event: str, payload: Any = _MISSING, timeout: float = 1.0) -> Any:
        """Wait for the next ``event`` broadcast on this topic (needs :meth:`TestClient.subscribe_and_join`)."""
        client = self.client
        if self.topic not in client._subscribed:
            raise AssertionError(f"assert_broadcast needs subscribe_and_join({self.topic!r})")

        def find(_: Any) -> Any:
            seen = client.broadcasts
            for i in range(self._seen_broadcasts, len(seen)):
                topic, ev, data = seen[i]
                if topic == self.topic and ev == event:
                    self._seen_broadcasts = i + 1
                    return (data,)
            return None

        (got,) = client.transport.wait_for(find, timeout)
        if payload is not _MISSING:
            assert got == payload, f"expected {event!r} broadcast {payload!r}, got {got!r}"
        return got

    def refute_broadcast(self, event: str, timeout: float = 0.1) -> None:
        """Assert that no ``event`` is broadcast on this topic within ``timeout`` seconds."""
        try:
            got = self.assert_broadcast(event, timeout=timeout)
        except AssertionError as exc:
            if "timed out" in str(exc):
                return
            raise
        raise AssertionError(f"unexpected {event!r} broadcast: {got!r}")

    def refute_reply(self, ref: str, timeout: float = 0.1) -> None:
        """Assert that ``ref`` gets no reply within ``timeout`` seconds."""
        try:
            got = _wait_reply(self.client.transport, ref, timeout)
        except AssertionError:
            return
        raise AssertionError(f"unexpected reply to {ref!r}: {got!r}")

    def assert_reply(self, ref: str, status: str = "ok", response: Any = _MISSING, timeout: float = 1.0) -> Any:
        """Wait for the reply to ``ref``; check its status (and response if given); return the response."""
        reply = _wait_reply(self.client.transport, ref, timeout)
        assert reply["status"] == status, f"expected status {status!r}, got {reply!r}"
        if response is not _MISSING:
            assert reply["response"] == response, f"expected response {response!r}, got {reply['response']!r}"
        return reply["response"]

    def assert_push(self, event: str, payload: Any = _MISSING, timeout: float = 1.0) -> Any:
        """Wait for the next ``event`` pushed or broadcast on this topic (after those already asserted)."""

        def find(messages: list[Message]) -> Any:
            for i in range(self._seen, len(messages)):
                m = messages[i]
                if m.topic == self.topic and m.event == event:
                    self._seen = i + 1
                    return (m.payload,)
            return None

        (got,) = self.client.transport.wait_for(find, timeout)
        if payload is not _MISSING:
            assert got == payload, f"expected {event!r} payload {payload!r}, got {got!r}"
        return got

    def refute_push(self, event: str, timeout: float = 0.1) -> None:
        """Assert that no ``event`` arrives within ``timeout`` seconds."""
        try:
            got = self.assert_push(event, timeout=timeout)
        except AssertionError:
            return
        raise AssertionError(f"unexpected {event!r} push: {got!r}")

    def assert_close(self, timeout: float = 1.0) -> None:
        """Wait for ``phx_close`` (a graceful stop)."""
        self.assert_push("phx_close", timeout=timeout)

    def assert_error(self, timeout: float = 1.0) -> None:
        """Wait for ``phx_error`` (a crash)."""
        self.assert_push("phx_error", timeout=timeout)


def _wait_reply(transport: MemoryTransport, ref: str, timeout: float) -> dict[str, Any]:
    def find(messages: list[Message]) -> Any:
        for m in messages:
            if m.event == "phx_reply" and m.ref == ref:
                return m.payload
        return None

    return transport.wait_for(find, timeout)
