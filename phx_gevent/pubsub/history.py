"""Per-topic message history: offsets, bounded stores, and recovery after a reconnect.

A topic pattern opts in with a :class:`HistoryConfig` (on a Channel class or
a route: ``history = {"size": 1000, "ttl": 300, "events": ["new_msg"]}``).
Each broadcast of a kept event on such a topic gets an **offset**, a string
``"<epoch>-<seq>"`` (for example ``"kqzrbm-17"``): ``seq`` increases by one
per message of the topic across every worker and machine, and ``epoch`` is a
random word (it always starts with a letter, so an offset never looks like a
decimal integer, which phoenix.js would compare with its heartbeat ref) that
changes whenever the topic's history is reset (Redis flushed or restarted,
history expired, a gap during an outage). An offset of another epoch can
therefore never be "recovered" by mistake.

Two stores:

:class:`MemoryHistory`
    One process (no adapter): a deque per topic, no I/O.
:class:`RedisHistory`
    Several processes over Redis: per topic a hash (epoch and counter) and a
    stream (the messages, ``XADD ... MAXLEN size``), both under the hash tag
    ``{topic}`` (one slot under Redis Cluster). :data:`APPEND_SCRIPT` bumps the
    counter, appends and PUBLISHes in one atomic step, so the order in which
    nodes receive messages is the order of their offsets.

See docs/recovery.md for the design, the wire behaviour and the limits.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import string
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, NamedTuple

import gevent
import ujson
from gevent.event import AsyncResult, Event
from gevent.lock import BoundedSemaphore

from . import codec

__all__ = [
    "APPEND_SCRIPT",
    "FETCH_SCRIPT",
    "GAP_SCRIPT",
    "RESET_SCRIPT",
    "HistoryConfig",
    "HistoryEntry",
    "HistoryRules",
    "MemoryHistory",
    "Recovery",
    "RedisHistory",
    "format_offset",
    "history_keys",
    "new_epoch",
    "parse_offset",
    "publish_with_history",
]

log = logging.getLogger(__name__)

_monotonic = time.monotonic

#: Most messages a ``last`` backlog may ask for.
MAX_LAST = 100

_OFFSET = re.compile(r"^([a-z][a-z0-9]{3,15})-([1-9][0-9]{0,17})$")
_EPOCH_CHARS = string.ascii_lowercase + string.digits


def new_epoch() -> str:
    """A fresh random epoch: eight characters of ``[a-z0-9]``, the first a letter."""
    return secrets.choice(string.ascii_lowercase) + "".join(secrets.choice(_EPOCH_CHARS) for _ in range(7))


def format_offset(epoch: str, seq: int) -> str:
    """The offset string of message ``seq`` in ``epoch``."""
    return f"{epoch}-{seq}"


def parse_offset(value: Any) -> tuple[str, int] | None:
    """``(epoch, seq)`` of an offset, or ``None`` when ``value`` is not a well-formed offset."""
    if type(value) is not str or len(value) > 40:
        return None
    m = _OFFSET.match(value)
    if m is None:
        return None
    return m.group(1), int(m.group(2))


class HistoryConfig(NamedTuple):
    """How a topic pattern keeps history.

    ``size``: messages kept per topic. ``ttl``: seconds a message is kept.
    ``events``: the events kept (``None``: every event). ``max_replay``:
    most messages one recovery sends (a larger gap answers ``recovered:
    false``); defaults to ``size``.
    """

    size: int
    ttl: float
    events: frozenset[str] | None
    max_replay: int

    @classmethod
    def coerce(cls, value: Any) -> HistoryConfig | None:
        """A config from a dict (``size``, ``ttl``, ``events``, ``max_replay``), a config, or ``None``.

        Raises ``ValueError``/``TypeError`` for bad values.
        """
        if value is None or isinstance(value, HistoryConfig):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"history must be a dict like {{'size': 1000, 'ttl': 300}}, got {value!r}")
        unknown = set(value) - {"size", "ttl", "events", "max_replay"}
        if unknown:
            raise ValueError(f"unknown history options {sorted(unknown)}")
        size = int(value.get("size", 1000))
        ttl = float(value.get("ttl", 300))
        if size < 1 or size > 1_000_000:
            raise ValueError(f"history size must be between 1 and 1,000,000, got {size}")
        if not 0 < ttl <= 30 * 86400:
            raise ValueError(f"history ttl must be between 0 and 30 days (seconds), got {ttl}")
        events = value.get("events")
        if events is not None:
            if isinstance(events, str) or not all(isinstance(e, str) for e in events):
                raise TypeError("history events must be a list of event names")
            events = frozenset(events)
        max_replay = int(value.get("max_replay", size))
        if max_replay < 1:
            raise ValueError("history max_replay must be positive")
        return cls(size, ttl, events, min(max_replay, size))

    def keeps(self, event: str) -> bool:
        """True when broadcasts of ``event`` are kept (and carry offsets)."""
        return self.events is None or event in self.events

    def to_json(self) -> str:
        """The config as JSON (what servers publish in Redis for emitters)."""
        return json.dumps(
            {
                "size": self.size,
                "ttl": self.ttl,
                "events": None if self.events is None else sorted(self.events),
                "max_replay": self.max_replay,
            }
        )


class HistoryEntry(NamedTuple):
    """One kept message."""

    offset: str
    event: str
    payload: Any


class Recovery(NamedTuple):
    """The answer to a recovery: whether it is complete, and the messages to replay (oldest first)."""

    recovered: bool
    entries: list[HistoryEntry]
    epoch: str | None = None
    last_seq: int = 0


NOT_RECOVERED = Recovery(False, [])


def _pattern_matches(pattern: str, topic: str) -> bool:
    if pattern.endswith("*"):
        return topic.startswith(pattern[:-1])
    return topic == pattern


class HistoryRules:
    """Topic patterns (``"room:*"`` or exact topics) and their :class:`HistoryConfig`."""

    def __init__(self) -> None:
        self.patterns: dict[str, HistoryConfig] = {}
        self._cache: dict[str, HistoryConfig | None] = {}

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def add(self, pattern: str, config: HistoryConfig) -> None:
        """Keep history for topics matching ``pattern``; raises ``ValueError`` on a conflicting config."""
        old = self.patterns.get(pattern)
        if old is not None and old != config:
            raise ValueError(f"topic pattern {pattern!r} already keeps history with {old}")
        self.patterns[pattern] = config
        self._cache.clear()

    def for_topic(self, topic: str) -> HistoryConfig | None:
        """The config of ``topic`` (the longest matching pattern wins), or ``None``."""
        cache = self._cache
        try:
            return cache[topic]
        except KeyError:
            pass
        best: tuple[int, HistoryConfig] | None = None
        for pattern, config in self.patterns.items():
            if _pattern_matches(pattern, topic) and (best is None or len(pattern) > best[0]):
                best = (len(pattern), config)
        found = None if best is None else best[1]
        if len(cache) > 10_000:
            cache.clear()  # bounded: many distinct topics
        cache[topic] = found
        return found


def _copy_payload(payload: Any) -> Any:
    # History keeps its own copy: the caller may change the dict after broadcasting.
    if isinstance(payload, dict):
        return ujson.loads(codec._dumps(payload))
    return bytes(payload)


def _tail(entries: list[HistoryEntry], seqs: list[int], since: tuple[str, int] | None, epoch: str, cur: int,
          config: HistoryConfig, last: int | None) -> Recovery:  # fmt: skip
    """The recovery answer from the retained entries of one topic (shared by both stores)."""
    if since is None:
        n = 0 if last is None else max(0, min(int(last), MAX_LAST, config.size))
        kept = [e for e in entries if e.event is not None]
        chosen = kept[len(kept) - n :] if n else []
        return Recovery(True, chosen, epoch, cur)
    s_epoch, s_seq = since
    if s_epoch != epoch or s_seq > cur:
        return Recovery(False, [], epoch, cur)
    if s_seq == cur:
        return Recovery(True, [], epoch, cur)
    if cur - s_seq > config.max_replay or not seqs or seqs[0] > s_seq + 1:
        return Recovery(False, [], epoch, cur)
    chosen = entries[s_seq + 1 - seqs[0] :]
    if any(e.event is None for e in chosen):
        return Recovery(False, [], epoch, cur)  # a gap marker: messages went by without offsets
    return Recovery(True, chosen, epoch, cur)


class MemoryHistory:
    """History for one process: a bounded deque per topic, expired by age."""

    def __init__(self) -> None:
        # topic -> [epoch, seq, deque of (seq, time, event, payload), config]
        self.topics: dict[str, list[Any]] = {}
        self._next_sweep = 0.0

    def append(self, topic: str, event: str, payload: Any, config: HistoryConfig) -> str:
        """Keep a message and return its offset."""
        now = _monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        state = self.topics.get(topic)
        if state is None:
            state = self.topics[topic] = [new_epoch(), 0, deque(maxlen=config.size), config]
        state[1] += 1
        state[2].append((state[1], now, event, _copy_payload(payload)))
        return format_offset(state[0], state[1])

    def reset(self, topic: str) -> None:
        """Forget ``topic``'s history: earlier offsets no longer recover."""
        self.topics.pop(topic, None)

    def _sweep(self, now: float) -> None:
        # A topic silent for longer than its ttl holds nothing recoverable: forget it,
        # so the number of topics stays bounded by those active within their ttl.
        self._next_sweep = now + 1.0
        dead = [t for t, s in self.topics.items() if not s[2] or s[2][-1][1] < now - s[3].ttl]
        for topic in dead:
            del self.topics[topic]

    def fetch(self, topic: str, since: Any, last: int | None, config: HistoryConfig, *, has_since: bool) -> Recovery:
        """The messages after offset ``since`` (or the last ``last`` when there is no ``since``).

        Never raises for a bad offset: ``recovered`` is False then.
        """
        parsed = None
        if has_since and since is not None:
            parsed = parse_offset(since)
            if parsed is None:
                return NOT_RECOVERED
        state = self.topics.get(topic)
        if state is None:
            if parsed is not None:
                return NOT_RECOVERED
            return Recovery(True, [])
        epoch, cur, items = state[0], state[1], state[2]
        limit = _monotonic() - config.ttl
        live = [it for it in items if it[1] >= limit]
        entries = [HistoryEntry(format_offset(epoch, it[0]), it[2], it[3]) for it in live]
        return _tail(entries, [it[0] for it in live], parsed, epoch, cur, config, last)


