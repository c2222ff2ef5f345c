"""Which Redis pub/sub channel carries what: the naming every publisher and subscriber agrees on.

Two routings (the ``routing`` option of :class:`~phx_gevent.pubsub.redis.RedisAdapter`
and :class:`~phx_gevent.Emitter`; docs/redis-envelope.md):

``"topic"`` (the default)
    A broadcast on ``topic`` goes to ``<prefix>:t:{<topic>}``; a node subscribes
    to the channels of the topics it has local subscribers for, so it receives
    (and decodes) only those. The topic sits in a ``{...}`` hash tag, the same
    one as its history keys (:func:`phx_gevent.pubsub.history_redis.history_keys`),
    so under Redis Cluster a topic's channel and its history map to one slot.
``"broadcast"``
    Every broadcast goes to ``<prefix>:b`` and every node receives all of them
    (the design before per-topic routing).
``"dual"``
    For a rolling switch between the two: a node subscribes like ``"topic"``
    and to ``<prefix>:b``, and publishes each broadcast on its topic's channel
    and, marked (:func:`mark`: ``"r":1`` first in the JSON, which other
    versions ignore), on ``<prefix>:b``. It drops the marked messages it reads
    on ``<prefix>:b`` (it has them from the topic's channel) and keeps the
    others (from ``"broadcast"`` nodes). Nodes in ``"broadcast"`` and
    ``"dual"`` hear each other, and so do ``"dual"`` and ``"topic"``: deploy
    broadcast -> dual -> topic, one rolling restart each, and nothing is lost.

In both, ``<prefix>:d:<node>`` carries direct node-to-node messages.
``<prefix>:n`` is subscribed by every node under topic routing and carries
nothing: ``PUBSUB NUMSUB <prefix>:n`` counts the nodes (the publisher waits for
them to resubscribe before replaying an outage).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import unquote

__all__ = [
    "ROUTINGS",
    "Routing",
    "broadcast_channel",
    "channel_for",
    "check_routing",
    "direct_channel",
    "direct_prefix",
    "is_marked",
    "mark",
    "nodes_channel",
    "split_routing",
    "topic_channel",
]

Routing = Literal["topic", "broadcast", "dual"]

#: The accepted values of the ``routing`` option.
ROUTINGS: tuple[str, ...] = ("topic", "broadcast", "dual")

#: What a marked message's JSON starts with (``"dual"`` routing's copy on ``<prefix>:b``).
MARK = b'{"r":1,'


def mark(data: bytes) -> bytes:
    """``data`` (a codec message) with the ``"dual"`` routing's mark as its first JSON key."""
    start = data.index(b"\n", 5) + 1  # after "phx1\n<node>\n"
    return data[:start] + MARK + data[start + 1 :]


def is_marked(data: bytes) -> bool:
    """Whether ``data`` is a ``"dual"`` node's copy on ``<prefix>:b`` (any node, any format tag)."""
    start = data.find(b"\n", 5) + 1
    return start > 0 and data.startswith(MARK, start)


def topic_channel(prefix: str, topic: str) -> bytes:
    """The channel of ``topic`` under topic routing: ``<prefix>:t:{<topic>}``."""
    return f"{prefix}:t:{{{topic}}}".encode()


def broadcast_channel(prefix: str) -> bytes:
    """The one channel of every broadcast under broadcast routing: ``<prefix>:b``."""
    return f"{prefix}:b".encode()


def nodes_channel(prefix: str) -> bytes:
    """The channel every node subscribes to under topic routing, only to be counted (``PUBSUB NUMSUB``)."""
    return f"{prefix}:n".encode()


def direct_prefix(prefix: str) -> bytes:
    """What every direct (node-to-node) channel starts with."""
    return f"{prefix}:d:".encode()


def direct_channel(prefix: str, node: str) -> bytes:
    """The channel of direct messages to ``node``."""
    return direct_prefix(prefix) + node.encode()


def channel_for(prefix: str, routing: str, topic: str) -> bytes:
    """The channel a broadcast on ``topic`` is published to under ``routing`` (``"dual"``: its first one)."""
    if routing != "broadcast":
        return topic_channel(prefix, topic)
    return broadcast_channel(prefix)


def check_routing(routing: object) -> Routing:
    """``routing`` if it is one of :data:`ROUTINGS`; raises ``ValueError`` naming them otherwise."""
    if routing == "topic":
        return "topic"
    if routing == "broadcast":
        return "broadcast"
    if routing == "dual":
        return "dual"
    raise ValueError(f"routing must be one of {', '.join(map(repr, ROUTINGS))}, got {routing!r}")


def split_routing(url: str, routing: str | None) -> tuple[str, Routing]:
    """``(url without a ``routing=`` query parameter, the routing)``.

    ``routing`` given explicitly wins over the URL's; the default is
    ``"topic"``. Lets ``REDIS_URL=redis://host/0?routing=broadcast`` choose
    the routing where only a URL can be configured. Raises ``ValueError`` for
    an unknown routing.
    """
    from_url = None
    base, sep, query = url.partition("?")
    if sep:
        # By hand, not urlsplit/urlunsplit: those turn "unix:///path" into "unix:/path".
        params = [p for p in query.split("&") if p]
        for param in params:
            if param.startswith("routing="):
                from_url = unquote(param[len("routing=") :])
        kept = [p for p in params if not p.startswith("routing=")]
        url = base + ("?" + "&".join(kept) if kept else "")
    return url, check_routing(routing or from_url or "topic")
