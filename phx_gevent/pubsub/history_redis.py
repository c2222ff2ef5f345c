"""Per-topic message history over Redis: the scripts, their arguments and :class:`RedisHistory`.

Per topic a hash (epoch and counter) and a stream (the messages, ``XADD ...
MAXLEN size``), both under the hash tag ``{topic}`` (one slot under Redis
Cluster). :data:`APPEND_SCRIPT` bumps the counter, appends and PUBLISHes in
one atomic step, so the order in which nodes receive messages is the order of
their offsets. Offsets, configs and the in-memory store are
:mod:`phx_gevent.pubsub.history` (which re-exports the names here).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import gevent
import ujson
from gevent.event import AsyncResult, Event
from gevent.lock import BoundedSemaphore

from . import codec
from .history import (
    MAX_LAST,
    NOT_RECOVERED,
    HistoryConfig,
    HistoryEntry,
    HistoryRules,
    Recovery,
    format_offset,
    new_epoch,
    parse_offset,
    recovery_from,
)
from .routing import MARK, broadcast_channel, channel_for, mark

__all__ = [
    "APPEND_SCRIPT",
    "FETCH_SCRIPT",
    "GAP_SCRIPT",
    "RESET_SCRIPT",
    "RedisHistory",
    "append_args",
    "gap_args",
    "history_keys",
    "load_rules",
    "publish_with_history",
]

log = logging.getLogger(__name__)

_monotonic = time.monotonic


#: KEYS: meta hash, stream. ARGV: new epoch, size, ttl ms, reset ("1"/"0"), channel,
#: message head, message tail, stored body, meta ttl ms[, second channel, its head]. Bumps
#: the counter, appends, publishes ``head .. offset .. tail`` (and, "dual" routing, the
#: marked copy on the second channel) and returns the offset, atomically.
APPEND_SCRIPT = """
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
if (not epoch) or ARGV[4] == '1' then
  epoch = ARGV[1]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 's', 0)
end
local seq = redis.call('HINCRBY', meta, 's', 1)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XADD', stream, 'MAXLEN', ARGV[2], seq .. '-1', 'd', ARGV[8], 't', now)
redis.call('PEXPIRE', stream, ARGV[3])
redis.call('PEXPIRE', meta, ARGV[9])
local offset = epoch .. '-' .. seq
redis.call('PUBLISH', ARGV[5], ARGV[6] .. offset .. ARGV[7])
if ARGV[10] then
  redis.call('PUBLISH', ARGV[10], ARGV[11] .. offset .. ARGV[7])
end
return offset
"""

#: KEYS: meta hash, stream. ARGV: since seq ("" for a backlog), count, ttl ms, max replay.
#: Returns {epoch or "", current seq, now ms, entries (XRANGE/XREVRANGE form)}: after
#: ``since``, at most the last ``max replay`` (so one read also serves later offsets).
FETCH_SCRIPT = """
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e') or ''
local cur = tonumber(redis.call('HGET', meta, 's') or '0')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entries = {}
if ARGV[1] == '' then
  if tonumber(ARGV[2]) > 0 then
    entries = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', ARGV[2])
  end
else
  local from = math.max(tonumber(ARGV[1]), cur - tonumber(ARGV[4]))
  if from < cur then
    entries = redis.call('XRANGE', stream, (from + 1) .. '-1', '+', 'COUNT', cur - from)
  end
end
return {epoch, cur, now, entries}
"""

#: KEYS: meta hash, stream. ARGV: size, ttl ms, meta ttl ms, channel, head, tail[, second channel, its head].
#: Marks a gap: messages of the topic went by without offsets (a node could not
#: reach Redis). The marker takes an offset of its own, so no recovery spans it;
#: it is published (nodes skip it) so that nobody sees a jump in the offsets.
GAP_SCRIPT = """
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  return false
end
local seq = redis.call('HINCRBY', meta, 's', 1)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XADD', stream, 'MAXLEN', ARGV[1], seq .. '-1', 'g', '1', 't', now)
redis.call('PEXPIRE', stream, ARGV[2])
redis.call('PEXPIRE', meta, ARGV[3])
local offset = epoch .. '-' .. seq
redis.call('PUBLISH', ARGV[4], ARGV[5] .. offset .. ARGV[6])
if ARGV[7] then
  redis.call('PUBLISH', ARGV[7], ARGV[8] .. offset .. ARGV[6])
