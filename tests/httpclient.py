"""A tiny HTTP client for tests (urllib, cooperative under gevent's monkey-patching)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, NamedTuple


class HTTPResponse(NamedTuple):
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 10.0
) -> HTTPResponse:
    """Send one request; JSON-encodes ``body`` unless it is bytes; never raises for HTTP errors."""
    headers = dict(headers or {})
    data = None
    if body is not None:
        if isinstance(body, bytes):
            data = body
        else:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return HTTPResponse(resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()})
    except urllib.error.HTTPError as err:
        return HTTPResponse(err.code, err.read(), {k.lower(): v for k, v in err.headers.items()})


def post(url: str, body: Any = None, **kwargs: Any) -> HTTPResponse:
    return request("POST", url, body, **kwargs)


def get(url: str, **kwargs: Any) -> HTTPResponse:
    return request("GET", url, **kwargs)
