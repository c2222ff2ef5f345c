"""Presence on the client side: phoenix.js's ``Presence`` (``presence_state`` and ``presence_diff``).

::

    room = client.channel("room:lobby", {"presence": True})
    presence = Presence(room)
    presence.on_sync(lambda: print(presence.list()))
    room.join()

The state maps each key to ``{"metas": [meta, ...]}``; metas are told apart
by their ``phx_ref``. :func:`sync_state` and :func:`sync_diff` are pure (they
return a new state and leave their arguments alone).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

__all__ = ["Presence", "sync_diff", "sync_state"]

State = dict[str, dict[str, Any]]
Hook = Callable[[str, Any, Any], None] | None


def _refs(presence: dict[str, Any]) -> list[Any]:
    return [m.get("phx_ref") for m in presence.get("metas", [])]


def sync_state(current: State, new: State, on_join: Hook = None, on_leave: Hook = None) -> State:
    """The state after a full ``presence_state`` snapshot; ``on_join``/``on_leave(key, current, change)``."""
    state = copy.deepcopy(current)
    joins: State = {}
    leaves: State = {}
    for key, presence in state.items():
        if key not in new:
            leaves[key] = presence
    for key, fresh in new.items():
        known = state.get(key)
        if known is None:
            joins[key] = fresh
            continue
        known_refs, fresh_refs = _refs(known), _refs(fresh)
        joined = [m for m in fresh.get("metas", []) if m.get("phx_ref") not in known_refs]
        left = [m for m in known.get("metas", []) if m.get("phx_ref") not in fresh_refs]
        if joined:
            joins[key] = {**fresh, "metas": joined}
        if left:
            leaves[key] = {**copy.deepcopy(known), "metas": left}
    return sync_diff(state, {"joins": joins, "leaves": leaves}, on_join, on_leave)


def sync_diff(state: State, diff: dict[str, State], on_join: Hook = None, on_leave: Hook = None) -> State:
    """The state after a ``presence_diff`` (``{"joins": ..., "leaves": ...}``)."""
    state = copy.deepcopy(state)
    diff = copy.deepcopy(diff)
    for key, fresh in (diff.get("joins") or {}).items():
        known = state.get(key)
        state[key] = copy.deepcopy(fresh)
        if known is not None:
            joined_refs = _refs(state[key])
            kept = [m for m in known.get("metas", []) if m.get("phx_ref") not in joined_refs]
            state[key]["metas"] = kept + state[key].get("metas", [])
        if on_join is not None:
            on_join(key, known, fresh)
    for key, gone in (diff.get("leaves") or {}).items():
        known = state.get(key)
        if known is None:
            continue
        remove = _refs(gone)
        known["metas"] = [m for m in known.get("metas", []) if m.get("phx_ref") not in remove]
        if on_leave is not None:
            on_leave(key, known, gone)
        if not known["metas"]:
            del state[key]
    return state


class Presence:
    """Tracks a channel's presences from its ``presence_state`` and ``presence_diff`` events.

    Create it before joining. Diffs that arrive before the state of the
    current join are held and applied after it, as phoenix.js does.
    ``on_join``/``on_leave(key, current, change)`` and ``on_sync()`` run in
    the client's thread.
    """

    def __init__(self, channel: Any, state_event: str = "presence_state", diff_event: str = "presence_diff") -> None:
        self.channel = channel
        self.state: State = {}
        self._pending: list[dict[str, State]] = []
        self._join_ref: Any = None
        self._on_join: Hook = None
        self._on_leave: Hook = None
        self._on_sync: Callable[[], None] | None = None
        channel.on(state_event, self._state)
        channel.on(diff_event, self._diff)

    def on_join(self, callback: Callable[[str, Any, Any], None]) -> None:
        """``callback(key, current, joined)`` for every join (``current`` is ``None`` for a new key)."""
        self._on_join = callback

    def on_leave(self, callback: Callable[[str, Any, Any], None]) -> None:
        """``callback(key, current, left)`` for every leave."""
        self._on_leave = callback

    def on_sync(self, callback: Callable[[], None]) -> None:
        """``callback()`` after each state or diff has been applied."""
        self._on_sync = callback

    def list(self, chooser: Callable[[str, Any], Any] | None = None) -> list[Any]:
        """``[chooser(key, presence)]`` (default: the presences) in key order of arrival."""
        if chooser is None:
            return list(self.state.values())
        return [chooser(key, presence) for key, presence in self.state.items()]

    def _state(self, payload: Any, ref: Any, join_ref: Any) -> None:
        self._join_ref = self.channel.join_ref
        self.state = sync_state(self.state, payload or {}, self._on_join, self._on_leave)
        pending, self._pending = self._pending, []
        for diff in pending:
            self.state = sync_diff(self.state, diff, self._on_join, self._on_leave)
        if self._on_sync is not None:
            self._on_sync()

    def _diff(self, payload: Any, ref: Any, join_ref: Any) -> None:
        if self._join_ref is None or self._join_ref != self.channel.join_ref:
            self._pending.append(payload)  # the state of this join has not arrived yet
            return
        self.state = sync_diff(self.state, payload, self._on_join, self._on_leave)
        if self._on_sync is not None:
            self._on_sync()