end
return offset
"""

#: KEYS: meta hash, stream. ARGV: new epoch, meta ttl ms. Starts a new epoch: every earlier offset is void.
RESET_SCRIPT = """
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'e', ARGV[1], 's', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


def history_keys(prefix: str, topic: str) -> tuple[str, str]:
    """The Redis keys (meta hash, stream) of ``topic``'s history, on one hash slot."""
    return f"{prefix}:h:{{{topic}}}:m", f"{prefix}:h:{{{topic}}}:s"


def patterns_key(prefix: str) -> str:
    """The Redis hash where servers publish ``pattern -> config JSON``."""
    return f"{prefix}:h:patterns"


def meta_ttl_ms(config: HistoryConfig) -> int:
    """How long the epoch and counter outlive the last message: a day, or 2 ttl if longer."""
    return int(max(86400.0, 2 * config.ttl) * 1000)


def append_args(
    prefix: str, node: str, envelope: dict[str, Any], config: HistoryConfig, reset: bool, routing: str = "topic"
) -> tuple[tuple[Any, ...], bytes]:
    """``(keys and args of APPEND_SCRIPT, plain codec message)`` for a broadcast envelope.

    The script publishes on the topic's channel under ``routing``
    (:func:`phx_gevent.pubsub.routing.channel_for`).
    """
    plain = codec.encode(envelope, node)
    head = codec.echo_prefix(node)
    body = plain[len(head) :]
    meta, stream = history_keys(prefix, envelope["t"])
    args: tuple[Any, ...] = (
        meta,
        stream,
        new_epoch(),
        config.size,
        int(config.ttl * 1000),
        "1" if reset else "0",
        channel_for(prefix, routing, envelope["t"]),
        head + b'{"o":"',
        b'",' + body[1:],
        body,
        meta_ttl_ms(config),
    )
    if routing == "dual":
        args += (broadcast_channel(prefix), head + MARK + b'"o":"')
    return args, plain


def gap_args(prefix: str, node: str, topic: str, config: HistoryConfig, routing: str = "topic") -> tuple[Any, ...]:
    """Keys and args of :data:`GAP_SCRIPT` for ``topic`` (published on its channel under ``routing``)."""
    marker = codec.encode({"k": "b", "n": node, "t": topic, "e": "phx_gap", "p": {}, "x": None}, node)
    head = codec.echo_prefix(node)
    body = marker[len(head) :]
    meta, stream = history_keys(prefix, topic)
    args: tuple[Any, ...] = (
        meta,
        stream,
        config.size,
        int(config.ttl * 1000),
        meta_ttl_ms(config),
        channel_for(prefix, routing, topic),
        head + b'{"o":"',
        b'","g":1,' + body[1:],
    )
    if routing == "dual":
        args += (broadcast_channel(prefix), head + MARK + b'"o":"')
    return args


def _decode_stored(body: bytes) -> tuple[str, Any]:
    data = ujson.loads(body)
    if "pb" in data:
        import base64

        return data["e"], base64.b64decode(data["pb"])
    return data["e"], data["p"]


def decode_fetch(
    reply: Any, topic: str, since: tuple[str, int] | None, last: int | None, config: HistoryConfig
) -> Recovery:
    """A :class:`Recovery` from :data:`FETCH_SCRIPT`'s reply."""
    return _answer(decode_raw(reply, config), since, last, config)


def _answer(raw: Any, since: tuple[str, int] | None, last: int | None, config: HistoryConfig) -> Recovery:
    if raw is None:
        return NOT_RECOVERED
    epoch, cur, entries, seqs = raw
    if not epoch:
        # Redis holds no history for the topic (never written, expired, flushed): epoch "".
        return Recovery(since is None, [], "", 0)
    return recovery_from(entries, seqs, since, epoch, cur, config, last)


def decode_raw(reply: Any, config: HistoryConfig) -> tuple[str, int, list[HistoryEntry], list[int]]:
    """``(epoch, current seq, entries, their seqs)`` from :data:`FETCH_SCRIPT`'s reply, oldest first."""
    epoch_b, cur, now, raw = reply
    epoch = epoch_b.decode() if isinstance(epoch_b, bytes) else str(epoch_b)
    cur = int(cur)
    if not epoch:
        return "", 0, [], []
    limit = int(now) - int(config.ttl * 1000)
    items = []
    for entry_id, fields in raw:
        seq = int(entry_id.split(b"-")[0])
        f = dict(zip(fields[::2], fields[1::2], strict=False))
        if int(f[b"t"]) < limit:
            continue
        if b"g" in f:
            items.append((seq, HistoryEntry(format_offset(epoch, seq), None, None)))  # type: ignore[arg-type]
            continue
        event, payload = _decode_stored(f[b"d"])
        items.append((seq, HistoryEntry(format_offset(epoch, seq), event, payload)))
    items.sort(key=lambda it: it[0])
    return epoch, cur, [it[1] for it in items], [it[0] for it in items]


