"""Long-poll session tokens: which node owns a session, signed with the app's ``SECRET_KEY``.

A token names the owning process's node and the session id, so a request
that lands on another worker or machine finds the owner (no sticky
sessions). Without a ``SECRET_KEY`` the tokens are signed with a random key
of the process, and long-poll works only while every request reaches it.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from flask import current_app
from itsdangerous import BadData, URLSafeTimedSerializer

__all__ = ["MAX_TOKEN", "SessionTokens"]

log = logging.getLogger(__name__)

#: Longest token accepted (anything longer is not ours and is not even checked).
MAX_TOKEN = 1024


class SessionTokens:
    """Signs and verifies the tokens of one long-poll mount (inside a Flask app context)."""

    def __init__(self, salt: str, max_age: float | None) -> None:
        self.salt = salt
        #: Seconds a token stays valid, or ``None``.
        self.max_age = max_age
        self._signer: tuple[Any, URLSafeTimedSerializer] | None = None
        self._random_key: bytes | None = None

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
            self._signer = (key, URLSafeTimedSerializer(key, salt=self.salt))
        return self._signer[1]

    def sign(self, node: str, sid: str) -> str:
        """The token of session ``sid`` owned by ``node``."""
        return self._serializer().dumps({"n": node, "s": sid})

    def verify(self, token: Any) -> tuple[str, str] | None:
        """``(node, session id)`` from a valid, unexpired token; ``None`` otherwise (never raises)."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            return None
        try:
            # itsdangerous annotates max_age as int but only compares it: fractions of a second work.
            data = self._serializer().loads(token, max_age=self.max_age)  # type: ignore[arg-type]
        except BadData:
            return None
        if not isinstance(data, dict):
            return None
        node, sid = data.get("n"), data.get("s")
        if not isinstance(node, str) or not isinstance(sid, str):
            return None
        return node, sid
