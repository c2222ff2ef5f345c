"""Exceptions raised by phx_gevent's public API."""

from __future__ import annotations

__all__ = [
    "PhxError",
    "BroadcastTimeout",
    "ChannelError",
    "CallbackReturnError",
    "ConnectionOverloaded",
    "CallTimeout",
    "ChannelExited",
    "TokenError",
    "TokenExpired",
    "TokenInvalid",
    "TokenMissing",
    "NotMonkeyPatchedError",
    "EmitterError",
    "EmitterUnavailable",
    "PayloadError",
]


class PhxError(Exception):
    """Base class of every phx_gevent exception.

    Those that are also ``ValueError``, ``TypeError`` or ``AssertionError``
    (:class:`~phx_gevent.serializers.EncodeError`, :class:`CallbackReturnError`,
    :class:`~phx_gevent.testing.ConnectRefused`, ...) keep that base too, so
    ``except ValueError`` in applications still catches them.
    """


class BroadcastTimeout(PhxError):
    """Raised by ``broadcast`` when queued output stayed above the high-water mark too long.

    The process-wide ``max_queued_bytes`` limit makes broadcasters wait instead
    of letting memory grow; past ``broadcast_timeout`` seconds of waiting the
    broadcast is abandoned (nothing of it was delivered) and this is raised.
    """


class ChannelError(PhxError):
    """A channel operation was used where Phoenix forbids it (e.g. ``push`` inside ``join``)."""


class CallbackReturnError(PhxError, TypeError):
    """A user callback returned a value of the wrong shape; the message says what was expected."""


class ConnectionOverloaded(PhxError):
    """A client sends faster than its channel handles messages (``Socket.max_mailbox``).

    The transport closes the connection with 1008 (policy violation).
    """


class CallTimeout(PhxError):
    """``channel_pid.call(...)`` got no reply within its timeout (Elixir's ``GenServer.call`` exit ``:timeout``).

    The message may still be handled later; its reply is then dropped.
    """


class ChannelExited(PhxError):
    """The channel of a ``call`` ended (or had already ended) before replying.

    ``reason`` is the channel's terminate reason when known (``None`` if it
    was already gone when the call was made).
    """

    def __init__(self, message: str, reason: object = None) -> None:
        super().__init__(message)
        self.reason = reason


class TokenError(PhxError):
    """Base of the :func:`phx_gevent.token.verify` failures (Phoenix.Token's ``{:error, _}``)."""


class TokenMissing(TokenError):
    """No token was given (``None`` or empty): Phoenix.Token's ``{:error, :missing}``."""


class TokenInvalid(TokenError):
    """The token is malformed, or signed with another secret or salt: ``{:error, :invalid}``."""


class TokenExpired(TokenError):
    """The token's signature is valid but it is older than ``max_age``: ``{:error, :expired}``."""


class NotMonkeyPatchedError(PhxError, RuntimeError):
    """Something that needs gevent's monkey-patching was started in a process that is not patched.

    Raised by the Redis adapter (and by :func:`~phx_gevent.serve` /
    :func:`~phx_gevent.make_server` when an endpoint uses it): without
    patching, its greenlets would wait for Redis on blocking sockets and
    stall the whole process. The message names the fix.
    """


class EmitterError(PhxError):
    """An :class:`~phx_gevent.Emitter` could not hand a message to Redis; nothing is pending.

    The base of :class:`EmitterUnavailable` (Redis unreachable or silent) and
    :class:`PayloadError` (the message cannot be encoded). Raised as itself
    when Redis refused the command (authentication, ACL) or the emitter is closed.
    """


class EmitterUnavailable(EmitterError, ConnectionError):
    """Redis did not accept the message within the emitter's ``timeout`` (down, unreachable, too slow).

    The message may still have reached Redis when the last attempt timed out
    while waiting for the answer; it was not retried after the deadline.
    """


class PayloadError(EmitterError, TypeError):
    """The topic, event or payload cannot be carried (not a dict or bytes, not JSON, NaN); nothing was sent."""
