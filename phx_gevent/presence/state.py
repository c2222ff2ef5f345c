"""Presence state, pure: who is present where, and the work items of the presence greenlet.

No I/O, no greenlets, no clock of its own: :class:`~phx_gevent.presence.Presence`
owns one :class:`Entries` for this node and a :class:`Replica` per other node,
and feeds its greenlet :class:`LocalChange`, :class:`RemoteEvent`,
:class:`StateRequest` and :class:`StateTransfer` items. What goes on the wire
is unchanged: rows ``[topic, key, meta]`` (each meta with its ``phx_ref``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Diff",
    "Entries",
    "Item",
    "LocalChange",
    "PresenceCount",
    "RemoteEvent",
    "Replica",
    "Row",
    "StateRequest",
    "StateTransfer",
]

#: One presence on the wire and in deltas: ``[topic, key, meta]``.
Row = list[Any]


@dataclass(frozen=True)
class PresenceCount:
    """How many keys are present on a topic, and how many presences (metas) they have."""

    keys: int
    metas: int


class Entries:
    """The presences one node owns: topic -> key -> ``phx_ref`` -> meta.

    Empty keys and topics are removed, so :meth:`topics` and :meth:`count`
    never see leftovers.
    """

    __slots__ = ("by_topic",)

    def __init__(self) -> None:
        self.by_topic: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}

    def put(self, topic: str, key: str, meta: dict[str, Any]) -> None:
        """Add (or replace) the presence ``meta["phx_ref"]`` of ``key`` on ``topic``."""
        self.by_topic.setdefault(topic, {}).setdefault(key, {})[meta["phx_ref"]] = meta

    def pop(self, topic: str, key: str, ref: str) -> dict[str, Any] | None:
        """Remove and return the presence ``ref`` of ``key`` on ``topic`` (``None`` if absent)."""
        keys = self.by_topic.get(topic)
        if keys is None:
            return None
        metas = keys.get(key)
        if metas is None:
            return None
        meta = metas.pop(ref, None)
        if not metas:
            del keys[key]
            if not keys:
                del self.by_topic[topic]
        return meta

    def get(self, topic: str, key: str, ref: str) -> dict[str, Any] | None:
        """The presence ``ref`` of ``key`` on ``topic``, or ``None``."""
        return self.by_topic.get(topic, {}).get(key, {}).get(ref)

    def keys_on(self, topic: str) -> dict[str, dict[str, dict[str, Any]]]:
        """``{key: {phx_ref: meta}}`` on ``topic`` (a live view: do not modify)."""
        return self.by_topic.get(topic, {})

    def counts(self) -> dict[str, PresenceCount]:
        """Per topic: its keys and presences (metas)."""
        return {
            t: PresenceCount(len(keys), sum(len(metas) for metas in keys.values()))
            for t, keys in list(self.by_topic.items())
        }

    def topic_keys(self) -> dict[str, set[str]]:
        """Per topic with anyone present: the keys (copies)."""
        return {t: set(keys) for t, keys in list(self.by_topic.items()) if keys}

    def rows(self) -> list[Row]:
        """Every presence as a wire row ``[topic, key, meta]``."""
        return [[t, k, m] for t, keys in self.by_topic.items() for k, metas in keys.items() for m in metas.values()]

    def changes_to(self, new: Entries) -> Diff:
        """The diff that turns these presences into ``new`` (a state transfer replacing a replica)."""
        diff = Diff()
        for t, keys in self.by_topic.items():
            for k, metas in keys.items():
                for ref, meta in metas.items():
                    if new.get(t, k, ref) is None:
                        diff.leave(t, k, meta)
        for t, keys in new.by_topic.items():
            for k, metas in keys.items():
                for ref, meta in metas.items():
                    if self.get(t, k, ref) is None:
                        diff.join(t, k, meta)
        return diff

    def all_leave(self) -> Diff:
        """The diff of every presence here leaving (their node went down)."""
        diff = Diff()
        for t, keys in self.by_topic.items():
            for k, metas in keys.items():
                for meta in metas.values():
                    diff.leave(t, k, meta)
        return diff

    def count(self) -> int:
        """How many presences (metas) there are."""
        return sum(len(metas) for keys in self.by_topic.values() for metas in keys.values())

    def __bool__(self) -> bool:
        return bool(self.by_topic)


@dataclass(slots=True)
class Replica:
    """What this node knows of another node's presences."""

    #: When it was last heard from (``time.monotonic()``).
    last_seen: float
    #: The version of its state we hold; -1 until its state arrives.
    version: int = -1
    entries: Entries = field(default_factory=Entries)
    #: When we last asked it for its whole state.
    sync_asked: float = 0.0


class Diff:
    """Joins and leaves collected per topic, then broadcast as one ``presence_diff`` per topic."""

    __slots__ = ("topics",)

    def __init__(self) -> None:
        self.topics: dict[str, tuple[dict[str, list[Any]], dict[str, list[Any]]]] = {}

    def join(self, topic: str, key: str, meta: dict[str, Any]) -> None:
        """``key`` joined ``topic`` with ``meta``."""
        self.topics.setdefault(topic, ({}, {}))[0].setdefault(key, []).append(meta)

    def leave(self, topic: str, key: str, meta: dict[str, Any]) -> None:
        """``key`` left ``topic`` (the presence ``meta``)."""
        self.topics.setdefault(topic, ({}, {}))[1].setdefault(key, []).append(meta)


# -- the presence greenlet's work items ----------------------------------------------------


@dataclass(slots=True)
class LocalChange:
    """This node changed its presences: ``version`` after the change, rows joined and left."""

    version: int
    joins: list[Row]
    leaves: list[Row]


@dataclass(slots=True)
class RemoteEvent:
    """A heartbeat, delta or goodbye (``event``) another node published."""

    event: str
    payload: dict[str, Any]


@dataclass(slots=True)
class StateRequest:
    """Node ``node`` asked for our whole state."""

    node: str


@dataclass(slots=True)
class StateTransfer:
    """Node ``node`` sent its whole state."""

    node: str
    payload: dict[str, Any]


Item = LocalChange | RemoteEvent | StateRequest | StateTransfer
