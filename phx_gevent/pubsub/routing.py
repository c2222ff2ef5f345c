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
    (the design before per-topic routing; a whole cluster must use one routing).

In both, ``<prefix>:d:<node>`` carries direct node-to-node messages.
``<prefix>:n`` is subscribed by every node under topic routing and carries
nothing: ``PUBSUB NUMSUB <prefix>:n`` counts the nodes (the publisher waits for
them to resubscribe before replaying an outage).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "ROUTINGS",
    "Routing",
    "broadcast_channel",
    "channel_for",
    "check_routing",
    "direct_channel",
    "direct_prefix",
    "nodes_channel",
    "split_routing",
    "topic_channel",
]

Routing = Literal["topic", "broadcast"]

#: The accepted values of the ``routing`` option.
ROUTINGS: tuple[str, ...] = ("topic", "broadcast")


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
    """The channel a broadcast on ``topic`` is published to under ``routing``."""
    if routing == "topic":
        return topic_channel(prefix, topic)
    return broadcast_channel(prefix)


def check_routing(routing: object) -> Routing:
    """``routing`` if it is one of :data:`ROUTINGS`; raises ``ValueError`` naming them otherwise."""
    if routing == "topic":
        return "topic"
    if routing == "broadcast":
        return "broadcast"
    raise ValueError(f"routing must be one of {', '.join(map(repr, ROUTINGS))}, got {routing!r}")


def split_routing(url: str, routing: str | None) -> tuple[str, Routing]:
    """``(url without a ``routing=`` query parameter, the routing)``.

    ``routing`` given explicitly wins over the URL's; the default is
    ``"topic"``. Lets ``REDIS_URL=redis://host/0?routing=broadcast`` choose
    the routing where only a URL can be configured. Raises ``ValueError`` for
    an unknown routing.
    """
    from_url = None
    if "routing=" in url:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        kept = [(k, v) for k, v in query if k != "routing"]
        from_url = next((v for k, v in query if k == "routing"), None)
        url = urlunsplit(parts._replace(query=urlencode(kept)))
    return url, check_routing(routing or from_url or "topic")
