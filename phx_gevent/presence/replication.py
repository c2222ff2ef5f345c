"""The replication half of :class:`~phx_gevent.presence.Presence`: its greenlet and the other nodes.

A mixin: :class:`~phx_gevent.presence.Presence` holds the state (declared
below for the type checker) and the tracking API; this module runs the
presence greenlet (local changes batched into deltas and diffs, heartbeats)
and applies what the other nodes publish (deltas, state transfers,
goodbyes, silence). The data itself is :mod:`.state`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from gevent.queue import Empty, Queue

from .. import supervise, telemetry
from ..errors import BroadcastTimeout
from ..pubsub.local import PubSub
from .state import Diff, Entries, Item, LocalChange, RemoteEvent, Replica, StateRequest, StateTransfer

__all__ = ["PRESENCE_DIFF", "PRESENCE_STATE", "Replication"]

log = logging.getLogger(__name__)

#: The event phoenix.js's ``Presence`` reads the full list from (push it after the join).
PRESENCE_STATE = "presence_state"
#: The event the diffs are broadcast with.
PRESENCE_DIFF = "presence_diff"

#: Local changes merged into one delta and one diff per topic, at most.
_BATCH = 1000


def _default_handle_metas() -> Any:
    # Presence's own (do-nothing) hook: only an override is worth calling.
    from . import Presence

    return Presence.handle_metas


class Replication:
    """The presence greenlet and the replicas of the other nodes (mixed into ``Presence``)."""

    if TYPE_CHECKING:  # pragma: no cover - declarations for the type checker only
        pubsub: PubSub
        name: str
        broadcast_period: float
        down_period: float
        max_queue: int
        dropped: int
        _local: Entries
        _nodes: dict[str, Replica]
        _queue: Queue
        _node: str
        _topic: str
        _req: str
        _state: str
        _version: int

        def list(self, topic_or_socket: Any) -> dict[str, Any]: ...
        def fetch(self, topic: str, presences: dict[str, Any]) -> dict[str, Any]: ...
        def handle_metas(
            self, topic: str, joins: dict[str, Any], leaves: dict[str, Any], presences: dict[str, Any]
        ) -> None: ...

    def _enqueue(self, item: Item) -> None:
        if not isinstance(item, LocalChange) and self._queue.qsize() >= self.max_queue:
            # Only remote input is dropped (local changes are bounded by the
            # channels): the gap is seen at the next heartbeat and resynced.
            self.dropped += 1
            return
        self._queue.put(item)

    def _loop(self) -> None:
        next_beat = time.monotonic() + self.broadcast_period
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_beat - time.monotonic()))
            except Empty:
                item = None
            if item is not None:
                try:
                    self._process(item)
                except Exception:
                    supervise.failed(f"presence {self.name!r} handling {type(item).__name__}")
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.broadcast_period
                self._publish("hb", {"v": self._version})
                self._expire(now)

    def _local_batch(self, first: LocalChange) -> None:
        """Publish ``first`` and the local changes queued right behind it as one delta and one diff per topic.

        A worker draining thousands of channels then sends a handful of
        diffs instead of one per channel to every subscriber. Net effect
        only: a presence tracked and untracked within the batch never shows.
        """
        from_version = first.version
        version = from_version
        joins: dict[str, list[Any]] = {}
        leaves: dict[str, list[Any]] = {}
        item: LocalChange | None = first
        n = 0
        while item is not None:
            version, joined, left = item.version, item.joins, item.leaves
            for row in left:
                ref = row[2]["phx_ref"]
                if joins.pop(ref, None) is None:
                    leaves[ref] = row
            for row in joined:
                joins[row[2]["phx_ref"]] = row
            n += 1
            item = None
            if n < _BATCH and not self._queue.empty() and isinstance(self._queue.peek(block=False), LocalChange):
                item = self._queue.get(block=False)
        self._publish(
            "delta",
            {
                "v": version,
                "v0": from_version,
                "j": list(joins.values()),
                "l": [[t, k, r] for r, (t, k, _) in leaves.items()],
            },
        )
        diff = Diff()
        for t, k, m in leaves.values():
            diff.leave(t, k, m)
        for t, k, m in joins.values():
            diff.join(t, k, m)
        self._broadcast(diff)

    def _process(self, item: Item) -> None:
        if isinstance(item, LocalChange):
            self._local_batch(item)
        elif isinstance(item, RemoteEvent):
            self._remote(item.event, item.payload)
        elif isinstance(item, StateRequest):
            self.pubsub.send_direct(item.node, self._state, {"v": self._version, "s": self._local.rows()})
        else:
            self._apply_state(item.node, item.payload)

    def _publish(self, event: str, payload: dict[str, Any]) -> None:
        adapter = self.pubsub.adapter
        if adapter is None:
            return
        payload["n"] = self._node
        try:
            adapter.publish({"k": "b", "n": self._node, "t": self._topic, "e": event, "p": payload, "x": None})
        except Exception:
            log.exception("phx_gevent: presence %r could not publish %s", self.name, event)

    def _broadcast(self, diff: Diff) -> None:
        for topic, (joins, leaves) in diff.topics.items():
            payload = {
                "joins": self.fetch(topic, {k: {"metas": m} for k, m in joins.items()}),
                "leaves": self.fetch(topic, {k: {"metas": m} for k, m in leaves.items()}),
            }
            try:
                self.pubsub.local_broadcast(topic, PRESENCE_DIFF, payload)
            except BroadcastTimeout:
                log.warning("phx_gevent: presence_diff on %r dropped: the process stayed overloaded", topic)
            if telemetry.presence_change.receivers:
                counts = {"joins": len(joins), "leaves": len(leaves)}
                telemetry.emit(telemetry.presence_change, self, counts, {"topic": topic, "presence": self.name})
            if type(self).handle_metas is not _default_handle_metas():
                try:
                    self.handle_metas(
                        topic,
                        {k: {"metas": m} for k, m in joins.items()},
                        {k: {"metas": m} for k, m in leaves.items()},
                        self.list(topic),
                    )
                except Exception:
                    log.exception("phx_gevent: %s.handle_metas failed on %r", type(self).__name__, topic)

    # -- from other nodes ---------------------------------------------------------------

    def _on_broadcast(self, topic: str, *, event: str, payload: Any, from_: Any = None) -> None:
        # Runs in the adapter's listener greenlet: hand over, never block.
        if isinstance(payload, dict) and payload.get("n") != self._node:
            self._enqueue(RemoteEvent(event, payload))

    def _on_sync_request(self, payload: Any, node: str) -> None:
        if node != self._node:
            self._enqueue(StateRequest(node))

    def _on_state(self, payload: Any, node: str) -> None:
        if node != self._node and isinstance(payload, dict):
            self._enqueue(StateTransfer(node, payload))

    def _peer(self, name: Any) -> Replica | None:
        if not isinstance(name, str) or not name:
            return None
        peer = self._nodes.get(name)
        if peer is None:
            peer = self._nodes[name] = Replica(time.monotonic())
        return peer

    def _ask_state(self, name: str, peer: Replica) -> None:
        now = time.monotonic()
        if now - peer.sync_asked >= self.broadcast_period:
            peer.sync_asked = now
            self.pubsub.send_direct(name, self._req, {})

    def _remote(self, event: str, payload: dict[str, Any]) -> None:
        name = payload.get("n")
        if not isinstance(name, str):
            return
        if event == "down":
            peer = self._nodes.pop(name, None)
            if peer is not None:
                self._drop(peer)
            return
        peer = self._peer(name)
        version = payload.get("v")
        if peer is None or not isinstance(version, int):
            return
        peer.last_seen = time.monotonic()
        if event == "hb":
            if version > peer.version:
                self._ask_state(name, peer)
            elif version < peer.version:
                # The owner's own heartbeat is the truth about its version: a
                # replica ahead of it was poisoned (a forged or corrupted
                # message). Forget the version and take the owner's state.
                log.warning(
                    "phx_gevent: presence %r: replica of node %s claims version %d, the node says %d; resyncing",
                    self.name,
                    name,
                    peer.version,
                    version,
                )
                peer.version = -1
                peer.sync_asked = 0.0
                self._ask_state(name, peer)
        elif event == "delta":
            first = payload.get("v0", version)
            if not isinstance(first, int) or version <= peer.version:
                return  # already applied (a state transfer covered it)
            if version - first >= _BATCH or first > version:
                # One delta covers at most _BATCH local changes: an implausible jump. Never
                # adopt its version; ask the owner for its state instead.
                self._ask_state(name, peer)
                return
            if peer.version < 0 or first != peer.version + 1:
                self._ask_state(name, peer)  # a gap (lost messages) or a peer we never synced with
            else:
                peer.version = version
                self._apply_delta(peer, payload)

    def _apply_delta(self, peer: Replica, payload: dict[str, Any]) -> None:
        diff = Diff()
        for t, k, ref in _rows(payload.get("l"), 3):
            meta = peer.entries.pop(t, k, ref) if isinstance(ref, str) else None
            if meta is not None:
                diff.leave(t, k, meta)
        for t, k, meta in _rows(payload.get("j"), 3):
            if isinstance(meta, dict) and isinstance(meta.get("phx_ref"), str):
                peer.entries.put(t, k, meta)
                diff.join(t, k, meta)
        self._broadcast(diff)

    def _apply_state(self, name: str, payload: dict[str, Any]) -> None:
        version = payload.get("v")
        peer = self._peer(name)
        if peer is None or not isinstance(version, int) or (version <= peer.version and peer.version >= 0):
            return
        new = Entries()
        for t, k, meta in _rows(payload.get("s"), 3):
            if isinstance(meta, dict) and isinstance(meta.get("phx_ref"), str):
                new.put(t, k, meta)
        diff = peer.entries.changes_to(new)
        peer.entries = new
        peer.version = version
        peer.last_seen = time.monotonic()
        self._broadcast(diff)

    def _expire(self, now: float) -> None:
        for name in [n for n, peer in self._nodes.items() if now - peer.last_seen > self.down_period]:
            log.warning(
                "phx_gevent: presence %r: node %s silent for %ss, its presences leave",
                self.name,
                name,
                self.down_period,
            )
            self._drop(self._nodes.pop(name))

    def _drop(self, peer: Replica) -> None:
        self._broadcast(peer.entries.all_leave())


def _rows(value: Any, width: int) -> list[list[Any]]:
    """The well-formed ``[topic, key, ...]`` rows of a peer's message (anything else is ignored)."""
    if not isinstance(value, list):
        return []
    return [
        row
        for row in value
        if isinstance(row, list) and len(row) == width and isinstance(row[0], str) and isinstance(row[1], str)
    ]
