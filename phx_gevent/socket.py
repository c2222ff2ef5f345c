"""The user's Socket handler base class, channel routes, and the socket struct.

A :class:`Socket` subclass authenticates connections (``connect``), names
them (``id``) and routes topics to Channel classes (``channels``)::

    class UserSocket(Socket):
        channels = [channel("room:*", RoomChannel)]

        def connect(self, params, socket, connect_info):
            if not params.get("user"):
                return None                      # refused: HTTP 403
            if params["user"] in BANNED:
                return refuse("banned")          # refused: handle_error("banned") answers
            return socket.assign(user=params["user"])

        def handle_error(self, reason):           # Phoenix's transport :error_handler
            return Response("", status=401, headers={"WWW-Authenticate": "Bearer"})

        def id(self, socket):
            return f"user_socket:{socket.assigns['user']}"

Every callback receives a :class:`SocketState`, the Python twin of Phoenix's
``%Phoenix.Socket{}``.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    from .channel import Channel
    from .pubsub.history import HistoryConfig

__all__ = ["Socket", "SocketState", "Route", "Refuse", "channel", "refuse"]


class SocketState:
    """The socket struct handed to every callback (Phoenix's ``%Socket{}``).

    Fields, with Phoenix's names:

    ``id``
        The connection's id from :meth:`Socket.id` (``None`` when anonymous).
    ``assigns``
        A dict of your own data; set it with :meth:`assign`.
    ``channel``
        The Channel class serving this topic (``None`` on the connection's socket).
    ``channel_pid``
        The channel process: ``socket.channel_pid.send(msg)`` delivers ``msg``
        to ``handle_info``; ``.call(msg, timeout=...)`` asks ``handle_call``
        and returns its reply; ``.cast(msg)`` goes to ``handle_cast``.
    ``endpoint``
        The :class:`~phx_gevent.Endpoint`.
    ``handler``
        The :class:`Socket` handler instance of the mount.
    ``joined``
        ``True`` once the join reply was queued; ``push`` and ``broadcast`` need it.
    ``join_ref``
        The client's join_ref for this channel instance.
    ``ref``
        The ref of the client message being handled (``None`` outside ``handle_in``).
    ``pubsub_server``
        The endpoint's :class:`~phx_gevent.pubsub.PubSub`.
    ``topic``
        The channel's topic (``None`` on the connection's socket).
    ``transport``
        ``"websocket"`` or ``"longpoll"``.
    ``transport_pid``
        The connection process: ``socket.transport_pid.send("garbage_collect")``.
    ``serializer``
        The connection's serializer (V1 or V2).
    """

    __slots__ = (
        "id",
        "assigns",
        "channel",
        "channel_pid",
        "endpoint",
        "handler",
        "joined",
        "join_ref",
        "ref",
        "pubsub_server",
        "topic",
        "transport",
        "transport_pid",
        "serializer",
        "private",
    )

    def __init__(
        self,
        *,
        endpoint: Any = None,
        handler: Any = None,
        transport: str = "websocket",
        transport_pid: Any = None,
        serializer: Any = None,
        pubsub_server: Any = None,
        assigns: dict[str, Any] | None = None,
        id: str | None = None,
    ) -> None:
        self.id = id
        self.assigns: dict[str, Any] = {} if assigns is None else assigns
        self.channel: type[Channel] | None = None
        self.channel_pid: Any = None
        self.endpoint = endpoint
        self.handler = handler
        self.joined = False
        self.join_ref: Any = None
        self.ref: Any = None
        self.pubsub_server = pubsub_server
        self.topic: str | None = None
        self.transport = transport
        self.transport_pid = transport_pid
        self.serializer = serializer
        #: Library-private data (the connection this socket belongs to).
        self.private: Any = None

    def assign(
        self,
        key: str | Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
        value: Any = None,
        **values: Any,
    ) -> SocketState:
        """Set assigns and return the socket, so ``return socket.assign(user=...)`` reads well.

        Accepts ``assign("k", v)``, ``assign({"k": v})``, ``assign(k=v)``, or
        a function of the current assigns returning the ones to merge
        (Phoenix's ``assign(socket, fn assigns -> ... end)``), e.g.
        ``assign(lambda a: {"count": a.get("count", 0) + 1})``. Raises
        ``TypeError`` when that function returns something other than a mapping.
        """
        if isinstance(key, str):
            self.assigns[key] = value
        elif callable(key):
            merged = key(self.assigns)
            if not isinstance(merged, Mapping):
                raise TypeError(f"assign(fn): fn must return a mapping of assigns, got {merged!r}")
            self.assigns.update(merged)
        elif key is not None:
            self.assigns.update(key)
        if values:
            self.assigns.update(values)
        return self

    def copy_for_channel(
        self, topic: str, channel_cls: type[Channel], join_ref: Any, assigns: Mapping[str, Any]
    ) -> SocketState:
        """The per-channel copy made at join: its own assigns, topic and join_ref."""
        new = SocketState.__new__(SocketState)
        new.id = self.id
        new.assigns = {**self.assigns, **assigns} if assigns else dict(self.assigns)
        new.channel = channel_cls
        new.channel_pid = None
        new.endpoint = self.endpoint
        new.handler = self.handler
        new.joined = False
        new.join_ref = join_ref
        new.ref = None
        new.pubsub_server = self.pubsub_server
        new.topic = topic
        new.transport = self.transport
        new.transport_pid = self.transport_pid
        new.serializer = self.serializer
        new.private = self.private
        return new

    def __repr__(self) -> str:
        return (
            f"<SocketState id={self.id!r} topic={self.topic!r} joined={self.joined} "
            f"transport={self.transport!r} assigns={self.assigns!r}>"
        )


def _history_config(pattern: str, channel_cls: type[Channel], history: Any) -> HistoryConfig | None:
    # The route's own value, else the class attribute `history`, which is public API (docs/recovery.md):
    # a class that uses the name for something else is refused with the two ways out.
    from .options import ConfigurationError
    from .pubsub.history import HistoryConfig

    value = history if history is not None else channel_cls.history
    try:
        return HistoryConfig.coerce(value)
    except (TypeError, ValueError) as exc:
        if history is not None:
            raise ConfigurationError(f"channel({pattern!r}, ..., history=...): {exc}") from None
        name = channel_cls.__name__
        raise ConfigurationError(
            f"{name}.history is {reprlib.repr(value)}, not a history config ({exc}). On a Channel, `history` is "
            "phx_gevent's setting for recovery on rejoin (docs/recovery.md): a dict like {'size': 1000, 'ttl': 300}, "
            f"a HistoryConfig, or None. If {name}.history is your own attribute, rename it, or mount the route with "
            f"channel({pattern!r}, {name}, history=False) so that phx_gevent does not read it."
        ) from None


class Route:
    """One ``channel(pattern, ChannelClass, assigns=...)`` declaration.

    Raises ``ValueError``/``TypeError`` for a bad pattern or class, and
    :class:`~phx_gevent.options.ConfigurationError` for a history setting
    (the route's, or the class's ``history`` attribute) that is not one.
    """

    __slots__ = ("pattern", "channel", "assigns", "_prefix", "history")

    def __init__(
        self,
        pattern: str,
        channel_cls: type[Channel],
        assigns: Mapping[str, Any] | None = None,
        history: Mapping[str, Any] | bool | None = None,
    ) -> None:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("a channel pattern must be a non-empty string")
        star = pattern.find("*")
        if star != -1 and star != len(pattern) - 1:
            raise ValueError(f"channel pattern {pattern!r}: '*' is only allowed as the last character")
        from .channel import Channel

        if not (isinstance(channel_cls, type) and issubclass(channel_cls, Channel)):
            raise TypeError(f"channel {pattern!r}: expected a Channel subclass, got {channel_cls!r}")
        self.pattern = pattern
        self.channel = channel_cls
        self.assigns = dict(assigns or {})
        self._prefix = pattern[:-1] if star != -1 else None
        #: The route's history config (the route's own, else the Channel class's), or None.
        #: ``history=False`` turns off the class's history for this route (and leaves the class's
        #: ``history`` attribute unread, so an application may use the name for its own data).
        self.history = None if history is False else _history_config(pattern, channel_cls, history)

    def matches(self, topic: str) -> bool:
        """True when ``topic`` is routed here (exact match, or prefix before a trailing ``*``)."""
        if self._prefix is None:
            return topic == self.pattern
        return topic.startswith(self._prefix)

    def __repr__(self) -> str:
        return f"channel({self.pattern!r}, {self.channel.__name__})"


def channel(
    pattern: str,
    channel_cls: type[Channel],
    *,
    assigns: Mapping[str, Any] | None = None,
    history: Mapping[str, Any] | bool | None = None,
) -> Route:
    """Declare a channel route: ``"room:*"`` matches every topic starting with ``room:``.

    ``*`` is allowed only as the last character. ``assigns`` are merged into
    the channel's socket at join. ``history`` (``{"size", "ttl", "events",
    "max_replay"}``) keeps the topics' messages for recovery on rejoin
    (docs/recovery.md); it overrides the Channel class's ``history``
    (``False``: none for this route).
    Routes are tried in order; the first match wins. Raises
    ``ValueError``/``TypeError`` for a bad pattern, class or history config.
    """
    return Route(pattern, channel_cls, assigns, history)


class Refuse(NamedTuple):
    """A refusal with a reason, returned by :meth:`Socket.connect` (Phoenix's ``{:error, reason}``).

    Build it with :func:`refuse`. The socket's error handler
    (:meth:`Socket.handle_error`, or ``endpoint.socket(..., error_handler=f)``)
    turns ``reason`` into the WebSocket handshake's HTTP answer; long-poll
    answers ``{"status": 403, "reason": reason}`` (phoenix.js handles 403).
    """

    reason: Any


def refuse(reason: Any) -> Refuse:
    """Refuse a connection with ``reason``: ``return refuse("rate limited")`` from ``connect``.

    ``reason`` is any value your error handler understands; it also goes to
    the long-poll client when JSON can encode it, so keep secrets out of it.
    """
    return Refuse(reason)


class Socket:
    """Base class of a socket handler: authenticate, identify, route.

    Class attributes:

    ``channels``
        The list of :func:`channel` routes, first match wins.
    ``max_channels``
        Most channels one connection may join (Phoenix's
        ``max_channels_per_transport``, default 100); more are refused with
        ``{"reason": "too many channels joined"}``.
    ``max_mailbox``
        Most messages waiting for one channel (default 10,000). Past it, the
        connection stops reading the client until half is handled (for at
        most ``mailbox_timeout`` seconds, default 5, then it is closed with
        1008), and server-side messages (``send``, ``call``, ``cast``,
        intercepted broadcasts) end the channel with ``phx_error``.

    Methods to override: :meth:`connect` (accept, refuse, or
    :func:`refuse` with a reason), :meth:`id`, and :meth:`handle_error`
    (the HTTP answer to a refusal with a reason).
    """

    channels: Sequence[Route] = ()
    max_channels: int = 100
    max_mailbox: int = 10_000
    mailbox_timeout: float = 5.0

    def connect(self, params: dict[str, Any], socket: SocketState, connect_info: dict[str, Any]) -> SocketState | None:
        """Accept or refuse a connection; runs before the WebSocket upgrade (or long-poll session).

        ``params`` are the query parameters (nested ``a[b]=c`` syntax
        decoded, ``vsn`` included). Return:

        * the ``socket`` (usually after :meth:`SocketState.assign`) to accept
          (Phoenix's ``{:ok, socket}``);
        * ``None`` or ``False`` to refuse with a plain HTTP 403 (``:error``);
        * :func:`refuse(reason) <refuse>` (or ``error(reason)``) to refuse
          with a reason (``{:error, reason}``): the WebSocket handshake is
          answered by :meth:`handle_error`, long-poll with
          ``{"status": 403, "reason": reason}``.

        Anything else raises :class:`~phx_gevent.errors.CallbackReturnError`
        (HTTP 500). The default accepts everyone.

        To authenticate with a signed token handed to the page (phoenix.js
        ``authToken``, with ``endpoint.socket(..., auth_token=True)``), see
        :mod:`phx_gevent.token`: ``token.verify(socket, "user socket",
        connect_info.get("auth_token"), max_age=86400)`` returns the signed data
        or raises ``TokenMissing``/``TokenInvalid``/``TokenExpired``.
        """
        return socket

    def handle_error(self, reason: Any) -> Any:
        """Answer a WebSocket handshake refused with :func:`refuse(reason) <refuse>`.

        Phoenix's transport ``:error_handler``. Runs inside the handshake's
        Flask request (``flask.request`` is available) and returns anything a
        Flask view may return: a ``Response``, ``(body, status)``,
        ``(body, status, headers)``. The default answers 403 with an empty
        body, as Phoenix does. ``endpoint.socket(..., error_handler=f)``
        overrides it for one mount. Long-poll does not call it: phoenix.js
        understands only ``{"status": 403}`` there.
        """
        from flask import Response

        return Response("", status=403, mimetype="text/plain")

    def id(self, socket: SocketState) -> str | None:
        """Name the connection, so ``broadcast(id, "disconnect", {})`` can close it; ``None`` for anonymous."""
        return None

    def route(self, topic: str) -> Route | None:
        """The first route matching ``topic``, or ``None``."""
        for route in self.channels:
            if route.matches(topic):
                return route
        return None
