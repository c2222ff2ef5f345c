"""The WebSocket transport: one upgraded connection's reader, close handshake and end.

The handshake (:mod:`.handshake`) hands the socket over once the 101 is out.
Reading: the connection leaves the WSGI handler's
greenlet (which ends) and is served by a read watcher: when bytes arrive, a
worker greenlet from a shared pool reads what is there, handles the complete
frames in order (a join still blocks the connection's later frames until it is
answered), and goes back to the pool. An idle connection holds no greenlet
(docs/scaling-connections.md). TLS connections, and ``WATCH_READS = False``,
keep a reader greenlet per connection blocked in ``recv()``. Everything
written goes through the connection's :class:`~phx_gevent.transports.writer.Writer`.
"""

from __future__ import annotations

import logging
import socket as _pysocket
import struct
import time
from typing import Any

import gevent

from .. import memory
from ..channels.pool import reader_pool
from ..connection import Connection
from ..errors import ConnectionOverloaded
from ..flow import flow
from ..options import WebSocketOptions
from ..runtime import runtime
from ..serializers import DecodeError, Serializer
from . import frames
from .frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ProtocolError,
    frame,
    text_frame,
    unmask,
)
from .greenlet_writer import make_writer
from .writer import CLOSED as WRITER_CLOSED
from .writer import OPEN as WRITER_OPEN
from .ws_encoders import DeflateWebSocketEncoder, deflate_message, encoder_for

__all__ = ["WebSocketOptions", "WebSocketTransport", "encoder_for", "DeflateWebSocketEncoder"]

log = logging.getLogger(__name__)

_monotonic = time.monotonic
_unpack_short = struct.Struct("!H").unpack_from
_unpack_long = struct.Struct("!Q").unpack_from

#: Messages (frames) of this size or more reserve their size in ``flow``'s budget of incomplete inputs.
RESERVE_MIN = 16 * 1024

#: The environ key our WSGI handler sets; the view leaves the upgrade callable under it.
ENVIRON_HANDLER = "phx_gevent.handler"
ENVIRON_UPGRADE = "phx_gevent.upgrade"
#: Serve reads from an I/O watcher that wakes a worker greenlet only when data
#: arrives (True), instead of a reader greenlet per connection blocked in
#: ``recv()`` (False; always so for TLS). docs/scaling-connections.md has the why.
WATCH_READS = True
#: Most ``recv()`` calls one wake-up makes before it yields to other connections.
READS_PER_WAKEUP = 16


class _EOF(Exception):
    pass


class _WouldBlock(Exception):
    """No more data for now (watched connections): re-arm the watcher and let the worker go."""


