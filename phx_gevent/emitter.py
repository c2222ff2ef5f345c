"""Broadcast into phx_gevent from any Python process: a cron job, a Celery task, another web app.

::

    from phx_gevent import Emitter

    with Emitter("redis://localhost:6379/0") as emitter:
        emitter.broadcast("room:lobby", "new_msg", {"body": "deploy finished"})
        emitter.disconnect("user_socket:alice")

An :class:`Emitter` is a node of the Redis bus that only publishes. It
writes the same envelope, on the same channel, as the servers' Redis
adapter (it reuses :mod:`phx_gevent.pubsub.codec`), so the servers cannot
tell it from one of their own workers; it never subscribes.

On a topic that keeps history (the patterns the servers publish in Redis,
see docs/recovery.md), a broadcast of a kept event runs the servers' append
script instead of a plain ``PUBLISH``, so it gets an offset and can be
recovered like any other; :meth:`Emitter.broadcast` returns that offset.

Unlike ``Endpoint.broadcast``, which queues for a greenlet and returns at
once, every call here is synchronous: it returns once Redis has
acknowledged the ``PUBLISH``, or raises. It needs no gevent patching and no
Flask app; it is thread-safe (a bounded pool of plain redis-py connections)
and survives ``fork()`` (redis-py's pool reconnects in the child).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from .errors import EmitterError, EmitterUnavailable, PayloadError
from .pubsub import codec, redis_connect
from .pubsub import history as _history
from .pubsub.base import make_node_name
from .pubsub.local import check_broadcast
from .pubsub.routing import broadcast_channel, channel_for, check_routing, mark, split_routing

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError, ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.retry import Retry
except ImportError:  # pragma: no cover - redis-py is the "redis" extra: fail when an Emitter is made
    redis = None  # type: ignore[assignment]
    RedisError = ResponseError = RedisConnectionError = RedisTimeoutError = Exception  # type: ignore[assignment,misc]

__all__ = ["Emitter"]

log = logging.getLogger(__name__)

# Failures worth another attempt: the connection, not the command.
_RETRY: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
if redis is not None:
    from redis.exceptions import ClusterDownError, RedisClusterException, TryAgainError

    # A Redis Cluster reconfiguring (a shard down, a failover, a slot migrating) is worth another attempt.
    _RETRY += (ClusterDownError, TryAgainError, RedisClusterException)
# "dual" routing: a broadcast on its topic's channel and, marked, on the broadcast channel.
_DUAL_PUBLISH = "redis.call('PUBLISH', ARGV[1], ARGV[2]) return redis.call('PUBLISH', ARGV[3], ARGV[4])"
# Envelopes per pipelined write in broadcast_many (and at most this many bytes).
_CHUNK = 1000
_CHUNK_BYTES = 1024 * 1024


class Emitter:
    """Publishes broadcasts and disconnects to the servers of a ``pubsub="redis://..."`` endpoint.

    ``redis_url``
        A URL (``redis://[user:password@]host:port/db``, ``rediss://...``,
        ``unix:///path/redis.sock?db=0``), or a ready ``redis.Redis`` client
        whose connection pool is used as is (its own timeouts apply; it is
        not closed by :meth:`close`).
    ``prefix``
        The endpoint's ``pubsub_prefix`` (default ``"phx"``, the same as
        :class:`~phx_gevent.Endpoint`'s).
    ``routing``
        The servers' routing (``"topic"``, the default, ``"broadcast"``, or
        ``"dual"`` while they switch; see :mod:`phx_gevent.pubsub.routing`);
        also read from the URL's ``routing=`` query parameter.
    ``timeout``
        Seconds a call keeps retrying while Redis is unreachable; past it the
        call raises :class:`~phx_gevent.errors.EmitterUnavailable`. One attempt
        takes at most ``connect_timeout`` + ``socket_timeout``, so a call
        returns or raises within ``timeout + connect_timeout + socket_timeout``.
    ``connect_timeout``, ``socket_timeout``
        Seconds, per attempt (for a URL).
    ``max_connections``
        Size of the connection pool shared by the calling threads; a thread
        waits (within ``timeout``) when all are busy.
    ``node_name``
        The sender name written in each envelope (default
        ``emitter@host:pid:random``).
    ``rules_ttl``
        Seconds the history rules read from Redis are reused before they are
        read again (a topic pattern the servers start keeping is seen
        within this time).

    Other keyword arguments go to redis-py's connections (``password``,
    ``ssl_ca_certs``, ...). Raises ``ValueError`` for a URL redis-py cannot
    parse or a bad prefix; nothing connects before the first call.
    """

    def __init__(
        self,
        redis_url: str | Any,
        prefix: str = "phx",
        *,
        routing: str | None = None,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        socket_timeout: float = 5.0,
        max_connections: int = 16,
        node_name: str | None = None,
        rules_ttl: float = 60.0,
        **redis_kwargs: Any,
    ) -> None:
        if redis is None:  # pragma: no cover
            raise ImportError("Emitter needs redis-py: pip install 'phx_gevent[redis]'")
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ValueError(f"prefix must be a non-empty string without spaces, got {prefix!r}")
        if node_name is not None and (not isinstance(node_name, str) or not node_name or "\n" in node_name):
            raise ValueError(f"node_name must be a non-empty string without newlines, got {node_name!r}")
        if timeout < 0 or connect_timeout <= 0 or socket_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.prefix = prefix
        self.timeout = float(timeout)
        self.node_name = node_name or make_node_name("emitter")
        if isinstance(redis_url, str):
            redis_url, self.routing = split_routing(redis_url, routing)
        else:
            self.routing = check_routing(routing or "topic")
        self.rules_ttl = float(rules_ttl)
        self._rules: _history.HistoryRules | None = None
        self._rules_until = 0.0
        self._closed = False
        self._lock = threading.Lock()
        #: A Redis Cluster client (``redis+cluster://`` or a list of nodes), else ``None``.
        self._cluster: Any = None
        self._pool: Any = None
        if isinstance(redis_url, (str, list, tuple)):
            redis_kwargs.setdefault("socket_timeout", float(socket_timeout))
            redis_kwargs.setdefault("socket_connect_timeout", float(connect_timeout))
            # RESP2 (every Redis speaks it, as the adapter does); the retries are ours, bounded by `timeout`.
            redis_kwargs["protocol"] = 2
            redis_kwargs["retry"] = Retry(NoBackoff(), 0)
            redis_kwargs.setdefault("client_name", f"{prefix}:emitter")
            # Validates the URL (single, TLS, ACL user, Sentinel, Cluster); connects nothing.
            target = redis_connect.target(redis_url, **redis_kwargs)
            self._where = target.describe()
            if target.kind == "cluster":
                from .pubsub.redis_cluster import cluster_client

                if self.routing != "topic":
                    raise ValueError("a Redis Cluster shards by topic: routing must be 'topic' (leave it out)")

                self._cluster = cluster_client(target, max_connections=int(max_connections))
                self._pool = None
            else:
                self._pool = target.pool(
                    blocking=True, max_connections=int(max_connections), timeout=max(self.timeout, 0.1)
                )
            self._own_pool = True
        elif isinstance(redis_url, redis.Redis):
            self._pool = redis_url.connection_pool
            self._own_pool = False
        else:
            raise TypeError(
                "Emitter expects a Redis URL, a redis.Redis client or an Endpoint/RedisAdapter "
                f"(see Emitter.for_endpoint), got {type(redis_url).__name__}"
            )
        if not isinstance(redis_url, (str, list, tuple)):
            self._where = _describe(self._pool)

    @classmethod
    def for_endpoint(cls, endpoint: Any, **options: Any) -> Emitter:
        """An emitter for the Redis and prefix of ``endpoint`` (an Endpoint, its PubSub, or a RedisAdapter).

        Handy in a process that imports the app's module without serving it
        (a Celery worker sharing the app's configuration). Connection
        options given to the adapter outside its URL (``password=``...) are
        not copied: pass them again in ``options``. Raises ``ValueError``
        when it has no Redis adapter.
        """
        adapter = getattr(getattr(endpoint, "pubsub", endpoint), "adapter", endpoint)
        url, prefix = getattr(adapter, "url", None), getattr(adapter, "prefix", None)
        if not isinstance(url, (str, list, tuple)) or not isinstance(prefix, str):
            raise ValueError(f"{endpoint!r} has no Redis adapter (Endpoint(pubsub='redis://...'))")
        options.setdefault("routing", getattr(adapter, "routing", None))
        return cls(url, prefix, **options)

    def __repr__(self) -> str:
        return f"<Emitter {self._where} prefix={self.prefix!r}>"

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the API --------------------------------------------------------------------------

    def broadcast(self, topic: str, event: str, payload: dict[str, Any] | bytes) -> str | None:
        """Send ``event`` with ``payload`` to every subscriber of ``topic`` on every server node.

        ``payload`` is a dict (JSON) or ``bytes`` (a binary frame to
        WebSocket clients). Returns once Redis accepted the message: the
        message's offset (``"<epoch>-<seq>"``) on a topic that keeps history
        of ``event``, else ``None`` (also when no server was listening: Redis
        accepted it all the same). Raises
        :class:`~phx_gevent.errors.PayloadError` before sending anything when
        the message cannot be encoded,
        :class:`~phx_gevent.errors.EmitterUnavailable` when Redis did not
        accept it within ``timeout``, and
        :class:`~phx_gevent.errors.EmitterError` when Redis refused it or the
        emitter is closed.
        """
        return self._publish([self._encode(topic, event, payload)])[0]

    def broadcast_many(self, messages: Iterable[tuple[str, str, dict[str, Any] | bytes]]) -> int:
        """:meth:`broadcast` each ``(topic, event, payload)`` in order, pipelined; returns how many were sent.

        Every message is encoded before the first is sent (a bad one raises
        :class:`~phx_gevent.errors.PayloadError` and nothing is sent). Much
        faster than a loop of :meth:`broadcast`: one round trip per thousand
        messages. On :class:`~phx_gevent.errors.EmitterUnavailable` some of
        the first messages may have been delivered.
        """
        encoded = [self._encode(topic, event, payload) for topic, event, payload in messages]
        sent = 0
        while sent < len(encoded):
            chunk: list[tuple[dict[str, Any], bytes]] = []
            size = 0
            while sent + len(chunk) < len(encoded) and len(chunk) < _CHUNK and size < _CHUNK_BYTES:
                item = encoded[sent + len(chunk)]
                chunk.append(item)
                size += len(item[1])
            self._publish(chunk)
            sent += len(chunk)
        return sent

    def disconnect(self, socket_id: str) -> None:
        """Close every connection and long-poll session whose ``Socket.id`` is ``socket_id``, on every node.

        The same message as ``endpoint.broadcast(socket_id, "disconnect", {})``:
        WebSockets close with 1001 and phoenix.js reconnects (running
        ``connect`` again). Raises like :meth:`broadcast`.
        """
        if not isinstance(socket_id, str) or not socket_id:
            raise PayloadError(f"socket_id must be a non-empty string, got {socket_id!r}")
        self.broadcast(socket_id, "disconnect", {})

    def ping(self) -> None:
        """Check that Redis answers (within ``timeout``; every primary of a cluster); raises like :meth:`broadcast`."""
        if self._cluster is not None:
            self._run(lambda _conn: self._cluster.ping(target_nodes="primaries"), cluster=True)
            return
        self._run(lambda conn: _roundtrip(conn, [("PING",)]))

    def close(self) -> None:
        """Release the connections (of a pool this emitter created); later calls raise. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._cluster is not None:
            self._cluster.close()
        elif self._own_pool:
            self._pool.disconnect()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    # -- internals ------------------------------------------------------------------------

    def _encode(self, topic: Any, event: Any, payload: Any) -> tuple[dict[str, Any], bytes]:
        try:
            check_broadcast(topic, event, payload)
            envelope = {"k": "b", "n": self.node_name, "t": topic, "e": event, "p": payload, "x": None}
            return envelope, codec.encode(envelope, self.node_name)
        except (TypeError, ValueError, OverflowError) as exc:
            raise PayloadError(f"cannot broadcast {event!r} on {topic!r}: {exc}") from None

    def _history_rules(self, conn: Any) -> _history.HistoryRules:
        # The patterns the servers published (HGETALL), reused for rules_ttl seconds.
        now = time.monotonic()
        rules = self._rules
        if rules is not None and now < self._rules_until:
            return rules
        raw = _roundtrip(conn, [("HGETALL", _history.patterns_key(self.prefix))])[0]
        rules = _history.HistoryRules()
        pairs = list(raw.items()) if isinstance(raw, dict) else list(zip(raw[::2], raw[1::2], strict=False))
        for pattern, config in pairs:
            name = pattern.decode() if isinstance(pattern, bytes) else str(pattern)
            try:
                rules.add(name, _history.HistoryConfig.coerce(json.loads(config)))  # type: ignore[arg-type]
            except (ValueError, TypeError):
                log.warning("phx_gevent: emitter ignored an invalid history rule for %r in Redis", name)
        self._rules, self._rules_until = rules, now + self.rules_ttl
        return rules

    def _command(self, rules: _history.HistoryRules, envelope: dict[str, Any], data: bytes) -> tuple[Any, ...]:
        config = rules.for_topic(envelope["t"]) if rules else None
        if config is None or not config.keeps(envelope["e"]):
            channel = channel_for(self.prefix, self.routing, envelope["t"])
            if self.routing == "dual":
                # Both copies in one command (one reply per message, as the retries count them).
                return (b"EVAL", _DUAL_PUBLISH, 0, channel, data, broadcast_channel(self.prefix), mark(data))
            return (b"PUBLISH", channel, data)
        # The servers' own script: offset, stream append and PUBLISH in one atomic step.
        args, _ = _history.append_args(self.prefix, self.node_name, envelope, config, False, self.routing)
        return (b"EVAL", _history.APPEND_SCRIPT, 2, *args)

    def _publish(self, items: list[tuple[dict[str, Any], bytes]]) -> list[str | None]:
        if self._cluster is not None:
            return self._publish_cluster(items)
        pending = list(items)
        replies: list[Any] = []

        def attempt(conn: Any) -> list[Any]:
            rules = self._history_rules(conn)
            commands = [self._command(rules, envelope, data) for envelope, data in pending]
            before = len(replies)
            try:
                _roundtrip(conn, commands, replies)
            finally:
                # What Redis acknowledged is never sent again, even when a later reply is lost.
                del pending[: len(replies) - before]
            return replies

        self._run(attempt)
        return [r.decode() if isinstance(r, bytes) else None for r in replies]

    def _publish_cluster(self, items: list[tuple[dict[str, Any], bytes]]) -> list[str | None]:
        # Redis Cluster: each message to its topic's shard (SPUBLISH on <prefix>:t:{topic}, or the
        # sharded append script, whose keys share that slot); redis-py routes by slot and follows MOVED.
        from .pubsub.redis_shard import SHARDED_APPEND_SCRIPT
        from .pubsub.routing import topic_channel

        client = self._cluster
        pending = list(items)
        replies: list[Any] = []

        def attempt(_conn: Any) -> list[Any]:
            rules = self._cluster_rules()
            pipe = client.pipeline(transaction=False)
            for envelope, data in pending:
                config = rules.for_topic(envelope["t"]) if rules else None
                if config is None or not config.keeps(envelope["e"]):
                    pipe.execute_command("SPUBLISH", topic_channel(self.prefix, envelope["t"]), data)
                else:
                    args, _ = _history.append_args(self.prefix, self.node_name, envelope, config, False, "topic")
                    pipe.execute_command("EVAL", SHARDED_APPEND_SCRIPT, 2, *args)
            for reply in pipe.execute(raise_on_error=True):
                replies.append(reply)
            return replies

        self._run(attempt, cluster=True)
        return [r.decode() if isinstance(r, bytes) else None for r in replies]

    def _cluster_rules(self) -> _history.HistoryRules:
        now = time.monotonic()
        if self._rules is not None and now < self._rules_until:
            return self._rules
        rules = _history.load_rules(self._cluster, self.prefix)
        self._rules, self._rules_until = rules, now + self.rules_ttl
        return rules

    def _run(self, attempt: Any, cluster: bool = False) -> Any:
        if self._closed:
            raise EmitterError("this Emitter is closed")
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        tries = 0
        while True:
            tries += 1
            try:
                if cluster:
                    return attempt(None)
                conn = self._pool.get_connection()
                try:
                    return attempt(conn)
                except BaseException:
                    # Replies may be left unread on it: never hand it to the next caller as is.
                    conn.disconnect()
                    raise
                finally:
                    self._pool.release(conn)
            except _RETRY as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    raise EmitterUnavailable(
                        f"Redis {self._where} did not accept the message within {self.timeout:g}s "
                        f"({tries} attempt{'s' if tries > 1 else ''}; last error: {reason})"
                    ) from None
                log.debug("phx_gevent: emitter attempt %d to reach Redis %s failed: %s", tries, self._where, reason)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 1.0)
            except ResponseError as exc:
                raise EmitterError(f"Redis {self._where} refused the message: {exc}") from None
            except RedisError as exc:
                raise EmitterError(f"Redis {self._where} failed: {type(exc).__name__}: {exc}") from None


def _roundtrip(conn: Any, commands: list[tuple[Any, ...]], into: list[Any] | None = None) -> list[Any]:
    """Write ``commands`` in one pipelined packet and read every reply, appending each to ``into`` as it comes."""
    replies: list[Any] = [] if into is None else into
    start = len(replies)
    conn.send_packed_command(conn.pack_commands(commands), check_health=False)
    for _ in commands:
        reply = conn.read_response()
        if isinstance(reply, ResponseError):
            raise reply
        replies.append(reply)
    return replies[start:]


def _describe(pool: Any) -> str:
    # Where Redis is, for messages: never the password.
    kw = pool.connection_kwargs
    if "path" in kw:
        return f"unix:{kw['path']}"
    return f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
