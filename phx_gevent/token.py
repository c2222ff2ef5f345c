"""Signed, timestamped tokens: Phoenix.Token for Flask, on itsdangerous and the app's ``SECRET_KEY``.

The usual use is authenticating a socket: a view signs the user's id into
the page, phoenix.js sends it back (``new Socket("/socket", {authToken})``,
or ``params: {token}``), and ``connect`` verifies it::

    from phx_gevent import token

    @app.get("/")
    def index():
        return render_template("index.html", socket_token=token.sign(app, "user socket", user.id))

    class UserSocket(Socket):
        def connect(self, params, socket, connect_info):
            try:
                user_id = token.verify(socket, "user socket", connect_info.get("auth_token"), max_age=86400)
            except token.TokenExpired:
                return refuse("expired")          # e.g. 401 from handle_error
            except token.TokenError:
                return None                       # missing or forged: 403
            return socket.assign(user_id=user_id)

Tokens are signed, not encrypted: the client can read ``data``. The
``salt`` separates uses (a token signed for "user socket" does not verify
for "password reset"); the secret is ``SECRET_KEY`` (Phoenix's
``secret_key_base``), so every worker and machine sharing it accepts the
same tokens.
"""

from __future__ import annotations

import time
from typing import Any

from itsdangerous import BadData, TimestampSigner, URLSafeTimedSerializer

from .errors import TokenError, TokenExpired, TokenInvalid, TokenMissing

__all__ = ["sign", "verify", "DEFAULT_MAX_AGE", "TokenError", "TokenExpired", "TokenInvalid", "TokenMissing"]

#: Seconds a token is valid when neither ``sign`` nor ``verify`` says otherwise (Phoenix: one day).
DEFAULT_MAX_AGE = 86400

_UNSET: Any = object()


class _Signer(TimestampSigner):
    """itsdangerous's timestamp signer with an optional fixed signing time (Phoenix's ``:signed_at``)."""

    def __init__(self, *args: Any, signed_at: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.signed_at = signed_at

    def get_timestamp(self) -> int:
        if self.signed_at is not None:
            return int(self.signed_at)
        return super().get_timestamp()


def _secret(context: Any) -> str | bytes:
    """The secret of ``context``: a key, a Flask app, an Endpoint, a socket, or ``None`` (the current app)."""
    if isinstance(context, (str, bytes)):
        if not context:
            raise ValueError("token: the secret must not be empty")
        return context
    from flask import Flask, current_app

    from .endpoint import Endpoint
    from .socket import SocketState

    if isinstance(context, SocketState):
        context = context.endpoint
    if isinstance(context, Endpoint):
        if not context.apps:
            raise ValueError("token: the endpoint is not attached to a Flask app (Endpoint(app) or init_app)")
        context = context.apps[0]
    if context is None:
        # raises outside an app context; the proxy's target is the app itself
        context = current_app._get_current_object()  # type: ignore[attr-defined]
    if not isinstance(context, Flask):
        raise TypeError(f"token: expected a secret, a Flask app, an Endpoint or a socket, got {context!r}")
    key = context.config.get("SECRET_KEY")
    if not key:
        raise ValueError("token: app.config['SECRET_KEY'] is not set; tokens need a secret shared by every worker")
    return key


def _serializer(context: Any, salt: str, signed_at: float | None = None) -> URLSafeTimedSerializer:
    if not isinstance(salt, str) or not salt:
        raise ValueError("token: salt must be a non-empty string")
    return URLSafeTimedSerializer(
        _secret(context), salt="phx_gevent.token:" + salt, signer=_Signer, signer_kwargs={"signed_at": signed_at}
    )


def sign(context: Any, salt: str, data: Any, *, max_age: float | None = _UNSET, signed_at: float | None = None) -> str:
    """Sign ``data`` (anything JSON can encode) into a URL-safe token (``Phoenix.Token.sign/4``).

    ``context`` gives the secret: a Flask app or an :class:`~phx_gevent.Endpoint`
    or a socket (their app's ``SECRET_KEY``), a ``str``/``bytes`` secret, or
    ``None`` for the current Flask app. ``max_age`` (seconds; ``None`` for no
    limit) is stored in the token as the default for :func:`verify` (one
    day when not given). ``signed_at`` (a ``time.time()`` value) backdates the
    token, for tests. Raises ``ValueError`` without a secret or salt and
    ``TypeError`` for data JSON cannot encode.
    """
    limit = DEFAULT_MAX_AGE if max_age is _UNSET else max_age
    return _serializer(context, salt, signed_at).dumps({"d": data, "m": limit})


def verify(context: Any, salt: str, token: Any, *, max_age: float | None = _UNSET) -> Any:
    """The data of a token made by :func:`sign` with the same secret and salt (``Phoenix.Token.verify/4``).

    ``max_age`` (seconds) overrides the one stored at signing; ``None``
    accepts any age (Phoenix's ``:infinity``). Raises
    :class:`~phx_gevent.errors.TokenMissing` for ``None`` or ``""``,
    :class:`~phx_gevent.errors.TokenInvalid` for a malformed or forged token
    (or one for another salt), :class:`~phx_gevent.errors.TokenExpired` when
    it is older than ``max_age``; all derive from
    :class:`~phx_gevent.errors.TokenError`.
    """
    if token is None or token == "" or token == b"":
        raise TokenMissing("no token given")
    if not isinstance(token, (str, bytes)):
        raise TokenInvalid(f"a token is a string, got {type(token).__name__}")
    try:
        payload, signed = _serializer(context, salt).loads(token, return_timestamp=True)
    except BadData:
        raise TokenInvalid("invalid token") from None
    if not isinstance(payload, dict) or "d" not in payload:
        raise TokenInvalid("invalid token")
    limit = payload.get("m") if max_age is _UNSET else max_age
    if limit is not None and time.time() - signed.timestamp() > limit:
        raise TokenExpired(f"token expired (older than {limit}s)")
    return payload["d"]
