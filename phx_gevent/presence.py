"""Presence: who is on a topic, across every worker and machine (Phoenix.Presence).

::

    presence = Presence(endpoint)

    class RoomChannel(Channel):
        def join(self, topic, payload, socket):
            socket.channel_pid.send("after_join")
            return ok()

        def handle_info(self, message, socket):
            if message == "after_join":
                presence.track(socket, socket.assigns["user"], {"online_at": time.time()})
                self.push(socket, "presence_state", presence.list(socket))

phoenix.js's ``Presence`` object then keeps an up-to-date list on the client
from the ``presence_state`` push and the ``presence_diff`` broadcasts.

On the wire (what phoenix.js expects): a presence list is
``{key: {"metas": [meta, ...]}}``, each meta carrying a unique ``phx_ref``
(and ``phx_ref_prev`` after :meth:`Presence.update`); a diff is
``{"joins": <list>, "leaves": <list>}``.

How it works. Each process (node) owns the presences its channels track and
is the only one that changes them. A change bumps the node's version and is
applied locally at once (so :meth:`Presence.list` right after
:meth:`Presence.track` includes it); a greenlet then broadcasts the
``presence_diff`` to the topic's local subscribers and publishes the delta
(with its version) to the other nodes through the PubSub adapter. Each node
keeps a replica of every other node's presences and broadcasts the diffs it
applies to its own subscribers. Every ``broadcast_period`` each node publishes
a heartbeat with its version. A node that sees a gap in a peer's versions, a
peer it does not know, or a heartbeat ahead of its replica asks that peer
for its whole state (a direct message); so messages lost during a Redis
outage, or a worker that starts late, converge within a period or two. A
peer not heard from for ``down_period`` seconds is considered gone: its
presences leave (a ``presence_diff`` with the leaves), as Phoenix's tracker
does on nodedown. A node that stops cleanly (:meth:`Presence.close`) says so.

A tracked channel is monitored: when it ends (leave, crash, closed
connection, failed join) its presences leave. Nothing here comes from the
client: keys and metas are what the server's code passes.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
import weakref
from collections.abc import Callable
from typing import Any

from gevent.queue import Empty, Queue

from . import supervise, telemetry
from .channel_server import ChannelProcess
from .errors import BroadcastTimeout
from .pubsub.local import PubSub
from .serializers import dumps
from .socket import SocketState

__all__ = ["Presence", "PRESENCE_STATE", "PRESENCE_DIFF", "trackers"]

log = logging.getLogger(__name__)

#: Every live :class:`Presence`; the gunicorn worker closes them when it stops.
trackers: weakref.WeakSet[Presence] = weakref.WeakSet()

#: The event phoenix.js's ``Presence`` reads the full list from (push it after the join).
PRESENCE_STATE = "presence_state"
#: The event the diffs are broadcast with.
PRESENCE_DIFF = "presence_diff"

#: Local changes merged into one delta and one diff per topic, at most.
_BATCH = 1000

# {topic: {key: {phx_ref: meta}}}
_Entries = dict[str, dict[str, dict[str, dict[str, Any]]]]


class _Node:
    """What this node knows of another node's presences."""

    __slots__ = ("version", "entries", "last_seen", "sync_asked")

    def __init__(self, now: float) -> None:
        self.version = -1  # unknown until its state arrives
        self.entries: _Entries = {}
        self.last_seen = now
        self.sync_asked = 0.0


def _new_ref() -> str:
    return secrets.token_urlsafe(12)


def _put(entries: _Entries, topic: str, key: str, meta: dict[str, Any]) -> None:
    entries.setdefault(topic, {}).setdefault(key, {})[meta["phx_ref"]] = meta


def _pop(entries: _Entries, topic: str, key: str, ref: str) -> dict[str, Any] | None:
    keys = entries.get(topic)
    if keys is None:
        return None
    metas = keys.get(key)
    if metas is None:
        return None
    meta = metas.pop(ref, None)
    if not metas:
        del keys[key]
        if not keys:
            del entries[topic]
    return meta


def _flatten(entries: _Entries) -> list[list[Any]]:
    return [[t, k, m] for t, keys in entries.items() for k, metas in keys.items() for m in metas.values()]


