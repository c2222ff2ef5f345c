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

import builtins
import logging
import os
import secrets
import time
import weakref
from collections.abc import Callable
from typing import Any

from gevent.queue import Queue

from .. import supervise
from ..channels.process import ChannelProcess
from ..pubsub.local import PubSub
from ..serializers import dumps
from ..socket import SocketState
from .replication import PRESENCE_DIFF, PRESENCE_STATE, Replication
from .state import Entries, LocalChange, PresenceCount, Replica

__all__ = ["Presence", "PresenceCount", "PRESENCE_STATE", "PRESENCE_DIFF", "trackers"]

log = logging.getLogger(__name__)

#: Every live :class:`Presence`; the gunicorn worker closes them when it stops.
trackers: weakref.WeakSet[Presence] = weakref.WeakSet()


def _new_ref() -> str:
    return secrets.token_urlsafe(12)


class Presence(Replication):
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
        self._local = Entries()
        # channel process -> {(topic, key): phx_ref}
        self._owned: dict[Any, dict[tuple[str, str], str]] = {}
        # Versions start from the clock (ms), so a tracker restarted under the
        # same node name is ahead of what its peers remember and they resync.
        self._version = time.time_ns() // 1_000_000
        self._nodes: dict[str, Replica] = {}
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
        self._local.put(topic, key, meta)
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
        meta = self._local.pop(topic, key, ref)
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
        old = self._local.get(topic, key, old_ref) if old_ref else None
        if owned is None or old_ref is None or old is None:
            raise ValueError(f"{key!r} is not tracked on {topic!r} by this channel")
        if callable(meta):
            current = {k: v for k, v in old.items() if k not in ("phx_ref", "phx_ref_prev")}
            meta = meta(current)
        new = self._check(meta)
        new["phx_ref"] = ref = _new_ref()
        new["phx_ref_prev"] = old_ref
        self._local.pop(topic, key, old_ref)
        self._local.put(topic, key, new)
        owned[(topic, key)] = ref
        self._changed([[topic, key, new]], [[topic, key, old]])
        return ref

    def _channel_down(self, proc: ChannelProcess) -> None:
        owned = self._owned.pop(proc, None)
        if not owned:
            return
        leaves = []
        for (topic, key), ref in owned.items():
            meta = self._local.pop(topic, key, ref)
            if meta is not None:
                leaves.append([topic, key, meta])
        if leaves:
            self._changed([], leaves)

    def _changed(self, joins: list[list[Any]], leaves: list[list[Any]]) -> None:
        self._version += 1
        self._enqueue(LocalChange(self._version, joins, leaves))

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
            for key, metas in entries.keys_on(topic).items():
                merged.setdefault(key, []).extend(metas.values())
        return self.fetch(topic, {key: {"metas": metas} for key, metas in merged.items()})

    def get_by_key(
        self, topic_or_socket: str | SocketState, key: str
    ) -> dict[str, builtins.list[dict[str, Any]]] | builtins.list[Any]:
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

    def local_counts(self) -> dict[str, PresenceCount]:
        """Presences tracked by this node, per topic: keys and metas (no :meth:`fetch`, nothing started)."""
        return self._local.counts()

    def known_keys(self) -> dict[str, set[str]]:
        """Keys present per topic on every node, as this node's replicas know them (no :meth:`fetch`)."""
        known: dict[str, set[str]] = {}
        for entries in [self._local, *(node.entries for node in list(self._nodes.values()))]:
            for topic, keys in entries.topic_keys().items():
                known.setdefault(topic, set()).update(keys)
        return known

    def stats(self) -> dict[str, Any]:
        """Counters: local presences, known nodes, version, queued and dropped updates."""
        local = self._local.count()
        return {
            "node": self._node,
            "version": self._version,
            "local": local,
            "nodes": {name: n.version for name, n in self._nodes.items()},
            "queued": self._queue.qsize(),
            "dropped": self.dropped,
        }
