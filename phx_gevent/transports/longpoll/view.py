"""The long-poll transport's HTTP side: the Flask view of ``<socket path>/longpoll``.

Creates sessions (:mod:`.session`), serves polls and POSTs, and reaches a
session owned by another process through node requests
(:mod:`phx_gevent.pubsub.request`); tokens are :mod:`.tokens`.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import gevent
from flask import Response, request

from ... import supervise
from ...connection import Connection
from ...flow import flow
from ...options import LongPollOptions, defaults
from ...pubsub.request import Responder, Silence
from ...serializers import dumps
from ...socket import Refuse, SocketState
from .. import http as phx_http
from .session import GONE, MISSING, LongPollSession
from .tokens import SessionTokens

if TYPE_CHECKING:  # pragma: no cover
    from ...mount import SocketMount

__all__ = ["DEFAULTS", "LongPoll"]

log = logging.getLogger(__name__)

_monotonic = time.monotonic

#: Options of ``endpoint.socket(..., longpoll={...})`` and their defaults (see :class:`LongPollOptions`).
DEFAULTS: dict[str, Any] = defaults(LongPollOptions)

# Addresses remembered by the creation rate limit before the full buckets are forgotten.
_MAX_BUCKETS = 10_000
_HEADERS = {"Cache-Control": "no-store", "Access-Control-Allow-Origin": "*"}
_TOKEN_HEADER = "X-Phoenix-Longpoll-Token"


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


class LongPoll:
    """The long-poll transport of one socket mount: ``<socket path>/longpoll``.

    ``options``: a :class:`~phx_gevent.options.LongPollOptions` (checked when the
    socket is mounted).
    """

    def __init__(self, mount: SocketMount, opts: LongPollOptions) -> None:
        self.mount = mount
        self.path = opts.path
        #: Seconds a poll is held.
        self.window = opts.window_ms / 1000.0
        self.pubsub_timeout = opts.pubsub_timeout_ms / 1000.0
        self.max_age = opts.max_age
        self.max_sessions = int(opts.max_sessions)
        self.max_buffer_bytes = int(opts.max_buffer_bytes)
        self.max_body_bytes = int(opts.max_body_bytes)
        self.max_lines = int(opts.max_lines)
        self.address_rate = opts.address_rate
        self.address_burst = float(opts.address_burst)
        self.max_message_rate = opts.max_message_rate
        self.message_burst = float(opts.message_burst)
        # address -> [tokens, last refill]: the session creation rate limit.
        self._buckets: dict[str, list[float]] = {}
        # Sessions that never polled, oldest first: the first to go at max_sessions.
        self._unpolled: dict[str, None] = {}
        self.check_origin = mount.check_origin
        if opts.check_origin is not None:
            self.check_origin = phx_http.compile_check_origin(opts.check_origin)
        self.connect_info = mount.connect_info
        if opts.connect_info is not None:
            self.connect_info = list(opts.connect_info)
        self.auth_token = mount.auth_token if opts.auth_token is None else bool(opts.auth_token)
        #: Live sessions owned by this process, by session id.
        self.sessions: dict[str, LongPollSession] = {}
        self._creating = 0
        self.tokens = SessionTokens("phx_gevent.longpoll" + mount.path, self.max_age)
        # Requests for sessions another process owns travel as node requests (PubSub layer).
        self.requests = mount.pubsub.requests(
            "phx_gevent.longpoll:" + mount.path, self._on_request, self.pubsub_timeout
        )

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
        owner = self.tokens.verify(token)
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
        token = self.tokens.sign(self.mount.endpoint.node_name, session_id)
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
        answer = self.requests.ask(node, {"op": "poll", "sid": sid}, self.window)
        if answer is Silence.NOBODY:
            return MISSING, []
        if answer is Silence.LOST:
            return 204, []
        status = answer.get("status")
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
            status: Any = GONE if session is None else session.publish(lines, ndjson, self.window)
        else:
            answer = self.requests.ask(
                node, {"op": "post", "sid": sid, "lines": lines, "ndjson": ndjson}, self.window * max(1, len(lines))
            )
            if answer is Silence.NOBODY:
                status = GONE
            elif answer is Silence.LOST:
                status = 408
            else:
                status = answer.get("status")
                if status not in (200, 400, 408, GONE):
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
        chunks: list[bytes] = []
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

    # -- other nodes ------------------------------------------------------------------------

    def _on_request(self, payload: dict[str, Any], responder: Responder) -> None:
        # A request another node received for a session of ours; in the adapter's
        # receiving greenlet, so never block here.
        if payload.get("op") not in ("poll", "post"):
            return
        sid = payload.get("sid")
        session = self.sessions.get(sid) if isinstance(sid, str) else None
        if session is None or session.closed:
            responder.answer({"status": MISSING})
            return
        gevent.spawn(self._serve, session, payload, responder)

    def _serve(self, session: LongPollSession, payload: dict[str, Any], responder: Responder) -> None:
        """Serve a request another node received for a session of ours."""
        try:
            if payload["op"] == "poll":
                status, messages = session.poll(self.window, on_wait=responder.ack)
                responder.answer({"status": status, "messages": _encodable(messages)})
                return
            lines = payload.get("lines")
            if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
                responder.answer({"status": 400})
                return
            responder.ack()
            status = session.publish(lines[: self.max_lines], bool(payload.get("ndjson")), self.window)
            responder.answer({"status": status})
        except Exception:
            log.exception("phx_gevent: serving a long-poll request from node %r failed", responder.node)