class WebSocketTransport:
    """One WebSocket connection: reads frames in order, writes through its writer."""

    name = "websocket"

    __slots__ = (
        "sock",
        "opts",
        "serializer",
        "writer",
        "conn",
        "buf",
        "_timer",
        "handled",
        "peer_closed",
        "last_recv",
        "deflate",
        "_frag",
        "_watcher",
        "_handler",
        "_reads",
        "_awaited",
        "input_deadline",
        "reserved",
        "tokens",
        "refilled",
        "throttled",
        "server",
    )

    def __init__(
        self, sock: Any, opts: WebSocketOptions, serializer: Serializer, leftover: bytes = b"", deflate: bool = False
    ) -> None:
        self.sock = sock
        self.opts = opts
        self.serializer = serializer
        #: permessage-deflate was negotiated.
        self.deflate = deflate
        self.writer = make_writer(sock, encoder_for(serializer, deflate))
        self.conn: Connection | None = None
        self.buf = bytearray(leftover)
        self._timer: Any = None
        self.handled = 0
        self.peer_closed = False
        #: When data last arrived (``time.monotonic()``), for the idle timeout.
        self.last_recv = _monotonic()
        #: A fragmented message's state between wake-ups: (opcode, fragments, size, compressed).
        self._frag: tuple[int, list[bytes], int, bool] | None = None
        #: The read watcher of a watched connection (``None``: a reader greenlet blocks in ``recv``).
        self._watcher: Any = None
        #: The WSGI handler of a watched connection, kept for its access log line.
        self._handler: Any = None
        #: ``recv()`` calls left in this wake-up (watched connections).
        self._reads = 0
        #: End (in ``buf``) of the frame whose input reservation is held while it arrives.
        self._awaited = 0
        #: When the message that is arriving must be complete (``input_timeout``); 0: none started.
        self.input_deadline = 0.0
        #: Bytes this connection reserved in the process-wide budget of incomplete inputs.
        self.reserved = 0
        # The inbound rate limit: a token bucket (``max_message_rate``, ``message_burst``).
        self.tokens = float(opts.message_burst)
        self.refilled = self.last_recv
        #: How many messages had to wait for the rate limit.
        self.throttled = 0
        #: The WSGI server that accepted the connection (its ``stop()`` closes it), if known.
        self.server: Any = None

    # -- transport interface for Connection ---------------------------------------------

    def send(self, data: str | bytes) -> None:
        """Queue one encoded message as a text (``str``) or binary (``bytes``) frame."""
        if self.deflate:
            self.writer.write(deflate_message(data))
        elif isinstance(data, str):
            self.writer.write(text_frame(data))
        else:
            self.writer.write(frame(OP_BINARY, data))

    def send_now(self, data: str | bytes) -> None:
        """As :meth:`send`, but out at once when nothing is queued before it (heartbeat replies)."""
        if self.deflate:
            self.writer.write_now(deflate_message(data))
        elif isinstance(data, str):
            self.writer.write_now(text_frame(data))
        else:
            self.writer.write_now(frame(OP_BINARY, data))

    def hold(self) -> Any:
        """Hold the output until the returned release runs (``Writer.hold``); ``None`` if it cannot."""
        return self.writer.hold()

    def close(self, code: int | None = None, reason: str = "") -> None:
        """Send a close frame after what is queued; reset the TCP connection if the peer does not answer."""
        if self.writer.state != WRITER_OPEN:
            return
        self.writer.close(code, reason)
        if self._timer is None:
            self._timer = gevent.get_hub().loop.timer(self.opts.close_timeout)
            self._timer.start(self.writer.abort)

    def shut(self) -> None:
        """Shut the socket down both ways: the reader sees the end and the connection terminates."""
        try:
            self.sock.shutdown(_pysocket.SHUT_RDWR)
        except OSError:
            pass

    # -- reading ------------------------------------------------------------------------

    def _fill(self, n: int) -> None:
        buf = self.buf
        watched = self._watcher is not None
        # Watched: the OS socket itself (non-blocking under gevent's wrapper), no wrapper call.
        recv = self.sock._sock.recv if watched else self.sock.recv
        while len(buf) < n:
            if watched:
                # A watched connection reads only what is there, a few times per wake-up.
                if self._reads <= 0:
                    raise _WouldBlock
                self._reads -= 1
            # Large messages arrive in bounded reads, never one huge allocation.
            want = min(max(65536, n - len(buf)), 262144)
            try:
                chunk = recv(want)
            except BlockingIOError:
                raise _WouldBlock from None
            if not chunk:
                raise _EOF
            if watched and len(chunk) < want:
                # The kernel had no more: the next read waits for the watcher instead of
                # failing with EAGAIN (a system call and an exception saved per wake-up).
                self._reads = 0
            self.last_recv = _monotonic()
            buf += chunk

    def run(self) -> None:
        """Read and dispatch until the connection ends; never raises for client input."""
        # No timeout on each read (it would cost a gevent Timeout per recv):
        # the process-wide idle sweeper closes connections that went quiet.
        self.sock.settimeout(None)
        runtime.sweeper().add(self)
        self._read()

    def watch(self, handler: Any = None) -> None:
        """Serve this connection from a read watcher: a worker greenlet runs only while frames arrive.

        Returns at once; the connection ends by itself (``_end``: channels
        terminated, close handshake, socket closed, ``handler``'s access log
        line written).
        """
        self.sock.settimeout(0.0)
        self._handler = handler
        runtime.sweeper().add(self)
        self._watcher = gevent.get_hub().loop.io(self.sock.fileno(), 1)
        if self.buf:
            reader_pool().run(self._wakeup)  # the client's first frames came with its request
        else:
            self._watcher.start(self._readable)

    def _readable(self) -> None:
        # Hub callback of the read watcher (never blocks): a worker serves the data.
        watcher = self._watcher
        watcher.stop()
        conn = self.conn
        if conn is not None and conn.channels:
            reader_pool().run_from_hub(self._wakeup)  # a joined client (heartbeats, pushes): now
        else:
            # Not joined yet. In a reconnect storm thousands of these become readable in one poll,
            # and serving their joins there held everything else (joined clients' heartbeats,
            # timers) for hundreds of ms. Behind the hub's callbacks instead, which it runs a few
            # ms at a time between polls; a worker is taken only then, so none is held meanwhile.
            watcher.loop.run_callback(self._serve_deferred)

    def _serve_deferred(self) -> None:
        if self._watcher is not None:
            reader_pool().run_from_hub(self._wakeup)

    def _wakeup(self) -> None:
        # In a reader worker greenlet: handle what arrived, then wait on the watcher again.
        self._reads = READS_PER_WAKEUP
        if self._read():
            self._watcher.start(self._readable)
        else:
            self._end()

    def _end(self) -> None:
        watcher, self._watcher = self._watcher, None
        watcher.stop()
        watcher.close()
        try:
            assert self.conn is not None
            self.conn.terminate()
        finally:
            self.finish()
            try:
                self.sock.close()
            except OSError:
                pass
            handler, self._handler = self._handler, None
            if handler is not None:
                handler.phx_log_deferred = False
                handler.time_finish = time.time()
                try:
                    handler.log_request()
                except Exception:  # pragma: no cover - a log failure must not leak the connection
                    log.exception("phx_gevent: writing the access log line failed")

    def _read(self) -> bool:
        """Read and dispatch frames; True: no more data for now (watched), False: the connection ended."""
        code, reason = None, ""
        try:
            self._loop()
        except _WouldBlock:
            return True
        except _EOF:
            pass
        except ProtocolError as exc:
            log.info("phx_gevent: closing WebSocket: %s", exc.reason)
            code, reason = exc.code, exc.reason
        except ConnectionOverloaded as exc:
            log.warning("phx_gevent: closing WebSocket: %s", exc)
            code, reason = frames.CLOSE_POLICY, "too many messages"
        except OSError:
            pass  # reset by peer, or shut down by our own writer
        except Exception:
            if self.conn is not None:
                self.conn.log_error("phx_gevent: WebSocket connection failed")
            else:  # pragma: no cover - the connection exists before the reader runs
                log.exception("phx_gevent: WebSocket connection failed")
            code, reason = frames.CLOSE_INTERNAL_ERROR, "internal error"
        runtime.sweeper().discard(self)
        if code is not None and self.writer.state == WRITER_OPEN:
            self.close(code, reason)
        return False

    def _loop(self) -> None:
        buf = self.buf
        max_size = self.opts.max_frame_size
        fragments: list[bytes] = []
        frag_op = 0
        frag_size = 0
        frag_compressed = False
        if self._frag is not None:
            # A fragmented message left incomplete by the last wake-up.
            frag_op, fragments, frag_size, frag_compressed = self._frag
            self._frag = None
        deflate = self.deflate
        try:
            while True:
                if len(buf) < 2:
                    self._fill(2)
                b0 = buf[0]
                b1 = buf[1]
                op = b0 & 0x0F
                length = b1 & 0x7F
                rsv = b0 & 0x70
                if rsv and (rsv != frames.RSV1 or not deflate or op >= 8 or op == OP_CONT):
                    # RSV1 means "compressed", only if negotiated and only on a message's first frame.
                    raise ProtocolError(frames.CLOSE_PROTOCOL_ERROR, "reserved bits set")
                if not b1 & 0x80:
                    raise ProtocolError(frames.CLOSE_PROTOCOL_ERROR, "client frames must be masked")
                if length < 126:
                    start = 2
                elif length == 126:
                    self._fill(4)
                    (length,) = _unpack_short(buf, 2)
                    start = 4
                else:
                    self._fill(10)
                    (length,) = _unpack_long(buf, 2)
                    start = 10
                fin = b0 & 0x80
                if op >= 8:
                    if not fin or length > 125:
                        raise ProtocolError(frames.CLOSE_PROTOCOL_ERROR, "bad control frame")
                elif length > max_size or frag_size + length > max_size:
                    # Refused on the header: the payload is never read.
                    raise ProtocolError(frames.CLOSE_TOO_BIG, "message too big")
                end = start + 4 + length
                if len(buf) < end:
                    # A message still arriving: bounded in time (the sweeper checks the
                    # deadline) and, when large, in the process's memory budget.
                    if not self.input_deadline:
                        self.input_deadline = _monotonic() + flow.input_timeout
                    if length >= RESERVE_MIN and op < 8 and self._awaited != end:
                        # Once per frame: a watched connection parses the header again at each wake-up.
                        if not flow.reserve_input(length):
                            raise ProtocolError(frames.CLOSE_TRY_AGAIN_LATER, "too many large messages arriving")
                        self.reserved += length
                        self._awaited = end
                    self._fill(end)
                    self._awaited = 0
                payload = unmask(buf[start + 4 : end], bytes(buf[start : start + 4]))
                del buf[:end]

                if op == OP_TEXT or op == OP_BINARY:
                    if frag_op:
                        raise ProtocolError(frames.CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
                    if not fin:
                        frag_op, fragments, frag_size, frag_compressed = op, [payload], length, bool(rsv)
                        if not self.input_deadline:
                            self.input_deadline = _monotonic() + flow.input_timeout
                        continue
                    if rsv:
                        payload = frames.inflate(payload, max_size)
                    self._message(op, payload)
                elif op == OP_CONT:
                    if not frag_op:
                        raise ProtocolError(frames.CLOSE_PROTOCOL_ERROR, "continuation without a message")
                    fragments.append(payload)
                    frag_size += length
                    if fin:
                        data = b"".join(fragments)
                        op, frag_op, fragments, frag_size = frag_op, 0, [], 0
                        if frag_compressed:
                            data = frames.inflate(data, max_size)
                        self._message(op, data)
                elif op == OP_PING:
                    self.writer.write(frame(OP_PONG, payload))
                elif op == OP_PONG:
                    pass
                elif op == OP_CLOSE:
                    code, reason = frames.parse_close(payload)
                    self.peer_closed = True
                    if self.writer.state == WRITER_OPEN:
                        self.close(code, "")
                    return
                else:
                    raise ProtocolError(frames.CLOSE_PROTOCOL_ERROR, f"unknown opcode {op}")
                if self.input_deadline and not frag_op:
                    # A whole message is in (reservations are made only while a deadline is set).
                    self.input_deadline = 0.0
                    if self.reserved:
                        flow.release_input(self.reserved)
                        self.reserved = 0
        except _WouldBlock:
            if frag_op:
                # Wait for the rest of a fragmented message at the next wake-up.
                self._frag = (frag_op, fragments, frag_size, frag_compressed)
            raise

    def _message(self, op: int, payload: bytes) -> None:
        writer = self.writer
        if writer.state != WRITER_OPEN:
            return  # closing: the client's late messages are not processed
        if writer.qbytes > flow.connection_limit:
            self._wait_drained()
        rate = self.opts.max_message_rate
        if rate is not None:
            self.tokens -= 1.0
            if self.tokens < 0.0:
                self._throttle(rate)
        if op == OP_TEXT:
            try:
                data: str | bytes = payload.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(frames.CLOSE_INVALID_DATA, "invalid UTF-8 in a text frame") from None
        else:
            data = payload
        try:
            msg = self.serializer.decode(data)
        except DecodeError as exc:
            # Phoenix crashes the connection on undecodable frames: 1011.
            raise ProtocolError(frames.CLOSE_INTERNAL_ERROR, f"bad frame: {exc}") from None
        assert self.conn is not None
        self.conn.handle(msg)
        sweep = self.opts.fullsweep_after
        if sweep is not None:
            self.handled += 1
            if self.handled > sweep:
                self.handled = 0
                memory.collect()

    def _throttle(self, rate: float) -> None:
        # Refill the bucket for the time that passed; wait for what is missing.
        now = _monotonic()
        self.tokens = min(float(self.opts.message_burst), self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        if self.tokens < 0.0:
            self.throttled += 1
            gevent.sleep(-self.tokens / rate)
            self.tokens = 0.0
            self.refilled = _monotonic()

    def _wait_drained(self) -> None:
        # Replies obey the limits broadcasts do: while this connection's own
        # output is above its soft cap, its messages are not read (TCP pushes
        # back on the client), so a client cannot queue replies faster than it
        # reads them. The drain timer drops it if it never reads.
        writer = self.writer
        while writer.qbytes > flow.connection_limit and writer.state == WRITER_OPEN:
            gevent.sleep(0.02)

    def finish(self) -> None:
        """After the reader ends: let our close frame out (bounded), then release everything."""
        if self.reserved:
            flow.release_input(self.reserved)
            self.reserved = 0
        self.input_deadline = 0.0
        writer = self.writer
        if writer.state == WRITER_OPEN:
            # The peer vanished without a close frame: nobody is left to read one.
            writer.abort()
        elif writer.state != WRITER_CLOSED:
            writer.wait_closed(self.opts.close_timeout)
            if writer.state != WRITER_CLOSED:
                writer.abort()
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None
        writer.discard()
