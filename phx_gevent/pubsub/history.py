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
:class:`~phx_gevent.pubsub.history_redis.RedisHistory` (:mod:`.history_redis`)
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

import ujson

from ..serializers import dumps

__all__ = [
    "HistoryConfig",
    "HistoryEntry",
    "HistoryRules",
    "MemoryHistory",
    "Recovery",
    "format_offset",
    "new_epoch",
    "parse_offset",
    "recovery_from",
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
        return ujson.loads(dumps(payload))  # the same JSON settings as on the wire
    return bytes(payload)


def recovery_from(entries: list[HistoryEntry], seqs: list[int], since: tuple[str, int] | None, epoch: str, cur: int,
                  config: HistoryConfig, last: int | None) -> Recovery:  # fmt: skip
    """The recovery answer from the retained entries of one topic (shared by both stores).

    ``entries`` and their ``seqs`` oldest first, ``cur`` the topic's last seq in ``epoch``;
    ``since`` the parsed offset asked for (``None``: a backlog of the ``last`` messages).
    Never raises: an offset of another epoch, in the future, or older than what is kept
    answers ``recovered`` False.
    """
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
        return recovery_from(entries, [it[0] for it in live], parsed, epoch, cur, config, last)


# The Redis store and its helpers live in history_redis.py; their documented
# import path (``from phx_gevent.pubsub.history import publish_with_history``)
# keeps working. Lazily: history_redis imports this module.
_REDIS_NAMES = frozenset(
    {
        "APPEND_SCRIPT",
        "FETCH_SCRIPT",
        "GAP_SCRIPT",
        "RESET_SCRIPT",
        "RedisHistory",
        "append_args",
        "decode_fetch",
        "decode_raw",
        "gap_args",
        "history_keys",
        "load_rules",
        "meta_ttl_ms",
        "patterns_key",
        "publish_with_history",
    }
)


def __getattr__(name: str) -> Any:
    if name in _REDIS_NAMES:
        from . import history_redis

        return getattr(history_redis, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
