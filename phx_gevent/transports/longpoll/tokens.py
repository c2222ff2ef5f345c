"""Long-poll session tokens: which node owns a session, signed with the app's ``SECRET_KEY``.

A token names the owning process's node and the session id, so a request
that lands on another worker or machine finds the owner (no sticky
sessions). Without a ``SECRET_KEY`` the tokens are signed with a random key
of the process, and long-poll works only while every request reaches it.

Every poll carries its session's token, so a token once signed or verified
is remembered (with its expiry) and the next request for it costs a dict
lookup instead of an HMAC, base64 and JSON decoding.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from flask import Flask, current_app
from itsdangerous import BadData, URLSafeTimedSerializer

__all__ = ["MAX_TOKEN", "SessionTokens"]

log = logging.getLogger(__name__)

#: Longest token accepted (anything longer is not ours and is not even checked).
MAX_TOKEN = 1024

# Tokens remembered as verified; past it the memory starts over (each live token is verified once more).
_MAX_KNOWN = 20_000

_time = time.time


class SessionTokens:
    """Signs and verifies the tokens of one long-poll mount.

    ``app``: the Flask app whose ``SECRET_KEY`` signs (default: ``current_app``,
    so outside an app context it must be given).
    """

    def __init__(self, salt: str, max_age: float | None) -> None:
        self.salt = salt
        #: Seconds a token stays valid, or ``None``.
        self.max_age = max_age
        self._signer: tuple[Any, URLSafeTimedSerializer] | None = None
        self._random_key: bytes | None = None
        # token -> (node, session id, expires at (time.time()) or inf); valid for the key in _signer.
        self._known: dict[str, tuple[str, str, float]] = {}

    def _serializer(self, app: Flask | None) -> URLSafeTimedSerializer:
        key = (app if app is not None else current_app).config.get("SECRET_KEY")
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
            # A new key (first use, or SECRET_KEY changed): what was verified with the old one is not.
            self._signer = (key, URLSafeTimedSerializer(key, salt=self.salt))
            self._known.clear()
        return self._signer[1]

    def _remember(self, token: str, node: str, sid: str, signed_at: float) -> None:
        if len(self._known) >= _MAX_KNOWN:
            self._known.clear()
        expires = float("inf") if self.max_age is None else signed_at + self.max_age
        self._known[token] = (node, sid, expires)

    def sign(self, node: str, sid: str, app: Flask | None = None) -> str:
        """The token of session ``sid`` owned by ``node``."""
        token = self._serializer(app).dumps({"n": node, "s": sid})
        if isinstance(token, bytes):  # pragma: no cover - URLSafeTimedSerializer with a text serializer gives str
            token = token.decode("ascii")
        self._remember(token, node, sid, float(int(_time())))  # itsdangerous stamps whole seconds
        return token

    def forget(self, token: str | None) -> None:
        """Drop ``token`` from the verified ones (its session ended: the next use is verified in full)."""
        if token is not None:
            self._known.pop(token, None)

    def verify(self, token: Any, app: Flask | None = None) -> tuple[str, str] | None:
        """``(node, session id)`` from a valid, unexpired token; ``None`` otherwise (never raises)."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            return None
        serializer = self._serializer(app)  # first: a changed key clears what is remembered
        known = self._known.get(token)
        if known is not None:
            if _time() <= known[2]:
                return known[0], known[1]
            del self._known[token]
            return None
        try:
            # itsdangerous annotates max_age as int but only compares it: fractions of a second work.
            data, signed_at = serializer.loads(
                token,
                max_age=self.max_age,  # type: ignore[arg-type]
                return_timestamp=True,
            )
        except BadData:
            return None
        if not isinstance(data, dict):
            return None
        node, sid = data.get("n"), data.get("s")
        if not isinstance(node, str) or not isinstance(sid, str):
            return None
        self._remember(token, node, sid, signed_at.timestamp())
        return node, sid
