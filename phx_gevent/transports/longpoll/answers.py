"""The long-poll transport's HTTP answers, built once for the Flask view and the WSGI layer alike.

Every answer phoenix.js understands is HTTP 200 with a JSON body whose
``status`` it reads (PROTOCOL.md 4.1); limits no such status can express are
plain-text HTTP errors. A poll's body is joined from frames that are already
JSON string literals (:func:`.session.literal`): nothing is encoded per poll
but the envelope.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Any

from flask import Response

from ...serializers import dumps
from .. import http as phx_http
from .session import literal

__all__ = ["Answer", "content_length", "json_answer", "plain_answer", "poll_answer", "query_token"]

_HEADERS = [("Cache-Control", "no-store"), ("Access-Control-Allow-Origin", "*")]
_JSON_TYPE = ("Content-Type", "application/json; charset=utf-8")
_PLAIN_TYPE = ("Content-Type", "text/plain; charset=utf-8")
_REASONS = {200: "200 OK", 400: "400 BAD REQUEST", 408: "408 REQUEST TIMEOUT", 413: "413 REQUEST ENTITY TOO LARGE"}
_REASONS.update({429: "429 TOO MANY REQUESTS", 500: "500 INTERNAL SERVER ERROR", 503: "503 SERVICE UNAVAILABLE"})
# The Date header, made once a second (the server would format it for every poll).
_date: list[Any] = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if now != _date[0]:
        _date[0], _date[1] = now, formatdate(now, usegmt=True)
    return str(_date[1])


class Answer:
    """A long-poll response: HTTP status, body bytes, extra headers; ``close`` ends the connection after it."""

    __slots__ = ("status", "body", "json", "headers", "close")

    def __init__(self, status: int, body: bytes, json: bool = True, close: bool = False) -> None:
        self.status = status
        self.body = body
        self.json = json
        self.headers: list[tuple[str, str]] = []
        self.close = close

    def response(self) -> Response:
        """The Flask response (inside the request)."""
        resp = Response(self.body, status=self.status, headers=[_JSON_TYPE if self.json else _PLAIN_TYPE, *_HEADERS])
        resp.headers.extend(self.headers)
        return phx_http.close_after(resp) if self.close else resp

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        """Answer as a WSGI application (outside Flask)."""
        headers = [_JSON_TYPE if self.json else _PLAIN_TYPE, ("Content-Length", str(len(self.body))), *_HEADERS]
        headers.append(("Date", _http_date()))
        headers += self.headers
        if self.close:
            headers.append(("Connection", "close"))
            environ[phx_http.ENVIRON_CLOSE] = True
        start_response(_REASONS.get(self.status) or f"{self.status} UNKNOWN", headers)
        return [self.body]


def json_answer(data: dict[str, Any], close: bool = False) -> Answer:
    """``data`` as the JSON envelope (always HTTP 200: phoenix.js reads only the body's status)."""
    return Answer(200, dumps(data).encode("utf-8"), close=close)


def poll_answer(status: int, token: str | None, messages: list[bytes]) -> Answer:
    """A poll's envelope around ``messages``, ready JSON string literals (:func:`.session.literal`): one join."""
    token_json = (literal(token) if token else None) or b"null"
    head = b'{"status":%d,"token":%s,"messages":[' % (status, token_json)
    return Answer(200, b"".join((head, b",".join(messages), b"]}")))


def plain_answer(status: int, body: str = "", close: bool = False) -> Answer:
    """A plain-text HTTP error: not JSON, so phoenix.js sees status 0 ("transport error") and retries."""
    return Answer(status, body.encode("utf-8"), json=False, close=close)


def query_token(query: str) -> str | None:
    """The ``token`` query parameter when it is plain (one, not percent-encoded, as signed); else ``None``."""
    found = None
    for part in query.split("&"):
        if part.startswith("token="):
            if found is not None:
                return None  # twice: the view's parser decides
            found = part[6:]
    if found is None or "%" in found or "+" in found:
        return None
    return found


def content_length(environ: dict[str, Any]) -> int | None:
    """The request's ``Content-Length`` as Werkzeug reads it: ``None`` for a chunked body or a bad value."""
    if environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
        return None
    value = environ.get("CONTENT_LENGTH")
    if not value:
        return None
    try:
        length = int(value)
    except ValueError:
        return None
    return length if length >= 0 else None
