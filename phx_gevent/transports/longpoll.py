"""The long-poll transport: phoenix.js's ``LongPoll`` over plain HTTP (PROTOCOL.md section 4).

A long-poll *session* plays the part of a WebSocket connection: it owns a
:class:`~phx_gevent.connection.Connection` (so the same connect, join,
reply, push, broadcast and disconnect rules apply) and buffers what the
server sends until the client's next ``GET`` takes it. ``POST`` carries the
client's messages (ndjson: JSON text lines, base64 lines for binary).

A session lives in the process that created it. Its token, signed with the
app's ``SECRET_KEY``, names that process's node and the session id, so a
request that lands on another gunicorn worker or machine reaches the owner
through the PubSub adapter (``register``/``send_direct``), with a
correlation id and ``pubsub_timeout_ms``: no sticky sessions. In the owning
process the request is served directly.

Every handled request is answered HTTP 200 with a JSON envelope whose
``status`` is one phoenix.js knows (PROTOCOL.md 4.9): 410 (session created,
or gone), 200/204 (poll), 403 (refused), 408 (POST not acknowledged in
time). Limits that cannot be expressed with those are plain, non-JSON HTTP
errors (400, 413, 503), which the client treats as a transport error and
retries with backoff.

phoenix.js cannot decode binary frames sent to a long-poll client: binary
pushes and broadcasts are not sent to it (logged), and a binary reply
becomes an error reply. Binary *from* the client works.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import gevent
from flask import Response, current_app, request
from gevent.event import AsyncResult, Event
from gevent.queue import Empty, Queue
from itsdangerous import BadData, URLSafeTimedSerializer

from .. import supervise
from ..channel import INACTIVE
from ..connection import Connection
from ..flow import flow
from ..serializers import DecodeError, FastlaneEncoder, Message, Serializer, dumps
from ..socket import Refuse, SocketState
from . import http as phx_http
from .writer import _dropped

if TYPE_CHECKING:  # pragma: no cover
    from ..endpoint import SocketMount

__all__ = ["LongPoll", "LongPollSession", "LongPollEncoder", "BINARY_REFUSED", "DEFAULTS"]

log = logging.getLogger(__name__)

_monotonic = time.monotonic

#: The error reply a long-poll client gets instead of a binary reply.
BINARY_REFUSED = {"reason": "binary payloads are not supported over long-poll"}

#: Options of ``endpoint.socket(..., longpoll={...})`` and their defaults.
DEFAULTS: dict[str, Any] = {
    "path": "/longpoll",
    "window_ms": 10_000,
    "pubsub_timeout_ms": 2_000,
    "max_age": 1_209_600,
    "max_sessions": 10_000,
    "max_buffer_bytes": 4 * 1024 * 1024,
    "max_body_bytes": 8 * 1024 * 1024,
    "max_lines": 100,
    "address_rate": 100,
    "address_burst": 1000,
    "max_message_rate": 1000,
    "message_burst": 2000,
    "check_origin": None,
    "connect_info": None,
    "auth_token": None,
}

_POSITIVE = (
    "window_ms",
    "pubsub_timeout_ms",
    "max_sessions",
    "max_buffer_bytes",
    "max_body_bytes",
    "max_lines",
    "address_burst",
    "message_burst",
)
# Positive numbers, or None to turn the limit off.
_RATES = ("address_rate", "max_message_rate")
# Addresses remembered by the creation rate limit before the full buckets are forgotten.
_MAX_BUCKETS = 10_000
_HEADERS = {"Cache-Control": "no-store", "Access-Control-Allow-Origin": "*"}
_TOKEN_HEADER = "X-Phoenix-Longpoll-Token"
_MAX_TOKEN = 1024

# Poll outcomes: a session ended while the poll was held, or no such session.
GONE = 410
MISSING = 0
# A remote owner acknowledged a request but its answer never came.
_LOST = -1


def _json(data: dict[str, Any]) -> Response:
    # The envelope is always HTTP 200: phoenix.js reads only the body's status.
    return Response(dumps(data), status=200, content_type="application/json; charset=utf-8", headers=_HEADERS)


_log_unencodable = supervise.LogLimiter()
# One line a minute for refusals a client can cause at will (rate, max_sessions).
_log_refused = supervise.LogLimiter()


def _encodable(messages: list[str]) -> list[str]:
    """The frames that can go out as UTF-8; the others are dropped (logged, rate-limited).

    Client data is checked at decode, so only server code can buffer such a
    frame (a lone surrogate in a pushed string): it must cost that frame,
    never the rest of another client's poll.
    """
    good = []
    for m in messages:
        try:
            m.encode("utf-8")
        except UnicodeEncodeError:
            _log_unencodable.log(log, logging.ERROR, "phx_gevent: dropped a long-poll frame that is not valid UTF-8")
            continue
        good.append(m)
    return good


def _poll_json(status: int, token: Any, messages: list[str]) -> Response:
    try:
        return _json({"status": status, "token": token, "messages": messages})
    except (UnicodeEncodeError, OverflowError, TypeError):
        return _json({"status": status, "token": token, "messages": _encodable(messages)})


def _plain(status: int, body: str = "") -> Response:
    # Not JSON, so the client sees status 0 ("transport error") and retries.
    return Response(body, status=status, mimetype="text/plain", headers=_HEADERS)


def _refusal(refusal: Refuse | None) -> dict[str, Any]:
    # phoenix.js understands 403 (and ignores other keys): a refusal's reason
    # rides along when JSON can encode it (long-poll has no error handler).
    body: dict[str, Any] = {"status": 403}
    if refusal is not None:
        try:
            dumps(refusal.reason)
        except (TypeError, ValueError, OverflowError):
            log.warning("phx_gevent: long-poll refusal reason %r is not JSON; sent without it", refusal.reason)
        else:
            body["reason"] = refusal.reason
    return body


class _Busy(Exception):
    """The process-wide budget of incomplete inputs is spent."""


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


class LongPollEncoder(FastlaneEncoder):
    """Fastlane encoder for long-poll sessions: a broadcast becomes the V2 JSON text, or ``None`` for binary."""

    __slots__ = ()

    def broadcast(self, topic: str, event: str, payload: Any) -> str | None:
        """The frame every long-poll subscriber gets; ``None`` (skip them) for a binary payload."""
        data = self.serializer.encode_broadcast(topic, event, payload)
        if type(data) is str:
            return data
        _binary_log.skipped_one("broadcast")
        return None

    def wrap(self, data: str | bytes) -> str | None:
        """The text frame; ``None`` (skip) for binary data."""
        if type(data) is str:
            return data
        _binary_log.skipped_one("broadcast")
        return None


class LongPollSession:
    """One long-poll session: the transport (and fastlane writer) of its :class:`Connection`.

    Buffers outgoing text frames until a poll takes them, bounded by
    ``max_buffer_bytes``; feeds the client's messages to the connection in
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
        "__weakref__",
    )

    def __init__(self, lp: LongPoll, sid: str, serializer: Serializer) -> None:
        self.lp = lp
        self.sid = sid
        self.conn: Connection | None = None
        self.encoder = LongPollEncoder.of(serializer)
        # The session is its own fastlane writer: ``writer.encoder`` / ``writer.write``.
        self.writer = self
        self.buffer: list[str] = []
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
        if type(data) is str:
            self.write(data)
            return
        data = bytes(data)
        if data[:1] == b"\x01" and len(data) >= 5 and self.conn is not None:
            # A binary reply: answer the same ref with an error reply instead,
            # so the client's push is not left waiting for its timeout.
            # (Refs come back as strings: the binary format has no other type.)
            jl, rl, tl = data[1], data[2], data[3]
            p = 5
            join_ref = data[p : p + jl].decode("utf-8") or None
            p += jl
            ref = data[p : p + rl].decode("utf-8") or None
            p += rl
            topic = data[p : p + tl].decode("utf-8")
            log.info("phx_gevent: binary reply on %r replaced by an error reply for a long-poll client", topic)
            self.write(self.conn.serializer.encode_reply(join_ref, ref, topic, "error", BINARY_REFUSED))
        else:
            _binary_log.skipped_one("push")

    def write(self, frame: str) -> None:
        """Buffer one text frame and wake the held poll. Never blocks."""
        if self.closed:
            return
        n = len(frame)
        if not self.buffer:
            self.last_drain = _monotonic()
        self.buffer.append(frame)
        self.qbytes += n
        flow.queued += n
        if self.qbytes > flow.connection_limit or self.qbytes > self.lp.max_buffer_bytes:
            over = self.qbytes - flow.connection_limit
            if over > self.excess:
                flow.release(over - self.excess)
                self.excess = over
            if self._overflowed():
                return
        waiter = self.waiter
        if waiter is not None:
            waiter.set()

    def _overflowed(self) -> bool:
        # The WebSocket writer's policy: over the hard cap at once; over the
        # soft cap when the client has not polled for slow_client_timeout.
        if self.qbytes > self.lp.max_buffer_bytes:
            why, reason = f"{self.qbytes} bytes buffered (max_buffer_bytes)", "buffer_full"
        elif _monotonic() - self.last_drain > flow.slow_timeout:
            why, reason = f"{self.qbytes} bytes buffered and no poll for {flow.slow_timeout:.1f}s", "stalled"
        else:
            return False
        log.warning("phx_gevent: ending a long-poll session: %s", why)
        _dropped(self, reason, self.qbytes, "longpoll")
        self.end()
        return True

    def close(self, code: int | None = None, reason: str = "") -> None:
        """End the session (disconnect, drain); the close code has no meaning over long-poll."""
        self.end()

    # -- polls ------------------------------------------------------------------------------

    def poll(self, window: float, on_wait: Any = None) -> tuple[int, list[str]]:
        """Take the buffered frames, waiting up to ``window`` seconds for the first one.

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

    def _take(self) -> tuple[int, list[str]]:
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


class LongPoll:
    """The long-poll transport of one socket mount: ``<socket path>/longpoll``.

    ``options`` (all optional; ``ValueError`` for unknown names or bad values):

    ``path``
        URL suffix, default ``"/longpoll"``.
    ``window_ms``
        How long a poll is held (default 10000); also the wait for each
        POSTed message's acknowledgement (then ``408``), and × 1.5 the
        inactivity check: a session nobody polls ends 15-30 s after its
        last poll by default.
    ``pubsub_timeout_ms``
        How long a request waits for another node to answer for its session
        (default 2000); silence means the session is gone.
    ``max_age``
        Seconds a session token stays valid (default 1209600, 14 days), or ``None``.
    ``max_sessions``
        Sessions of this mount per process (default 10000); beyond, new
        sessions get HTTP 503.
    ``max_buffer_bytes``
        Bytes (characters) buffered for one session between polls (default
        4 MiB); beyond, the session ends (the client reconnects). A session
        above ``max_connection_queue_bytes`` that did not poll for
        ``slow_client_timeout`` also ends (the WebSocket policy).
    ``max_body_bytes``
        Largest POST body (default 8 MiB); beyond, HTTP 413.
    ``max_lines``
        Messages processed per POST (default 100, as phoenix.js sends at most
        100); extra lines are dropped, as Phoenix does.
    ``address_rate``, ``address_burst``
        Sessions one client address may create per second on average
        (default 100) and at once (default 1000); beyond, HTTP 429 (the
        client retries with backoff). ``address_rate=None`` turns it off.
        Every client of a reverse proxy shares its address unless the
        endpoint's ``trusted_proxies`` names it. At ``max_sessions``, the
        oldest session that never polled is ended to make room (a client
        polls right after creating its session; one that did not is
        abandoned), and only when every session has polled is the answer 503.
    ``max_message_rate``, ``message_burst``
        Inbound messages per second one session may send on average (default
        1000) and at once (default 2000); a faster POST waits (throttled,
        nothing dropped). ``None`` turns it off.
    ``check_origin``, ``connect_info``, ``auth_token``
        Override the mount's settings for this transport.
    """

    def __init__(self, mount: SocketMount, options: Mapping[str, Any]) -> None:
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown longpoll option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        opts = {**DEFAULTS, **options}
        path = opts["path"]
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"longpoll path must start with '/', got {path!r}")
        for key in _POSITIVE:
            value = opts[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"longpoll {key} must be a positive number, got {value!r}")
        for key in _RATES:
            value = opts[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"longpoll {key} must be a positive number or None, got {value!r}")
        max_age = opts["max_age"]
        if max_age is not None and (isinstance(max_age, bool) or not isinstance(max_age, (int, float)) or max_age <= 0):
            raise ValueError(f"longpoll max_age must be a positive number of seconds or None, got {max_age!r}")
        self.mount = mount
        self.path = path
        #: Seconds a poll is held.
        self.window = opts["window_ms"] / 1000.0
        self.pubsub_timeout = opts["pubsub_timeout_ms"] / 1000.0
        self.max_age = max_age
        self.max_sessions = int(opts["max_sessions"])
        self.max_buffer_bytes = int(opts["max_buffer_bytes"])
        self.max_body_bytes = int(opts["max_body_bytes"])
        self.max_lines = int(opts["max_lines"])
        self.address_rate = opts["address_rate"]
        self.address_burst = float(opts["address_burst"])
        self.max_message_rate = opts["max_message_rate"]
        self.message_burst = float(opts["message_burst"])
        # address -> [tokens, last refill]: the session creation rate limit.
        self._buckets: dict[str, list[float]] = {}
        # Sessions that never polled, oldest first: the first to go at max_sessions.
        self._unpolled: dict[str, None] = {}
        self.check_origin = mount.check_origin
        if opts["check_origin"] is not None:
            self.check_origin = type(mount.endpoint)._compile_origin(opts["check_origin"])
        self.connect_info = mount.connect_info
        if opts["connect_info"] is not None:
            keys = list(opts["connect_info"])
            for key in keys:
                if not isinstance(key, Mapping) and key not in phx_http.CONNECT_INFO_KEYS:
                    raise ValueError(f"unknown connect_info key {key!r}; known: {sorted(phx_http.CONNECT_INFO_KEYS)}")
            self.connect_info = keys
        self.auth_token = mount.auth_token if opts["auth_token"] is None else bool(opts["auth_token"])
        #: Live sessions owned by this process, by session id.
        self.sessions: dict[str, LongPollSession] = {}
        self._creating = 0
        self._pending: dict[int, Queue] = {}
        self._cids = itertools.count(1)
        self._signer: tuple[Any, URLSafeTimedSerializer] | None = None
        self._random_key: bytes | None = None
        self._direct = "phx_gevent.longpoll:" + mount.path
        mount.pubsub.register(self._direct, self._on_direct)

    def __repr__(self) -> str:
        return f"<LongPoll {self.mount.path}{self.path} sessions={len(self.sessions)}>"

    # -- the Flask view ---------------------------------------------------------------------

    def handle(self, mount: SocketMount, path_params: dict[str, Any]) -> Response:
        """Serve one request to ``<socket path>/longpoll`` (inside a Flask request context)."""
        environ = request.environ
        # Phoenix checks the origin before anything, preflights included.
        if not phx_http.check_origin(environ, self.check_origin, mount.endpoint.server_name()):
            log.warning("%s", phx_http.origin_refusal(environ, self.check_origin, "long-poll request", mount.path))
            return _json({"status": 403})
        # Idempotent; also brings a forked worker's node name up to date before tokens are compared.
        mount.pubsub.start()
        method = request.method
        if method == "OPTIONS":
            resp = _plain(200)
            resp.headers["Access-Control-Allow-Headers"] = environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "")
            resp.headers["Access-Control-Allow-Methods"] = "get, post, options"
            resp.headers["Access-Control-Max-Age"] = "3600"
            return resp
        if method not in ("GET", "POST"):
            return _plain(400)
        try:
            params = phx_http.parse_params(environ.get("QUERY_STRING", ""))
        except phx_http.ParamsError:
            return _plain(400, "bad query string")
        token = request.headers.get(_TOKEN_HEADER) or params.get("token")
        owner = self._verify(token)
        if method == "POST":
            return self._post(owner)
        if owner is not None:
            status, messages = self._poll(*owner)
            if status in (200, 204):
                return _poll_json(status, token, messages)
            if status == GONE:
                # The session ended while this poll was held: tell the client now.
                return _json({"status": GONE, "token": None, "messages": []})
        # No token, a bad or expired one, or its session is gone: a new session (PROTOCOL.md 4.2).
        params.update(path_params)
        return self._new_session(params)

    # -- sessions ---------------------------------------------------------------------------

    def _new_session(self, params: dict[str, Any]) -> Response:
        mount = self.mount
        environ = request.environ
        if not self._address_allowed(environ.get("REMOTE_ADDR") or ""):
            return _plain(429, "too many long-poll sessions from this address")
        if len(self.sessions) + self._creating >= self.max_sessions and not self._evict_unpolled():
            _log_refused.log(
                log,
                logging.WARNING,
                "phx_gevent: refusing a long-poll session: max_sessions (%d) reached",
                self.max_sessions,
            )
            return _plain(503, "too many long-poll sessions")
        extra = {"auth_token": environ.get("HTTP_X_PHOENIX_AUTHTOKEN")} if self.auth_token else None
        info = mount.build_connect_info(environ, params, self.connect_info, extra)
        self._creating += 1
        try:
            socket = mount.connect("longpoll", params, info)
        finally:
            self._creating -= 1
        if not isinstance(socket, SocketState):
            return _json(_refusal(socket))
        serializer = socket.serializer
        session_id = secrets.token_urlsafe(16)
        session = LongPollSession(self, session_id, serializer)
        conn = Connection(mount, socket, serializer, session)
        session.conn = conn
        self.sessions[session_id] = session
        self._unpolled[session_id] = None
        conn.start()
        session.start()
        token = self._sign(self.mount.endpoint.node_name, session_id)
        return _json({"status": GONE, "token": token, "messages": []})

    def _address_allowed(self, address: str) -> bool:
        rate = self.address_rate
        if rate is None:
            return True
        now = _monotonic()
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                # Forget the addresses whose bucket has refilled: they are as good as new.
                burst = self.address_burst
                for key in [k for k, (t, at) in self._buckets.items() if t + (now - at) * rate >= burst]:
                    del self._buckets[key]
                if len(self._buckets) >= _MAX_BUCKETS:
                    # Too many distinct addresses at once: memory first, start over.
                    self._buckets.clear()
            bucket = self._buckets[address] = [self.address_burst, now]
        tokens = min(self.address_burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            _log_refused.log(
                log, logging.WARNING, "phx_gevent: refused long-poll sessions: an address creates them too fast"
            )
            return False
        bucket[0] = tokens - 1.0
        return True

    def _evict_unpolled(self) -> bool:
        """End the oldest session that never polled; False when there is none."""
        while self._unpolled:
            sid = next(iter(self._unpolled))
            del self._unpolled[sid]
            session = self.sessions.get(sid)
            if session is not None and not session.closed:
                log.info("phx_gevent: max_sessions reached: ended a long-poll session that never polled")
                session.end()
                return True
        return False

    def _poll(self, node: str, sid: str) -> tuple[int, list[str]]:
        if node == self.mount.endpoint.node_name:
            session = self.sessions.get(sid)
            if session is None:
                return MISSING, []
            return session.poll(self.window)
        answer = self._ask(node, {"op": "poll", "sid": sid}, self.window)
        if answer is None:
            return MISSING, []
        status = answer.get("status")
        if status == _LOST:
            return 204, []
        messages = answer.get("messages")
        if status in (200, 204) and isinstance(messages, list):
            return status, [m for m in messages if isinstance(m, str)]
        return (GONE, []) if status == GONE else (MISSING, [])

    def _post(self, owner: tuple[str, str] | None) -> Response:
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            # Answered on the headers; the body is never read: the connection closes.
            return phx_http.close_after(_plain(413, "long-poll body too large"))
        if owner is None:
            # The token is checked before a byte of the body is read (nobody
            # unauthenticated makes the server hold an upload).
            return phx_http.close_after(_json({"status": GONE}))
        reserved = length if length is not None else 0
        if reserved and not flow.reserve_input(reserved):
            log.warning("phx_gevent: refused a long-poll POST: max_incomplete_input_bytes reached")
            return phx_http.close_after(_plain(503, "server busy"))
        try:
            body = self._read_body(reserved)
        except gevent.Timeout:
            log.info("phx_gevent: a long-poll POST body took over %.1fs to arrive", flow.input_timeout)
            return phx_http.close_after(_plain(408, "long-poll body too slow"))
        except _Busy:
            return phx_http.close_after(_plain(503, "server busy"))
        finally:
            if reserved:
                flow.release_input(reserved)
        if body is None:
            return phx_http.close_after(_plain(413, "long-poll body too large"))
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return _plain(400, "long-poll body is not UTF-8")
        ndjson = request.mimetype == "application/x-ndjson"
        if ndjson:
            # Split at most max_lines times: the remainder (dropped, as Phoenix does) is never split.
            lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n", self.max_lines)]
            if len(lines) > self.max_lines:
                log.warning("phx_gevent: long-poll POST over %d lines; the rest was dropped", self.max_lines)
                del lines[self.max_lines :]
        else:
            lines = [text]
        node, sid = owner
        if node == self.mount.endpoint.node_name:
            session = self.sessions.get(sid)
            status = GONE if session is None else session.publish(lines, ndjson, self.window)
        else:
            answer = self._ask(
                node, {"op": "post", "sid": sid, "lines": lines, "ndjson": ndjson}, self.window * max(1, len(lines))
            )
            status = GONE if answer is None else answer.get("status")
            if status == _LOST:
                status = 408
            elif status not in (200, 400, 408, GONE):
                status = GONE
        if status == 400:
            return _plain(400, "undecodable long-poll message")
        return _json({"status": status})

    def _read_body(self, reserved: int) -> bytes | None:
        """The body, read in bounded chunks within ``input_timeout``; None past ``max_body_bytes``.

        A body without Content-Length (chunked) reserves its memory in the
        process-wide budget as it arrives (``reserved`` is what the caller
        reserved up front). Raises ``gevent.Timeout`` when it is too slow and
        :class:`_Busy` when the budget is spent.
        """
        stream = request.stream
        chunks = []
        size = 0
        extra = 0
        try:
            with gevent.Timeout(flow.input_timeout):
                while True:
                    chunk = stream.read(65536)
                    if not chunk:
                        return b"".join(chunks)
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        return None
                    if size > reserved + extra:
                        if not flow.reserve_input(len(chunk)):
                            raise _Busy
                        extra += len(chunk)
                    chunks.append(chunk)
        finally:
            if extra:
                flow.release_input(extra)

    # -- tokens -----------------------------------------------------------------------------

    def _serializer(self) -> URLSafeTimedSerializer:
        key = current_app.config.get("SECRET_KEY")
        if not key:
            if self._random_key is None:
                self._random_key = secrets.token_bytes(32)
                log.warning(
                    "phx_gevent: SECRET_KEY is not set: long-poll session tokens are signed with a random key of "
                    "this process, so long-poll works only while every request reaches this same process. "
                    "Several workers or machines need app.config['SECRET_KEY'] (the same on all of them)."
                )
            key = self._random_key
        if self._signer is None or self._signer[0] != key:
            self._signer = (key, URLSafeTimedSerializer(key, salt="phx_gevent.longpoll" + self.mount.path))
        return self._signer[1]

    def _sign(self, node: str, sid: str) -> str:
        return self._serializer().dumps({"n": node, "s": sid})

    def _verify(self, token: Any) -> tuple[str, str] | None:
        """``(node, session id)`` from a valid, unexpired token; ``None`` otherwise."""
        if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN:
            return None
        try:
            data = self._serializer().loads(token, max_age=self.max_age)
        except BadData:
            return None
        if not isinstance(data, dict):
            return None
        node, sid = data.get("n"), data.get("s")
        if not isinstance(node, str) or not isinstance(sid, str):
            return None
        return node, sid

    # -- other nodes ------------------------------------------------------------------------

    def _ask(self, node: str, message: dict[str, Any], work: float) -> dict[str, Any] | None:
        """Send ``message`` to the session's owner; its answer, or ``None`` when nobody answered.

        The owner acknowledges at once (or answers); silence for
        ``pubsub_timeout_ms`` means the session (or its node) is gone. After
        the acknowledgement the answer may take ``work`` seconds;
        ``{"status": -1}`` when it never came.
        """
        pubsub = self.mount.pubsub
        if pubsub.adapter is None:
            return None  # one process: nobody else can own a session
        pubsub.start()
        cid = next(self._cids)
        inbox: Queue = Queue()
        self._pending[cid] = inbox
        try:
            try:
                pubsub.send_direct(node, self._direct, {**message, "cid": cid})
            except Exception:
                log.exception("phx_gevent: could not reach node %r for a long-poll session", node)
                return None
            try:
                answer = inbox.get(timeout=self.pubsub_timeout)
            except Empty:
                return None
            if answer.get("op") == "ack":
                try:
                    answer = inbox.get(timeout=work + self.pubsub_timeout)
                except Empty:
                    return {"status": _LOST}
            return answer
        finally:
            self._pending.pop(cid, None)

    def _on_direct(self, payload: Any, sender: str) -> None:
        # Called by the PubSub adapter's receiving greenlet: never block here.
        if not isinstance(payload, dict):
            return
        op = payload.get("op")
        cid = payload.get("cid")
        if op in ("ack", "res"):
            inbox = self._pending.get(cid) if isinstance(cid, int) else None
            if inbox is not None:
                inbox.put(payload)
            return
        if op not in ("poll", "post") or not isinstance(cid, int):
            return
        sid = payload.get("sid")
        session = self.sessions.get(sid) if isinstance(sid, str) else None
        if session is None or session.closed:
            self._answer(sender, {"op": "res", "cid": cid, "status": MISSING})
            return
        gevent.spawn(self._serve, session, payload, sender)

    def _serve(self, session: LongPollSession, payload: dict[str, Any], sender: str) -> None:
        """Serve a request another node received for a session of ours."""
        cid = payload["cid"]

        def ack() -> None:
            self._answer(sender, {"op": "ack", "cid": cid})

        try:
            if payload["op"] == "poll":
                status, messages = session.poll(self.window, on_wait=ack)
                self._answer(sender, {"op": "res", "cid": cid, "status": status, "messages": _encodable(messages)})
                return
            lines = payload.get("lines")
            if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
                self._answer(sender, {"op": "res", "cid": cid, "status": 400})
                return
            ack()
            status = session.publish(lines[: self.max_lines], bool(payload.get("ndjson")), self.window)
            self._answer(sender, {"op": "res", "cid": cid, "status": status})
        except Exception:
            log.exception("phx_gevent: serving a long-poll request from node %r failed", sender)

    def _answer(self, node: str, message: dict[str, Any]) -> None:
        try:
            self.mount.pubsub.send_direct(node, self._direct, message)
        except Exception:
            log.exception("phx_gevent: could not answer node %r for a long-poll session", node)
