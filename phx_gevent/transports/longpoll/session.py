"""A long-poll session: the transport (and fastlane writer) of one :class:`~phx_gevent.connection.Connection`.

It buffers what the server sends until the client's next poll takes it, and
feeds the client's POSTed messages to the connection in order. A frame is
buffered as what the poll response lists: its JSON string literal in UTF-8,
made once per broadcast (the fastlane encoder) and shared by every session,
so a poll answer is a join of ready bytes. The HTTP side
is :mod:`.view`; how a request reaches the process that owns the session is
:mod:`phx_gevent.pubsub.request`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import AsyncResult, Event

from ... import supervise
from ...channel import INACTIVE
from ...connection import Connection
from ...flow import flow
from ...serializers import DecodeError, FastlaneEncoder, Message, Serializer, binary_reply_address, dumps
from ..writer import emit_slow_client_drop

if TYPE_CHECKING:  # pragma: no cover
    from .view import LongPoll

__all__ = ["BINARY_REFUSED", "GONE", "MISSING", "LongPollEncoder", "LongPollSession", "literal"]

log = logging.getLogger(__name__)

_monotonic = time.monotonic

#: The error reply a long-poll client gets instead of a binary reply.
BINARY_REFUSED = {"reason": "binary payloads are not supported over long-poll"}

# Poll outcomes: a session ended while the poll was held, or no such session.
GONE = 410
MISSING = 0


class _BinaryLog:
    """Rate-limited warning for binary frames that cannot go to long-poll clients."""

    def __init__(self) -> None:
        self.skipped = 0
        self.next_at = 0.0

    def skipped_one(self, what: str) -> None:
        self.skipped += 1
        now = _monotonic()
        if now >= self.next_at:
            self.next_at = now + 60.0
            log.warning(
                "phx_gevent: a binary %s was not sent to long-poll clients (phoenix.js cannot decode binary "
                "over long-poll); %d skipped so far",
                what,
                self.skipped,
            )


_binary_log = _BinaryLog()
_log_unencodable = supervise.LogLimiter()


def literal(frame: str) -> bytes | None:
    """``frame`` as a JSON string literal in UTF-8 (an item of a poll's ``messages``); ``None`` if it cannot be.

    Client data is checked at decode, so only server code can make a frame
    that is not valid UTF-8 (a lone surrogate in a pushed string): that frame
    is dropped (logged, rate-limited), never the rest of a poll.
    """
    try:
        return dumps(frame).encode("utf-8")
    except (UnicodeEncodeError, OverflowError, TypeError, ValueError):
        _log_unencodable.log(log, logging.ERROR, "phx_gevent: dropped a long-poll frame that is not valid UTF-8")
        return None


class LongPollEncoder(FastlaneEncoder):
    """Fastlane encoder for long-poll sessions: a broadcast becomes its :func:`literal`, or ``None`` for binary."""

    __slots__ = ()

    def broadcast(self, topic: str, event: str, payload: Any) -> bytes | None:
        """The frame every long-poll subscriber buffers; ``None`` (skip them) for a binary payload."""
        return self.wrap(self.serializer.encode_broadcast(topic, event, payload))

    def wrap(self, data: str | bytes) -> bytes | None:
        """The buffered form of a text frame; ``None`` (skip) for binary data or text that is not UTF-8."""
        if isinstance(data, str):
            return literal(data)
        _binary_log.skipped_one("broadcast")
        return None


class LongPollSession:
    """One long-poll session: the transport (and fastlane writer) of its :class:`Connection`.

    Buffers outgoing text frames (as :func:`literal` bytes) until a poll
    takes them, bounded by ``max_buffer_bytes``; feeds the client's messages to the connection in
    order from a greenlet of its own; ends on ``close``, inactivity, or
    overflow (then :meth:`Connection.terminate` runs).
    """

    name = "longpoll"

    __slots__ = (
        "lp",
        "sid",
        "conn",
        "encoder",
        "writer",
        "buffer",
        "qbytes",
        "excess",
        "waiter",
        "closed",
        "last_poll",
        "last_drain",
        "timer",
        "inbox",
        "dispatcher",
        "tokens",
        "refilled",
        "token",
        "__weakref__",
    )

    def __init__(self, lp: LongPoll, sid: str, serializer: Serializer) -> None:
        self.lp = lp
        self.sid = sid
        self.conn: Connection | None = None
        self.encoder = LongPollEncoder.of(serializer)
        # The session is its own fastlane writer: ``writer.encoder`` / ``writer.write``.
        self.writer = self
        self.buffer: list[bytes] = []
        self.qbytes = 0
        # Bytes above flow.connection_limit, not counted in the process total (as for WebSocket writers).
        self.excess = 0
        self.waiter: Event | None = None
        self.closed = False
        self.last_poll = self.last_drain = _monotonic()
        self.timer: Any = None
        self.inbox: deque[tuple[Message, AsyncResult]] = deque()
        self.dispatcher: Any = None
        self.tokens = lp.message_burst
        self.refilled = self.last_poll
        #: The session's token, once signed (forgotten by the token cache when the session ends).
        self.token: str | None = None

    def __repr__(self) -> str:
        return f"<LongPollSession {self.sid[:6]}... buffered={len(self.buffer)} closed={self.closed}>"

    def start(self) -> None:
        """Start the inactivity check (every 1.5 × ``window_ms``, as Phoenix)."""
        period = self.lp.window * 1.5
        self.timer = gevent.get_hub().loop.timer(period, period)
        self.timer.start(self._tick)

    # -- the transport interface of Connection -------------------------------------------

    def send(self, data: str | bytes) -> None:
        """Queue one encoded message; binary ones cannot reach a long-poll client (see module doc)."""
        if isinstance(data, str):
            frame = literal(data)
            if frame is not None:
                self.write(frame)
            return
        address = binary_reply_address(bytes(data))
        if address is not None and self.conn is not None:
            # A binary reply: answer the same ref with an error reply instead,
            # so the client's push is not left waiting for its timeout.
            join_ref, ref, topic = address
            log.info("phx_gevent: binary reply on %r replaced by an error reply for a long-poll client", topic)
            refusal = self.conn.serializer.encode_reply(join_ref, ref, topic, "error", BINARY_REFUSED)
            frame = literal(refusal) if isinstance(refusal, str) else None  # a JSON payload encodes to text
            if frame is not None:
                self.write(frame)
        else:
            _binary_log.skipped_one("push")

    def write(self, frame: bytes) -> None:
        """Buffer one frame (a :func:`literal`) and wake the held poll. Never blocks."""
        if self.closed:
            return
        n = len(frame)
        if not self.buffer:
            self.last_drain = _monotonic()
        self.buffer.append(frame)
        self.qbytes += n
        flow.queued += n
        if self.qbytes > flow.connection_limit or self.qbytes > self.lp.max_buffer_bytes:
            self.excess = flow.exclude_excess(self.qbytes, self.excess)
            if self._overflowed():
                return
        waiter = self.waiter
        if waiter is not None:
            waiter.set()

    def _overflowed(self) -> bool:
        # The WebSocket writer's policy (flow.slow_reason), with max_buffer_bytes as the hard cap.
        reason = flow.slow_reason(self.qbytes, self.last_drain, self.lp.max_buffer_bytes)
        if reason is None:
            return False
        if reason == "hard_cap":
            why, reason = f"{self.qbytes} bytes buffered (max_buffer_bytes)", "buffer_full"
        else:
            why = f"{self.qbytes} bytes buffered and no poll for {flow.slow_timeout:.1f}s"
        log.warning("phx_gevent: ending a long-poll session: %s", why)
        emit_slow_client_drop(self, reason, self.qbytes, "longpoll")
        self.end()
        return True

    def close(self, code: int | None = None, reason: str = "") -> None:
        """End the session (disconnect, drain); the close code has no meaning over long-poll."""
        self.end()

    # -- polls ------------------------------------------------------------------------------

    def poll(self, window: float, on_wait: Any = None) -> tuple[int, list[bytes]]:
        """Take the buffered frames (:func:`literal` bytes), waiting up to ``window`` seconds for the first one.

        Returns ``(200, frames)``, ``(204, [])`` when nothing came (or a newer
        poll replaced this one), or ``(410, [])`` when the session ended.
        ``on_wait()`` is called before waiting.
        """
        if self.closed:
            return GONE, []
        self.last_poll = _monotonic()
        if self.lp._unpolled:
            self.lp._unpolled.pop(self.sid, None)
        if not self.buffer:
            ev = Event()
            old, self.waiter = self.waiter, ev
            if old is not None:
                old.set()  # a newer poll replaces the older one, which answers 204 now
            try:
                if on_wait is not None:
                    on_wait()
                ev.wait(window)
            finally:
                # Also when the request greenlet is killed: a stale waiter would keep the session alive.
                replaced = self.waiter is not ev
                if not replaced:
                    self.waiter = None
                self.last_poll = _monotonic()
            if self.closed:
                return GONE, []
            if replaced:
                return 204, []
        return self._take()

    def _take(self) -> tuple[int, list[bytes]]:
        frames = self.buffer
        if not frames:
            return 204, []
        self.buffer = []
        n, self.qbytes = self.qbytes - self.excess, 0
        self.excess = 0
        flow.release(n)
        self.last_drain = _monotonic()
        return 200, frames

    # -- client messages --------------------------------------------------------------------

    def publish(self, lines: list[str], ndjson: bool, window: float) -> int:
        """Decode and apply a POST's messages in order, each acknowledged within ``window``.

        Returns 200, 408 (an acknowledgement did not come in time: the rest is
        not processed), 410 (the session ended) or 400 (a line could not be
        decoded: the session ends, as a WebSocket closes on a bad frame).
        """
        assert self.conn is not None
        serializer = self.conn.serializer
        for line in lines if ndjson else lines[:1]:
            if not line:
                continue
            if self.lp.max_message_rate is not None:
                self._throttle()
            try:
                if not ndjson or line[0] == "[":
                    msg = serializer.decode(line)
                else:
                    msg = serializer.decode(base64.b64decode(line, validate=True))
            except (DecodeError, binascii.Error, ValueError) as exc:
                log.info("phx_gevent: ending a long-poll session on an undecodable message: %s", exc)
                self.end()
                return 400
            status = self._dispatch(msg, window)
            if status != 200:
                return status
        return 200

    def _throttle(self) -> None:
        # The inbound rate limit (max_message_rate, message_burst): a token bucket; waits, drops nothing.
        rate = self.lp.max_message_rate
        assert rate is not None  # only called when a rate is set
        now = _monotonic()
        self.tokens = min(self.lp.message_burst, self.tokens + (now - self.refilled) * rate) - 1.0
        self.refilled = now
        if self.tokens < 0.0:
            gevent.sleep(-self.tokens / rate)
            self.tokens = 0.0
            self.refilled = _monotonic()

    def _dispatch(self, msg: Message, window: float) -> int:
        if self.closed:
            return GONE
        ack: AsyncResult = AsyncResult()
        self.inbox.append((msg, ack))
        if self.dispatcher is None:
            self.dispatcher = gevent.spawn(self._run_inbox)
        try:
            ok = ack.get(timeout=window)
        except gevent.Timeout:
            return 408
        return 200 if ok else GONE

    def _run_inbox(self) -> None:
        # Joins block here (up to join_timeout), never in the HTTP request.
        inbox = self.inbox
        conn = self.conn
        assert conn is not None
        try:
            while inbox and not self.closed:
                msg, ack = inbox.popleft()
                try:
                    conn.handle(msg)
                except Exception:
                    conn.log_error("phx_gevent: long-poll session failed handling %r", msg)
                    ack.set(False)
                    self.end()
                    break
                ack.set(True)
        finally:
            self.dispatcher = None
            if self.closed:
                while inbox:
                    inbox.popleft()[1].set(False)

    # -- ending -----------------------------------------------------------------------------

    def _tick(self) -> None:
        # Hub callback: nothing here may block or raise.
        try:
            if self.closed or self.waiter is not None:
                return
            if self.qbytes > flow.connection_limit and self._overflowed():
                return  # the drain policy on a timer, not only on the next write
            if _monotonic() - self.last_poll > self.lp.window * 1.5:
                self.end(INACTIVE)
        except Exception:
            supervise.failed("long-poll session timer")

    def end(self, reason: Any = None) -> None:
        """End the session: a held poll answers 410 now, then ``conn.terminate(reason)`` runs. Idempotent.

        ``reason`` ``None`` keeps the connection's own (``CLOSED``, or
        ``DISCONNECTED``/``DRAINING`` set by ``disconnect``/``drain``).
        """
        if self.closed:
            return
        self.closed = True
        self.lp.sessions.pop(self.sid, None)
        self.lp._unpolled.pop(self.sid, None)
        self.lp.tokens.forget(self.token)
        self.buffer = []
        n, self.qbytes = self.qbytes - self.excess, 0
        self.excess = 0
        flow.release(n)
        if self.timer is not None:
            self.timer.stop()
            self.timer.close()
            self.timer = None
        if self.waiter is not None:
            self.waiter.set()
        if self.dispatcher is None:
            while self.inbox:
                self.inbox.popleft()[1].set(False)
        if self.conn is not None:
            log.debug("phx_gevent: long-poll session %s... ended (%r)", self.sid[:6], reason)
            # In a greenlet of its own: end() may run inside a broadcast or a hub callback.
            gevent.spawn(self.conn.terminate, reason)
