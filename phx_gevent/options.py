"""The options of ``endpoint.socket(...)``: one shape, checked once, when the socket is mounted.

Each group is a dataclass (:class:`WebSocketOptions`, :class:`LongPollOptions`,
:class:`DrainerOptions`) built by :func:`parse` from what the application
passed (``True``, ``False``, a mapping or an instance). One mechanism checks
them all: unknown names are refused with the list of known ones, and each
number is checked against its field's metadata (its unit, whether it must be
positive, the largest plausible value). The largest plausible value catches a
pasted Phoenix setting: Phoenix counts most times in milliseconds where these
options count seconds, so ``timeout=60_000`` is refused with a message that
names the unit instead of meaning 16 hours.

Every refusal raises :class:`ConfigurationError`, which is a ``ValueError``
and a ``TypeError`` (applications written against the earlier checks catch
either).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import PhxError

__all__ = [
    "ConfigurationError",
    "DrainerOptions",
    "LongPollOptions",
    "WebSocketOptions",
    "check_connect_info",
    "check_seconds",
    "defaults",
    "from_env",
    "parse",
]

#: Longest plausible time in seconds: above it, a value was most likely meant in milliseconds.
MAX_SECONDS = 3600.0


class ConfigurationError(PhxError, ValueError, TypeError):
    """An option has an unknown name, a wrong type or an implausible value; the message says which and why."""


def _number(
    unit: str, *, positive: bool = True, maximum: float | None = None, integer: bool = False, optional: bool = False
) -> dict[str, Any]:
    """Field metadata read by :func:`_check`."""
    return {"unit": unit, "positive": positive, "max": maximum, "integer": integer, "optional": optional}


def check_seconds(what: str, value: Any, *, optional: bool = False, maximum: float = MAX_SECONDS) -> float | None:
    """``value`` as seconds, or :class:`ConfigurationError` naming the unit (for options outside the dataclasses)."""
    meta = _number("seconds", maximum=maximum, optional=optional)
    _check_number(what, value, meta)
    return None if value is None else float(value)


def _check_number(what: str, value: Any, meta: Mapping[str, Any]) -> None:
    unit = meta["unit"]
    if value is None:
        if meta["optional"]:
            return
        raise ConfigurationError(f"{what} must be a number of {unit}, got None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{what} must be a number of {unit}, got {value!r}")
    if meta["integer"] and not float(value).is_integer():
        raise ConfigurationError(f"{what} must be a whole number of {unit}, got {value!r}")
    if meta["positive"] and value <= 0:
        raise ConfigurationError(f"{what} must be a positive number of {unit}, got {value!r}")
    if not meta["positive"] and value < 0:
        raise ConfigurationError(f"{what} must be zero or more {unit}, got {value!r}")
    limit = meta["max"]
    if limit is not None and value > limit:
        hint = " (milliseconds? this option counts seconds)" if unit == "seconds" else ""
        raise ConfigurationError(f"{what} is {value!r} {unit}, more than the plausible {limit:g}{hint}")


def _check(group: str, options: Any) -> None:
    for f in dataclasses.fields(options):
        if "unit" in f.metadata:
            _check_number(f"{group} {f.name}", getattr(options, f.name), f.metadata)


@dataclass(slots=True)
class WebSocketOptions:
    """Options of ``endpoint.socket(..., websocket={...})``.

    ``timeout``
        Idle timeout in seconds: the connection closes (1001) when nothing was
        received for this long. Default 60 (phoenix.js heartbeats every 30 s).
    ``max_frame_size``
        Largest message in bytes, checked on each frame header before the
        payload is read and on reassembled fragments (close 1009). Default 8 MiB.
    ``fullsweep_after``
        A full ``gc.collect()`` (rate-limited process-wide, see
        :mod:`phx_gevent.memory`) once a connection has handled N messages
        since its last one; 0 = after every message. Default ``None`` (off).
        Costly: a full collection pauses the whole process.
    ``subprotocols``
        Extra subprotocols to accept besides ``"phoenix"`` (which always comes first).
    ``close_timeout``
        Seconds to wait for the client's close frame after ours. Default 5.
    ``path``
        URL suffix of the endpoint; default ``"/websocket"``.
    ``compress``
        Offer permessage-deflate (RFC 7692) to clients that ask (browsers and
        ``ws`` do): messages of :data:`~phx_gevent.transports.frames.COMPRESS_THRESHOLD`
        bytes or more are compressed, each on its own (no context
        takeover either way, so no zlib state per connection and broadcast
        frames stay shared). Costs CPU per large message; default ``False``
        as in Phoenix. ``max_frame_size`` applies to the inflated size too.
    ``max_message_rate``, ``message_burst``
        Inbound messages per second one connection may send on average
        (default 1000), and how many it may send at once (default 2000). A
        faster client is throttled: its next message is read only when the
        rate allows (TCP pushes back on it), nothing is dropped. ``None``
        turns the limit off.

    Raises :class:`ConfigurationError` for a bad value.
    """

    timeout: float | None = field(default=60.0, metadata=_number("seconds", maximum=MAX_SECONDS, optional=True))
    max_frame_size: int = field(default=8 * 1024 * 1024, metadata=_number("bytes", integer=True))
    fullsweep_after: int | None = field(
        default=None, metadata=_number("messages", positive=False, integer=True, optional=True)
    )
    subprotocols: list[str] | tuple[str, ...] = ()
    close_timeout: float = field(default=5.0, metadata=_number("seconds", maximum=MAX_SECONDS))
    path: str = "/websocket"
    compress: bool = False
    max_message_rate: float | None = field(default=1000.0, metadata=_number("messages per second", optional=True))
    message_burst: int = field(default=2000, metadata=_number("messages", integer=True))

    def __post_init__(self) -> None:
        _check("websocket", self)
        _check_path("websocket", self.path)
        if isinstance(self.subprotocols, str) or not all(isinstance(p, str) for p in self.subprotocols):
            raise ConfigurationError(f"websocket subprotocols must be a list of strings, got {self.subprotocols!r}")
        self.max_frame_size = int(self.max_frame_size)
        self.max_message_rate = None if self.max_message_rate is None else float(self.max_message_rate)
        self.subprotocols = ["phoenix", *[p for p in self.subprotocols if p != "phoenix"]]
        self.compress = bool(self.compress)


@dataclass(slots=True)
class LongPollOptions:
    """Options of ``endpoint.socket(..., longpoll={...})``.

    ``path``
        URL suffix, default ``"/longpoll"``.
    ``window_ms``
        How long a poll is held, in milliseconds as in Phoenix (default
        10000); also the wait for each POSTed message's acknowledgement (then
        ``408``), and × 1.5 the inactivity check: a session nobody polls ends
        15-30 s after its last poll by default.
    ``pubsub_timeout_ms``
        How long a request waits for another node to answer for its session,
        in milliseconds (default 2000); silence means the session is gone.
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
        Override the mount's settings for this transport (``None``: the mount's).

    Raises :class:`ConfigurationError` for a bad value.
    """

    path: str = "/longpoll"
    window_ms: float = field(default=10_000, metadata=_number("milliseconds", maximum=MAX_SECONDS * 1000))
    pubsub_timeout_ms: float = field(default=2_000, metadata=_number("milliseconds", maximum=MAX_SECONDS * 1000))
    max_age: float | None = field(default=1_209_600, metadata=_number("seconds", optional=True))
    max_sessions: int = field(default=10_000, metadata=_number("sessions", integer=True))
    max_buffer_bytes: int = field(default=4 * 1024 * 1024, metadata=_number("bytes", integer=True))
    max_body_bytes: int = field(default=8 * 1024 * 1024, metadata=_number("bytes", integer=True))
    max_lines: int = field(default=100, metadata=_number("messages", integer=True))
    address_rate: float | None = field(default=100, metadata=_number("sessions per second", optional=True))
    address_burst: float = field(default=1000, metadata=_number("sessions"))
    max_message_rate: float | None = field(default=1000, metadata=_number("messages per second", optional=True))
    message_burst: float = field(default=2000, metadata=_number("messages"))
    check_origin: Any = None
    connect_info: Any = None
    auth_token: bool | None = None

    def __post_init__(self) -> None:
        _check("longpoll", self)
        _check_path("longpoll", self.path)
        if self.connect_info is not None:
            self.connect_info = check_connect_info(self.connect_info)


@dataclass(slots=True)
class DrainerOptions:
    """Options of ``endpoint.socket(..., drainer={...})``: how a shutdown closes this mount's connections.

    ``batch_size``
        Connections told to reconnect elsewhere (close 1012) per batch (default 10000).
    ``batch_interval``
        Seconds between batches (default 2; Phoenix's ``2000`` is milliseconds
        and is refused with a message naming the unit).
    ``shutdown``
        Seconds the whole drain of this mount may take (default 30).

    Raises :class:`ConfigurationError` for a bad value.
    """

    batch_size: int = field(default=10_000, metadata=_number("connections", integer=True))
    batch_interval: float = field(default=2.0, metadata=_number("seconds", maximum=60.0))
    shutdown: float = field(default=30.0, metadata=_number("seconds", maximum=MAX_SECONDS))

    def __post_init__(self) -> None:
        _check("drainer", self)


def check_connect_info(keys: Any) -> list[Any]:
    """The ``connect_info`` keys as a list; :class:`ConfigurationError` for one that is not known."""
    from .transports.http import CONNECT_INFO_KEYS

    if isinstance(keys, (str, Mapping)) or not hasattr(keys, "__iter__"):
        keys = [keys]
    keys = list(keys)
    for key in keys:
        if not isinstance(key, Mapping) and key not in CONNECT_INFO_KEYS:
            raise ConfigurationError(f"unknown connect_info key {key!r}; known: {sorted(CONNECT_INFO_KEYS)}")
    return keys


def _check_path(group: str, path: Any) -> None:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigurationError(f"{group} path must start with '/', got {path!r}")


_T = TypeVar("_T", WebSocketOptions, LongPollOptions, DrainerOptions)
_V = TypeVar("_V")


def parse(cls: type[_T], value: Any, group: str) -> _T | None:
    """Options of ``group`` from what ``endpoint.socket(...)`` was given.

    ``False``/``None`` -> ``None`` (the feature is off); ``True`` -> the
    defaults; an instance of ``cls`` as is; a mapping -> ``cls(**mapping)``
    after refusing unknown names. Raises :class:`ConfigurationError`.
    """
    if value is False or value is None:
        return None
    if value is True:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{group} must be True, False, a dict or {cls.__name__}, got {value!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise ConfigurationError(f"unknown {group} option(s) {unknown}; known: {sorted(known)}")
    return cls(**value)


def defaults(cls: type[Any]) -> dict[str, Any]:
    """The default of each option of ``cls`` (a dict, for documentation and tests)."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def from_env(
    environ: Mapping[str, str] | None, name: str, default: _V, convert: Callable[[str], _V], expected: str
) -> _V | None:
    """A setting of the gunicorn worker read from environment variable ``name`` (``environ``: os.environ).

    Unset or blank: ``default``; ``off`` or ``none`` (any case): ``None``;
    otherwise ``convert(value)``. Raises :class:`ConfigurationError` naming
    the variable, its value and ``expected`` (e.g. ``"a number of seconds
    (e.g. 20)"``) when ``convert`` raises ``ValueError``; checking the
    plausibility of the result is the caller's.
    """
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return default
    if raw.lower() in ("off", "none"):
        return None
    try:
        return convert(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} must be {expected} or 'off'") from None
