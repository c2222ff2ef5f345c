"""The long-poll transport's HTTP side: ``<socket path>/longpoll``.

Creates sessions (:mod:`.session`), serves polls and POSTs, and reaches a
session owned by another process through node requests
(:mod:`phx_gevent.pubsub.request`); tokens are :mod:`.tokens`.

A request is served from its WSGI environ (:meth:`LongPoll.answer`), and
reaches it two ways: the Flask view (every request: new sessions, refusals,
sessions of other processes), and :class:`LongPollRoutes`, a WSGI layer in
front of the Flask app that serves the polls and POSTs of this process's
live sessions without Flask's request dispatch, as WebSocket frames after
the handshake are (docs/longpoll.md).
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import gevent
from flask import Flask, Response, current_app, request
from werkzeug.wsgi import get_input_stream

from ... import supervise
from ...connection import Connection
from ...flow import flow
from ...options import LongPollOptions, defaults
from ...pubsub.request import Responder, Silence
from ...serializers import dumps, loads
from ...socket import Refuse, SocketState
from .. import http as phx_http
from .answers import Answer, content_length, json_answer, plain_answer, poll_answer, query_token
from .session import GONE, MISSING, LongPollSession, literal
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
_TOKEN_HEADER = "X-Phoenix-Longpoll-Token"
_TOKEN_ENVIRON = "HTTP_X_PHOENIX_LONGPOLL_TOKEN"

# One line a minute for refusals a client can cause at will (rate, max_sessions).
_log_refused = supervise.LogLimiter()


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

    # -- requests ---------------------------------------------------------------------------

    def handle(self, mount: SocketMount, path_params: dict[str, Any]) -> Response:
        """Serve one request to ``<socket path>/longpoll`` (the Flask view: inside a request context)."""
        answer = self.answer(request.environ, current_app, path_params)
        assert answer is not None  # only the WSGI layer (path_params None) is ever told to ask Flask
        return answer.response()

    def answer(self, environ: dict[str, Any], app: Flask, path_params: dict[str, Any] | None) -> Answer | None:
        """Serve one request to ``<socket path>/longpoll`` from its WSGI environ.

        ``path_params`` ``None`` means outside Flask (:class:`LongPollRoutes`):
        then only the polls and POSTs of this process's live sessions are
        served, and ``None`` is returned for everything else (a new session,
        a refusal, a session of another process), which the Flask view
        serves. Never raises for client input.
        """
        fast = path_params is None
        mount = self.mount
        # Phoenix checks the origin before anything, preflights included.
        if not phx_http.check_origin(environ, self.check_origin, mount.endpoint.server_name()):
            if fast:
                return None
            log.warning("%s", phx_http.origin_refusal(environ, self.check_origin, "long-poll request", mount.path))
            return json_answer({"status": 403})
        # Idempotent; also brings a forked worker's node name up to date before tokens are compared.
        mount.pubsub.start()
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "POST"):
            if fast:
                return None
            if method != "OPTIONS":
                return plain_answer(400)
            answer = plain_answer(200)
            answer.headers += [
                ("Access-Control-Allow-Headers", environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "")),
                ("Access-Control-Allow-Methods", "get, post, options"),
                ("Access-Control-Max-Age", "3600"),
            ]
            return answer
        params: dict[str, Any] = {}
        if fast:
            # Later requests' params are ignored but for the token (PROTOCOL.md 4.2): only it is read.
            token = environ.get(_TOKEN_ENVIRON) or query_token(environ.get("QUERY_STRING", ""))
            owner = self.tokens.verify(token, app)
            # Outside Flask only a live session of this process: the rest needs the view.
            if owner is None or owner[0] != mount.endpoint.node_name:
                return None
            session = self.sessions.get(owner[1])
            if session is None or session.closed:
                return None
        else:
            try:
                params = phx_http.parse_params(environ.get("QUERY_STRING", ""))
            except phx_http.ParamsError:
                return plain_answer(400, "bad query string")
            token = environ.get(_TOKEN_ENVIRON) or params.get("token")
            owner = self.tokens.verify(token, app)
        if method == "POST":
            return self._post(environ, owner)
        if owner is not None:
            status, messages = self._poll(*owner)
            if status in (200, 204):
                return poll_answer(status, token, messages)
            if status == GONE:
                # The session ended while this poll was held: tell the client now.
                return json_answer({"status": GONE, "token": None, "messages": []})
        if path_params is None:
            return None  # the session ended before the poll began: the view makes a new one
        # No token, a bad or expired one, or its session is gone: a new session (PROTOCOL.md 4.2).
        params.update(path_params)
        return self._new_session(environ, app, params)

    # -- sessions ---------------------------------------------------------------------------

    def _new_session(self, environ: dict[str, Any], app: Flask, params: dict[str, Any]) -> Answer:
        mount = self.mount
        if not self._address_allowed(environ.get("REMOTE_ADDR") or ""):
            return plain_answer(429, "too many long-poll sessions from this address")
        if len(self.sessions) + self._creating >= self.max_sessions and not self._evict_unpolled():
            _log_refused.log(
                log,
                logging.WARNING,
                "phx_gevent: refusing a long-poll session: max_sessions (%d) reached",
                self.max_sessions,
            )
            return plain_answer(503, "too many long-poll sessions")
        extra = {"auth_token": environ.get("HTTP_X_PHOENIX_AUTHTOKEN")} if self.auth_token else None
        info = mount.build_connect_info(environ, params, self.connect_info, extra)
        self._creating += 1
        try:
            socket = mount.connect("longpoll", params, info)
        finally:
            self._creating -= 1
        if not isinstance(socket, SocketState):
            return json_answer(_refusal(socket))
        serializer = socket.serializer
        session_id = secrets.token_urlsafe(16)
        session = LongPollSession(self, session_id, serializer)
        conn = Connection(mount, socket, serializer, session)
        session.conn = conn
        self.sessions[session_id] = session
        self._unpolled[session_id] = None
        conn.start()
        session.start()
        token = session.token = self.tokens.sign(self.mount.endpoint.node_name, session_id, app)
        return json_answer({"status": GONE, "token": token, "messages": []})

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

    def _poll(self, node: str, sid: str) -> tuple[int, list[bytes]]:
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
            frames = [literal(m) for m in messages if isinstance(m, str)]
            return status, [f for f in frames if f is not None]
        return (GONE, []) if status == GONE else (MISSING, [])

    def _post(self, environ: dict[str, Any], owner: tuple[str, str] | None) -> Answer:
        length = content_length(environ)
        if length is not None and length > self.max_body_bytes:
            # Answered on the headers; the body is never read: the connection closes.
            return plain_answer(413, "long-poll body too large", close=True)
        if owner is None:
            # The token is checked before a byte of the body is read (nobody
            # unauthenticated makes the server hold an upload).
            return json_answer({"status": GONE}, close=True)
        reserved = length if length is not None else 0
        if reserved and not flow.reserve_input(reserved):
            log.warning("phx_gevent: refused a long-poll POST: max_incomplete_input_bytes reached")
            return plain_answer(503, "server busy", close=True)
        try:
            body = self._read_body(environ, reserved)
        except gevent.Timeout:
            log.info("phx_gevent: a long-poll POST body took over %.1fs to arrive", flow.input_timeout)
            return plain_answer(408, "long-poll body too slow", close=True)
        except _Busy:
            return plain_answer(503, "server busy", close=True)
        finally:
            if reserved:
                flow.release_input(reserved)
        if body is None:
            return plain_answer(413, "long-poll body too large", close=True)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return plain_answer(400, "long-poll body is not UTF-8")
        mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
        ndjson = mimetype == "application/x-ndjson"
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
            return plain_answer(400, "undecodable long-poll message")
        return json_answer({"status": status})

    def _read_body(self, environ: dict[str, Any], reserved: int) -> bytes | None:
        """The body, read in bounded chunks within ``input_timeout``; None past ``max_body_bytes``.

        A body without Content-Length (chunked) reserves its memory in the
        process-wide budget as it arrives (``reserved`` is what the caller
        reserved up front). Raises ``gevent.Timeout`` when it is too slow and
        :class:`_Busy` when the budget is spent.
        """
        stream = get_input_stream(environ)
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
                status, frames = session.poll(self.window, on_wait=responder.ack)
                # The frames are JSON string literals: one decode gives the texts back.
                messages = loads(b"[" + b",".join(frames) + b"]") if frames else []
                responder.answer({"status": status, "messages": messages})
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