# -- Redis -----------------------------------------------------------------------------------

#: KEYS: meta hash, stream. ARGV: new epoch, size, ttl ms, reset ("1"/"0"), channel,
#: message head, message tail, stored body, meta ttl ms. Bumps the counter, appends,
#: publishes ``head .. offset .. tail`` and returns the offset, atomically.
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

#: KEYS: meta hash, stream. ARGV: size, ttl ms, meta ttl ms, channel, head, tail.
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
    prefix: str, node: str, envelope: dict[str, Any], config: HistoryConfig, reset: bool
) -> tuple[tuple[Any, ...], bytes]:
    """``(keys and args of APPEND_SCRIPT, plain codec message)`` for a broadcast envelope."""
    plain = codec.encode(envelope, node)
    head = codec.echo_prefix(node)
    body = plain[len(head) :]
    meta, stream = history_keys(prefix, envelope["t"])
    args = (
        meta,
        stream,
        new_epoch(),
        config.size,
        int(config.ttl * 1000),
        "1" if reset else "0",
        f"{prefix}:b",
        head + b'{"o":"',
        b'",' + body[1:],
        body,
        meta_ttl_ms(config),
    )
    return args, plain


def gap_args(prefix: str, node: str, topic: str, config: HistoryConfig) -> tuple[Any, ...]:
    """Keys and args of :data:`GAP_SCRIPT` for ``topic``."""
    marker = codec.encode({"k": "b", "n": node, "t": topic, "e": "phx_gap", "p": {}, "x": None}, node)
    head = codec.echo_prefix(node)
    body = marker[len(head) :]
    meta, stream = history_keys(prefix, topic)
    return (
        meta,
        stream,
        config.size,
        int(config.ttl * 1000),
        meta_ttl_ms(config),
        f"{prefix}:b",
        head + b'{"o":"',
        b'","g":1,' + body[1:],
    )


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
    return _tail(entries, seqs, since, epoch, cur, config, last)


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
        else:
            pool = url_or_pool
        self.client = redis.Redis(connection_pool=pool)
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
        rnd = state.next
        if rnd is not None:
            self.stats["coalesced"] += 1
            if parsed is not None:
                state.low = min(state.low, parsed[1])
            return _answer(rnd.get(), parsed, last, config)
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
                args = ["", n, int(config.ttl * 1000), config.max_replay]
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
) -> str | None:
    """Broadcast from outside the servers (an emitter), with an offset on history topics.

    ``client`` is a ``redis.Redis``; ``prefix`` the servers' ``pubsub_prefix``.
    ``rules`` defaults to what the servers published in Redis (read on each
    call: pass :func:`load_rules`'s result to save that round trip). On a
    history topic the message is appended and published atomically
    (:data:`APPEND_SCRIPT`) and its offset returned; otherwise it is
    published plain and ``None`` returned. Raises ``TypeError`` for a payload
    that cannot be encoded and ``redis.RedisError`` when Redis fails.
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
        client.publish(f"{prefix}:b", codec.encode(envelope, node))
        return None
    args, _ = append_args(prefix, node, envelope, config, False)
    offset = client.eval(APPEND_SCRIPT, 2, *args)
    return offset.decode() if isinstance(offset, bytes) else offset