class _Diff:
    """Joins and leaves collected per topic, then broadcast as one ``presence_diff`` per topic."""

    __slots__ = ("topics",)

    def __init__(self) -> None:
        self.topics: dict[str, tuple[dict[str, list[Any]], dict[str, list[Any]]]] = {}

    def join(self, topic: str, key: str, meta: dict[str, Any]) -> None:
        self.topics.setdefault(topic, ({}, {}))[0].setdefault(key, []).append(meta)

    def leave(self, topic: str, key: str, meta: dict[str, Any]) -> None:
        self.topics.setdefault(topic, ({}, {}))[1].setdefault(key, []).append(meta)


class Presence:
    """Track which keys (users, devices...) are present on which topics, on every node.

    ``target`` is the :class:`~phx_gevent.Endpoint` (or its
    :class:`~phx_gevent.pubsub.PubSub`); with a cross-node adapter (Redis)
    presences are replicated between all processes that use a ``Presence``
    of the same ``name``. ``broadcast_period`` (seconds) is the heartbeat
    interval; a node silent for ``down_period`` seconds has its presences
    removed. Subclass and override :meth:`fetch` to add data to what
    clients receive, and :meth:`handle_metas` to react to changes.

    Errors are exceptions where Phoenix returns error tuples: :meth:`track`
    of a key this channel already tracks on the topic raises ``ValueError``
    (Phoenix: ``{:error, {:already_tracked, ...}}``), :meth:`update` of a key
    it does not track raises ``ValueError`` (``{:error, :not_tracked}``), and
    a bad key or meta raises ``TypeError``; :meth:`untrack` returns ``False``
    instead of raising. Only channels can be tracked (their socket or
    ``channel_pid``): a presence leaves when its channel ends.

    All methods are safe from any greenlet and never block on the network.
    """

    def __init__(
        self,
        target: Any,
        name: str = "presence",
        *,
        broadcast_period: float = 1.5,
        down_period: float = 15.0,
        max_queue: int = 100_000,
    ) -> None:
        pubsub = getattr(target, "pubsub", target)
        if not isinstance(pubsub, PubSub):
            raise TypeError(f"Presence needs an Endpoint or a PubSub, got {target!r}")
        if broadcast_period <= 0 or down_period <= broadcast_period:
            raise ValueError("need 0 < broadcast_period < down_period")
        self.pubsub = pubsub
        self.name = name
        self.broadcast_period = float(broadcast_period)
        self.down_period = float(down_period)
        self.max_queue = int(max_queue)
        self._topic = f"phx_presence:{name}"
        self._req = f"phx_presence:{name}:req"
        self._state = f"phx_presence:{name}:state"
        self._pid = 0
        self._reset()
        trackers.add(self)

    def _reset(self) -> None:
        self._local: _Entries = {}
        # channel process -> {(topic, key): phx_ref}
        self._owned: dict[Any, dict[tuple[str, str], str]] = {}
        # Versions start from the clock (ms), so a tracker restarted under the
        # same node name is ahead of what its peers remember and they resync.
        self._version = time.time_ns() // 1_000_000
        self._nodes: dict[str, _Node] = {}
        self._queue: Queue = Queue()
        self._greenlet: Any = None
        self._node = ""
        self.dropped = 0

    # -- lifecycle ----------------------------------------------------------------------

    def _ensure_started(self) -> None:
        # Lazily, in the process that serves (after a gunicorn fork): what a
        # parent tracked belongs to the parent's channels, not to this process.
        if self._pid == os.getpid():
            return
        if self._pid:
            self._reset()
        self._pid = os.getpid()
        self.pubsub.start()
        self._node = self.pubsub.node_name
        self.pubsub.connect(self._on_broadcast, self._topic)
        self.pubsub.register(self._req, self._on_sync_request)
        self.pubsub.register(self._state, self._on_state)
        # Supervised: restarted (and counted) if it ever dies.
        self._greenlet = supervise.spawn(f"presence {self.name!r}", self._loop)
        # Peers learn of this node from its heartbeats; send one now, not in a period.
        self._publish("hb", {"v": self._version})

    def close(self) -> None:
        """Stop replicating and tell the other nodes this node's presences are gone."""
        if self._pid != os.getpid():
            return
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None:
            greenlet.kill(block=False)
        self._publish("down", {})
        self.pubsub.disconnect(self._on_broadcast, self._topic)
        self._pid = 0
        self._reset()

    # -- tracking -----------------------------------------------------------------------

    @staticmethod
    def _owner(socket_or_pid: Any, topic: str | None) -> tuple[ChannelProcess, str]:
        if isinstance(socket_or_pid, SocketState):
            proc = socket_or_pid.channel_pid
            topic = topic if topic is not None else socket_or_pid.topic
        else:
            proc = socket_or_pid
        if not isinstance(proc, ChannelProcess):
            raise TypeError(f"track a channel's socket or channel_pid, got {socket_or_pid!r}")
        if topic is None:
            topic = proc.topic
        if not isinstance(topic, str):
            raise TypeError(f"topic must be a string, got {type(topic).__name__}")
        return proc, topic

    @staticmethod
    def _key(key: Any) -> str:
        # Phoenix converts keys with to_string; clients only ever see strings.
        if isinstance(key, int) and not isinstance(key, bool):
            return str(key)
        if not isinstance(key, str):
            raise TypeError(f"a presence key must be a string (or an int), got {type(key).__name__}")
        return key

    @staticmethod
    def _check(meta: Any) -> dict[str, Any]:
        if not isinstance(meta, dict):
            raise TypeError(f"presence meta must be a dict, got {type(meta).__name__}")
        meta = dict(meta)
        # Fail here, in the caller, rather than later in the replication greenlet.
        dumps(meta)
        return meta

    def track(self, socket_or_pid: Any, key: str, meta: dict[str, Any], *, topic: str | None = None) -> str:
        """Mark ``key`` present on the channel's topic (or ``topic``) with ``meta``; returns its ``phx_ref``.

        ``socket_or_pid`` is the channel's ``socket`` (or ``socket.channel_pid``);
        the presence leaves when that channel ends. One channel may track
        several keys, and the same key on several topics. Raises
        ``ValueError`` if this channel already tracks ``key`` on the topic,
        ``TypeError`` for a key that is not a string (ints are converted, as
        Phoenix does) or a meta that is not a JSON-encodable dict
        (``OverflowError`` for NaN or infinity in it).
        """
        proc, topic = self._owner(socket_or_pid, topic)
        key = self._key(key)
        meta = self._check(meta)
        if not proc.alive:
            raise ValueError(f"{proc!r} has ended; nothing to track")
        self._ensure_started()
        owned = self._owned.get(proc)
        if owned is not None and (topic, key) in owned:
            raise ValueError(f"{key!r} is already tracked on {topic!r} by this channel (use update)")
        meta["phx_ref"] = ref = _new_ref()
        if owned is None:
            owned = self._owned[proc] = {}
            proc.monitor(self._channel_down)
        owned[(topic, key)] = ref
        _put(self._local, topic, key, meta)
        self._changed([[topic, key, meta]], [])
        return ref

    def untrack(self, socket_or_pid: Any, key: str, *, topic: str | None = None) -> bool:
        """Remove ``key`` tracked by this channel on its topic (or ``topic``); False if it was not tracked."""
        proc, topic = self._owner(socket_or_pid, topic)
        key = self._key(key)
        owned = self._owned.get(proc)
        ref = owned.pop((topic, key), None) if owned else None
        if ref is None:
            return False
        meta = _pop(self._local, topic, key, ref)
        if not owned:
            del self._owned[proc]
            proc.demonitor(self._channel_down)
        if meta is not None:
            self._changed([], [[topic, key, meta]])
        return True

    def update(
        self,
        socket_or_pid: Any,
        key: str,
        meta: dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]],
        *,
        topic: str | None = None,
    ) -> str:
        """Replace the meta of ``key`` tracked by this channel; returns the new ``phx_ref``.

        ``meta`` is the new dict, or a function of the current meta (without
        ``phx_ref``) returning it. Clients see one diff that leaves the old
        meta and joins the new one (with ``phx_ref_prev``). Raises
        ``ValueError`` when ``key`` is not tracked by this channel.
        """
        proc, topic = self._owner(socket_or_pid, topic)
        key = self._key(key)
        owned = self._owned.get(proc)
        old_ref = owned.get((topic, key)) if owned else None
        old = self._local.get(topic, {}).get(key, {}).get(old_ref) if old_ref else None
        if owned is None or old_ref is None or old is None:
            raise ValueError(f"{key!r} is not tracked on {topic!r} by this channel")
        if callable(meta):
            current = {k: v for k, v in old.items() if k not in ("phx_ref", "phx_ref_prev")}
            meta = meta(current)
        new = self._check(meta)
        new["phx_ref"] = ref = _new_ref()
        new["phx_ref_prev"] = old_ref
        _pop(self._local, topic, key, old_ref)
        _put(self._local, topic, key, new)
        owned[(topic, key)] = ref
        self._changed([[topic, key, new]], [[topic, key, old]])
        return ref

    def _channel_down(self, proc: ChannelProcess) -> None:
        owned = self._owned.pop(proc, None)
        if not owned:
            return
        leaves = []
        for (topic, key), ref in owned.items():
            meta = _pop(self._local, topic, key, ref)
            if meta is not None:
                leaves.append([topic, key, meta])
        if leaves:
            self._changed([], leaves)

    def _changed(self, joins: list[list[Any]], leaves: list[list[Any]]) -> None:
        self._version += 1
        self._enqueue(("local", self._version, joins, leaves))

    # -- reading ------------------------------------------------------------------------

    def list(self, topic_or_socket: str | SocketState) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """Everyone present on a topic, on every node: ``{key: {"metas": [meta, ...]}}``, through :meth:`fetch`.

        A node learns the other nodes' presences within a ``broadcast_period``
        or two of its first use; what it learns later reaches clients as
        ``presence_diff``.
        """
        topic = topic_or_socket.topic if isinstance(topic_or_socket, SocketState) else topic_or_socket
        if not isinstance(topic, str):
            raise TypeError(f"topic must be a string, got {type(topic).__name__}")
        self._ensure_started()
        merged: dict[str, list[dict[str, Any]]] = {}
        for entries in [self._local, *(n.entries for n in self._nodes.values())]:
            for key, metas in entries.get(topic, {}).items():
                merged.setdefault(key, []).extend(metas.values())
        return self.fetch(topic, {key: {"metas": metas} for key, metas in merged.items()})

    def get_by_key(self, topic_or_socket: str | SocketState, key: str) -> dict[str, list[dict[str, Any]]] | list[Any]:
        """``{"metas": [...]}`` of ``key`` on the topic, or ``[]`` when it is not present (as Phoenix)."""
        return self.list(topic_or_socket).get(self._key(key), [])

    def handle_metas(
        self, topic: str, joins: dict[str, Any], leaves: dict[str, Any], presences: dict[str, Any]
    ) -> None:
        """Override to react to every presence change (Phoenix's ``handle_metas/4``); the default does nothing.

        Called on every node, once per diff and topic, after the diff went to
        the topic's subscribers: ``joins``/``leaves`` are
        ``{key: {"metas": [...]}}`` (before :meth:`fetch`), ``presences`` is
        what :meth:`list` returns now. Keep your state on ``self`` (Phoenix's
        ``init/1`` state is your subclass's ``__init__``). Runs in the
        presence greenlet: keep it fast; an exception is logged and ignored.
        """

    def fetch(self, topic: str, presences: dict[str, Any]) -> dict[str, Any]:
        """Override to add data to each entry (e.g. user names from a database) before clients see it.

        Called for :meth:`list` and for the joins and leaves of every diff,
        with ``{key: {"metas": [...]}}``; return the same shape. The default
        returns ``presences`` unchanged. Runs in the replication greenlet for
        diffs: keep it fast, it delays every later diff.
        """
        return presences

    def stats(self) -> dict[str, Any]:
        """Counters: local presences, known nodes, version, queued and dropped updates."""
        local = sum(len(metas) for keys in self._local.values() for metas in keys.values())
        return {
            "node": self._node,
            "version": self._version,
            "local": local,
            "nodes": {name: n.version for name, n in self._nodes.items()},
            "queued": self._queue.qsize(),
            "dropped": self.dropped,
        }

    # -- the replication greenlet -------------------------------------------------------

    def _enqueue(self, item: tuple[Any, ...]) -> None:
        if item[0] != "local" and self._queue.qsize() >= self.max_queue:
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
                    supervise.failed(f"presence {self.name!r} handling {item[0]!r}")
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.broadcast_period
                self._publish("hb", {"v": self._version})
                self._expire(now)

    def _local_batch(self, first: tuple[Any, ...]) -> None:
        """Publish ``first`` and the local changes queued right behind it as one delta and one diff per topic.

        A worker draining thousands of channels then sends a handful of
        diffs instead of one per channel to every subscriber. Net effect
        only: a presence tracked and untracked within the batch never shows.
        """
        from_version = first[1]
        version = from_version
        joins: dict[str, list[Any]] = {}
        leaves: dict[str, list[Any]] = {}
        item: tuple[Any, ...] | None = first
        n = 0
        while item is not None:
            _, version, joined, left = item
            for row in left:
                ref = row[2]["phx_ref"]
                if joins.pop(ref, None) is None:
                    leaves[ref] = row
            for row in joined:
                joins[row[2]["phx_ref"]] = row
            n += 1
            item = None
            if n < _BATCH and not self._queue.empty() and self._queue.peek(block=False)[0] == "local":
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
        diff = _Diff()
        for t, k, m in leaves.values():
            diff.leave(t, k, m)
        for t, k, m in joins.values():
            diff.join(t, k, m)
        self._broadcast(diff)

    def _process(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "local":
            self._local_batch(item)
        elif kind == "remote":
            self._remote(item[1], item[2])
        elif kind == "req":
            self.pubsub.send_direct(item[1], self._state, {"v": self._version, "s": _flatten(self._local)})
        elif kind == "state":
            self._apply_state(item[1], item[2])

    def _publish(self, event: str, payload: dict[str, Any]) -> None:
        adapter = self.pubsub.adapter
        if adapter is None:
            return
        payload["n"] = self._node
        try:
            adapter.publish({"k": "b", "n": self._node, "t": self._topic, "e": event, "p": payload, "x": None})
        except Exception:
            log.exception("phx_gevent: presence %r could not publish %s", self.name, event)

    def _broadcast(self, diff: _Diff) -> None:
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
            if type(self).handle_metas is not Presence.handle_metas:
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
            self._enqueue(("remote", event, payload))

    def _on_sync_request(self, payload: Any, node: str) -> None:
        if node != self._node:
            self._enqueue(("req", node))

    def _on_state(self, payload: Any, node: str) -> None:
        if node != self._node and isinstance(payload, dict):
            self._enqueue(("state", node, payload))

    def _peer(self, name: Any) -> _Node | None:
        if not isinstance(name, str) or not name:
            return None
        peer = self._nodes.get(name)
        if peer is None:
            peer = self._nodes[name] = _Node(time.monotonic())
        return peer

    def _ask_state(self, name: str, peer: _Node) -> None:
        now = time.monotonic()
        if now - peer.sync_asked >= self.broadcast_period:
            peer.sync_asked = now
            self.pubsub.send_direct(name, self._req, {})

    def _remote(self, event: str, payload: dict[str, Any]) -> None:
        name = payload.get("n")
        if event == "down":
            peer = self._nodes.pop(name, None) if isinstance(name, str) else None
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

    def _apply_delta(self, peer: _Node, payload: dict[str, Any]) -> None:
        diff = _Diff()
        for t, k, ref in _rows(payload.get("l"), 3):
            meta = _pop(peer.entries, t, k, ref) if isinstance(ref, str) else None
            if meta is not None:
                diff.leave(t, k, meta)
        for t, k, meta in _rows(payload.get("j"), 3):
            if isinstance(meta, dict) and isinstance(meta.get("phx_ref"), str):
                _put(peer.entries, t, k, meta)
                diff.join(t, k, meta)
        self._broadcast(diff)

    def _apply_state(self, name: str, payload: dict[str, Any]) -> None:
        version = payload.get("v")
        peer = self._peer(name)
        if peer is None or not isinstance(version, int) or (version <= peer.version and peer.version >= 0):
            return
        new: _Entries = {}
        for t, k, meta in _rows(payload.get("s"), 3):
            if isinstance(meta, dict) and isinstance(meta.get("phx_ref"), str):
                _put(new, t, k, meta)
        diff = _Diff()
        for t, keys in peer.entries.items():
            for k, metas in keys.items():
                for ref, meta in metas.items():
                    if ref not in new.get(t, {}).get(k, {}):
                        diff.leave(t, k, meta)
        for t, keys in new.items():
            for k, metas in keys.items():
                for ref, meta in metas.items():
                    if ref not in peer.entries.get(t, {}).get(k, {}):
                        diff.join(t, k, meta)
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

    def _drop(self, peer: _Node) -> None:
        diff = _Diff()
        for t, keys in peer.entries.items():
            for k, metas in keys.items():
                for meta in metas.values():
                    diff.leave(t, k, meta)
        self._broadcast(diff)


def _rows(value: Any, width: int) -> list[list[Any]]:
    """The well-formed ``[topic, key, ...]`` rows of a peer's message (anything else is ignored)."""
    if not isinstance(value, list):
        return []
    return [
        row
        for row in value
        if isinstance(row, list) and len(row) == width and isinstance(row[0], str) and isinstance(row[1], str)
    ]