class _Round:
    """The reads of one topic (or backlog size): the one running and the next, collecting callers."""

    __slots__ = ("running", "next", "low")

    def __init__(self) -> None:
        self.running: Event | None = None
        self.next: AsyncResult | None = None
        #: The lowest offset seq the next read must start after (its callers' lowest).
        self.low = 0


class _TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = _monotonic()

    def wait(self, deadline: float) -> bool:
        """Take a token, waiting until ``deadline`` at most; False when none came in time."""
        while True:
            now = _monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            delay = (1 - self.tokens) / self.rate
            if now + delay > deadline:
                return False
            gevent.sleep(delay)


class RedisHistory:
    """History in Redis, shared by every node; reads are bounded and coalesced.

    ``max_concurrent`` Redis reads at once per process and ``rate`` reads a
    second (with a burst of ``rate``): a recovery that cannot get its turn
    within ``wait`` seconds answers ``recovered: false`` rather than pile up.
    Recoveries of the same topic share reads: while one runs, the callers
    that arrive wait for the next, which starts after the lowest of their
    offsets (within ``max_replay`` of the latest) and serves them all.
    """

    def __init__(
        self,
        url_or_pool: Any,
        prefix: str,
        *,
        max_concurrent: int = 8,
        rate: float = 500.0,
        wait: float = 5.0,
    ) -> None:
        import redis

        if isinstance(url_or_pool, str):
            pool = redis.BlockingConnectionPool.from_url(url_or_pool, max_connections=max_concurrent, timeout=wait)
            self.client = redis.Redis(connection_pool=pool)
        elif hasattr(url_or_pool, "execute_command"):
            # A ready client (a RedisCluster: each script goes to the slot of its {topic} keys).
            self.client = url_or_pool
        else:
            self.client = redis.Redis(connection_pool=url_or_pool)
        self.prefix = prefix
        self.wait = float(wait)
        self._sem = BoundedSemaphore(max_concurrent)
        self._bucket = _TokenBucket(rate, rate)
        self._fetch = self.client.register_script(FETCH_SCRIPT)
        self._reset = self.client.register_script(RESET_SCRIPT)
        # (topic, since, last) -> the read running and the next one, collecting callers.
        self._rounds: dict[tuple[Any, ...], _Round] = {}
        self.stats: dict[str, int] = {"reads": 0, "coalesced": 0, "refused": 0, "errors": 0}

    def fetch(self, topic: str, since: Any, last: int | None, config: HistoryConfig, *, has_since: bool) -> Recovery:
        """Like :meth:`MemoryHistory.fetch`, from Redis; ``recovered`` False when Redis cannot answer."""
        parsed = None
        if has_since and since is not None:
            parsed = parse_offset(since)
            if parsed is None:
                return NOT_RECOVERED
        if parsed is None and not last:
            return Recovery(True, [])  # since: null and no backlog: nothing to read
        # Single flight with a next round, per topic: while a read runs, new callers
        # wait and share the one read that starts after it (a read that has already
        # started may miss what was published before they subscribed). The shared
        # read starts after the lowest offset of its callers; each takes its part.
        key = (topic, "since") if parsed is not None else (topic, "last", last)
        state = self._rounds.get(key)
        if state is None:
            state = self._rounds[key] = _Round()
        pending = state.next
        if pending is not None:
            self.stats["coalesced"] += 1
            if parsed is not None:
                state.low = min(state.low, parsed[1])
            return _answer(pending.get(), parsed, last, config)
        rnd = state.next = AsyncResult()
        state.low = parsed[1] if parsed is not None else 0
        raw = None
        try:
            gevent.sleep(0)  # let the rejoins of this instant join this round
            while state.running is not None:
                state.running.wait()
            state.next = None
            low = state.low
            state.running = Event()
            try:
                raw = self._read(topic, low if parsed is not None else None, last, config)
            finally:
                running, state.running = state.running, None
                running.set()
                if state.next is None and self._rounds.get(key) is state:
                    del self._rounds[key]
        except BaseException as exc:
            if state.next is rnd:
                state.next = None
            rnd.set(None)
            if not isinstance(exc, Exception):
                raise
            return NOT_RECOVERED
        rnd.set(raw)
        return _answer(raw, parsed, last, config)

    def _read(self, topic: str, low: int | None, last: int | None, config: HistoryConfig) -> Any:
        """The raw read (:func:`decode_raw`) after seq ``low`` (``None``: the backlog), or ``None``."""
        deadline = _monotonic() + self.wait
        if not self._bucket.wait(deadline) or not self._sem.acquire(timeout=max(0.0, deadline - _monotonic())):
            self.stats["refused"] += 1
            log.warning("phx_gevent: history read of %r refused: too many recoveries at once", topic)
            return None
        try:
            self.stats["reads"] += 1
            meta, stream = history_keys(self.prefix, topic)
            if low is None:
                n = max(0, min(int(last or 0), MAX_LAST, config.size))
                args: list[str | int] = ["", n, int(config.ttl * 1000), config.max_replay]
            else:
                args = [low, 0, int(config.ttl * 1000), config.max_replay]
            return decode_raw(self._fetch(keys=[meta, stream], args=args), config)
        except Exception as exc:
            self.stats["errors"] += 1
            log.warning("phx_gevent: history read of %r failed (%s): answering recovered false", topic, exc)
            return None
        finally:
            self._sem.release()

    def reset(self, topic: str, config: HistoryConfig) -> None:
        """Start a new epoch for ``topic`` (raises ``redis.RedisError`` when Redis is unreachable)."""
        meta, stream = history_keys(self.prefix, topic)
        self._reset(keys=[meta, stream], args=[new_epoch(), meta_ttl_ms(config)])

    def publish_rules(self, rules: HistoryRules) -> None:
        """Write the topic patterns that keep history to Redis, for emitters (raises ``RedisError``)."""
        if rules.patterns:
            self.client.hset(patterns_key(self.prefix), mapping={p: c.to_json() for p, c in rules.patterns.items()})


def load_rules(client: Any, prefix: str = "phx") -> HistoryRules:
    """The history rules servers published in Redis (see :meth:`RedisHistory.publish_rules`)."""
    rules = HistoryRules()
    for pattern, raw in client.hgetall(patterns_key(prefix)).items():
        p = pattern.decode() if isinstance(pattern, bytes) else pattern
        try:
            rules.add(p, HistoryConfig.coerce(json.loads(raw)))  # type: ignore[arg-type]
        except (ValueError, TypeError):
            log.warning("phx_gevent: ignored an invalid history rule for %r in Redis", p)
    return rules


def publish_with_history(
    client: Any,
    prefix: str,
    topic: str,
    event: str,
    payload: dict[str, Any] | bytes,
    *,
    rules: HistoryRules | None = None,
    node: str | None = None,
    routing: str = "topic",
) -> str | None:
    """Broadcast from outside the servers (an emitter), with an offset on history topics.

    ``client`` is a ``redis.Redis``; ``prefix`` the servers' ``pubsub_prefix``.
    ``rules`` defaults to what the servers published in Redis (read on each
    call: pass :func:`load_rules`'s result to save that round trip). On a
    history topic the message is appended and published atomically
    (:data:`APPEND_SCRIPT`) and its offset returned; otherwise it is
    published plain and ``None`` returned. Raises ``TypeError`` for a payload
    that cannot be encoded and ``redis.RedisError`` when Redis fails.
    ``routing`` is the servers' (:mod:`phx_gevent.pubsub.routing`).
    """
    from .base import make_node_name
    from .local import check_broadcast

    check_broadcast(topic, event, payload)
    if rules is None:
        rules = load_rules(client, prefix)
    node = node or make_node_name("emitter")
    envelope = {"k": "b", "n": node, "t": topic, "e": event, "p": payload, "x": None}
    config = rules.for_topic(topic)
    if config is None or not config.keeps(event):
        data = codec.encode(envelope, node)
        client.publish(channel_for(prefix, routing, topic), data)
        if routing == "dual":
            client.publish(broadcast_channel(prefix), mark(data))
        return None
    args, _ = append_args(prefix, node, envelope, config, False, routing)
    offset = client.eval(APPEND_SCRIPT, 2, *args)
    return offset.decode() if isinstance(offset, bytes) else offset
