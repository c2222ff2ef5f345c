"""Reference-counted subscriptions of one pub/sub connection: pure bookkeeping, no I/O, no clock of its own.

The Redis adapter subscribes, per topic routing (:mod:`phx_gevent.pubsub.routing`),
to the channels of the topics this process has local interest in. A
:class:`SubscriptionManager` decides *what* to send on one subscriber
connection and when a subscription counts as in place; the connection loops
(:mod:`phx_gevent.pubsub.redis_receive`) decide *when* to send and feed the
replies back. The rules, each unit-tested without Redis (tests/test_subscriptions.py):

- **Reference counts.** :meth:`~SubscriptionManager.acquire` and
  :meth:`~SubscriptionManager.release` are called once per holder (a local
  topic, a receiver for one topic, a join waiting for its route). The first
  holder makes the channel *pending*; the last one gone starts a *linger*
  (``linger`` seconds): a holder that comes back in time cancels it, so a
  client that rejoins at once costs no UNSUBSCRIBE/SUBSCRIBE pair.
- **Batches.** Every channel made pending between two sends goes out in one
  round: :meth:`~SubscriptionManager.take` returns all of them, in commands
  of at most ``chunk`` channels written together, plus the lingering channels
  now due for UNSUBSCRIBE. At most ``max_inflight`` subscribe rounds wait for
  their confirmations at once; what becomes pending meanwhile gathers into the
  next round (a join storm of 10,000 topics is a handful of round trips).
- **Confirmations.** Redis answers each channel of a SUBSCRIBE with one
  ``subscribe`` reply, in order. :meth:`~SubscriptionManager.confirm` marks the
  channel active and returns its :class:`Batch` once every channel of it is
  confirmed: a join that waits on the batch knows that a message published
  from then on reaches this connection.
- **One command in flight per channel.** An UNSUBSCRIBE is only sent for an
  *active* channel (never while its SUBSCRIBE is unconfirmed), and a SUBSCRIBE
  that follows an UNSUBSCRIBE is written after it on the same connection, so
  replies never confuse two rounds of one channel.
- **Connection lost.** :meth:`~SubscriptionManager.reset` forgets what Redis
  had (a new connection has no subscriptions), makes every held channel
  pending again in one restore batch, and returns the batches abandoned on the
  way (their waiters stop waiting).
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum
from typing import Any, NamedTuple

__all__ = ["Batch", "Commands", "State", "SubscriptionManager"]


class State(IntEnum):
    """Where one channel stands on the connection."""

    #: Held, not yet sent: goes out with the next :meth:`SubscriptionManager.take`.
    PENDING = 0
    #: SUBSCRIBE written, its confirmation not read yet.
    SUBSCRIBING = 1
    #: Confirmed by Redis: messages published on it reach the connection.
    ACTIVE = 2
    #: UNSUBSCRIBE written (nobody holds it any more), its confirmation not read yet.
    UNSUBSCRIBING = 3


class Batch:
    """The channels of one subscribe round; ``done`` once all are confirmed (``ok``) or abandoned (not ``ok``).

    ``waiter`` is free for the connection loops (the Redis adapter puts a gevent
    ``Event`` there when a join waits on the batch); this module never touches it.
    """

    __slots__ = ("remaining", "done", "ok", "waiter")

    def __init__(self) -> None:
        #: Channels of the round not confirmed yet.
        self.remaining: set[bytes] = set()
        self.done = False
        self.ok = False
        self.waiter: Any = None

    def __repr__(self) -> str:
        return f"<Batch remaining={len(self.remaining)} done={self.done} ok={self.ok}>"


class Commands(NamedTuple):
    """What :meth:`SubscriptionManager.take` says to write now, in this order."""

    #: UNSUBSCRIBE commands (each a list of at most ``chunk`` channels).
    unsubscribe: list[list[bytes]]
    #: SUBSCRIBE commands (each a list of at most ``chunk`` channels).
    subscribe: list[list[bytes]]
    #: The round the SUBSCRIBEs belong to (``None`` when there are none).
    batch: Batch | None


def _chunks(channels: list[bytes], size: int) -> list[list[bytes]]:
    return [channels[i : i + size] for i in range(0, len(channels), size)]


class SubscriptionManager:
    """The subscriptions of one subscriber connection (see the module docstring for the rules).

    ``linger``: seconds a channel nobody holds stays subscribed; ``chunk``:
    channels per SUBSCRIBE/UNSUBSCRIBE command; ``max_inflight``: subscribe
    rounds awaiting confirmation at once. Raises ``ValueError`` for a negative
    ``linger`` or a ``chunk``/``max_inflight`` below 1.
    """

    def __init__(self, linger: float = 1.0, chunk: int = 1000, max_inflight: int = 1) -> None:
        if linger < 0 or chunk < 1 or max_inflight < 1:
            raise ValueError("need linger >= 0, chunk >= 1 and max_inflight >= 1")
        self.linger = float(linger)
        self.chunk = int(chunk)
        self.max_inflight = int(max_inflight)
        self._refs: dict[bytes, int] = {}
        self._state: dict[bytes, State] = {}
        self._pending: dict[bytes, None] = {}
        self._next = Batch()
        self._batch_of: dict[bytes, Batch] = {}
        # Channels nobody holds, still subscribed: UNSUBSCRIBE due at (oldest first).
        self._linger: dict[bytes, float] = {}
        self._inflight: deque[Batch] = deque()
        self._active = 0
        #: A channel sent last in a restore round (:meth:`reset`): the Redis adapter's
        #: counted channel, so that once other nodes count it, the others are in place.
        self.tail: bytes | None = None
        #: Counters: commands written, channels subscribed and unsubscribed, rounds, resets.
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "subscribe_commands",
                "unsubscribe_commands",
                "subscribed",
                "unsubscribed",
                "rounds",
                "resets",
                "refused",
            ),
            0,
        )

    # -- holders --------------------------------------------------------------------------

    def acquire(self, channel: bytes) -> Batch | None:
        """One more holder of ``channel``; returns the batch to wait on, or ``None`` when it is active."""
        n = self._refs.get(channel, 0) + 1
        self._refs[channel] = n
        if n == 1:
            self._linger.pop(channel, None)
            state = self._state.get(channel)
            if state is None or state is State.UNSUBSCRIBING:
                self._state[channel] = State.PENDING
                self._pending[channel] = None
                self._next.remaining.add(channel)
                return self._next
        return self.waiting(channel)

    def release(self, channel: bytes, now: float) -> None:
        """One holder fewer; the last one starts the linger (``now`` + ``linger``). Unknown channels are ignored."""
        n = self._refs.get(channel, 0) - 1
        if n > 0:
            self._refs[channel] = n
            return
        if n < 0:
            return
        del self._refs[channel]
        state = self._state.get(channel)
        if state is State.PENDING:
            # Never sent: forget it (an UNSUBSCRIBE of an earlier round may still be answered; ignored).
            del self._pending[channel]
            self._next.remaining.discard(channel)
            del self._state[channel]
        elif state is State.SUBSCRIBING or state is State.ACTIVE:
            self._linger[channel] = now + self.linger

    def waiting(self, channel: bytes) -> Batch | None:
        """The batch whose confirmation ``channel`` waits for, or ``None`` (active, or not held)."""
        state = self._state.get(channel)
        if state is State.PENDING:
            return self._next
        if state is State.SUBSCRIBING:
            return self._batch_of.get(channel)
        return None

    def refs(self, channel: bytes) -> int:
        """How many holders ``channel`` has."""
        return self._refs.get(channel, 0)

    def state(self, channel: bytes) -> State | None:
        """Where ``channel`` stands (``None``: nothing on the connection)."""
        return self._state.get(channel)

    def is_active(self, channel: bytes) -> bool:
        """Whether Redis confirmed ``channel`` (and no UNSUBSCRIBE was sent since)."""
        return self._state.get(channel) is State.ACTIVE

    # -- the connection loop --------------------------------------------------------------

    def take(self, now: float) -> Commands:
        """What to write now: UNSUBSCRIBEs of lingering channels due at ``now``, then the pending SUBSCRIBEs.

        The pending channels all go into one round, unless ``max_inflight``
        rounds already await confirmation (they then wait for the next call).
        """
        unsubs: list[bytes] = []
        if self._linger:
            for channel, due in list(self._linger.items()):
                if due > now:
                    break  # one linger for all: the dict is in due order
                if self._state.get(channel) is State.ACTIVE:
                    del self._linger[channel]
                    self._state[channel] = State.UNSUBSCRIBING
                    self._active -= 1
                    unsubs.append(channel)
                # SUBSCRIBING: unsubscribed once confirmed (one command in flight per channel).
        subs: list[bytes] = []
        batch = None
        if self._pending and len(self._inflight) < self.max_inflight:
            batch = self._next
            subs = list(self._pending)
            self._pending.clear()
            self._next = Batch()
            batch_of = self._batch_of
            state = self._state
            for channel in subs:
                state[channel] = State.SUBSCRIBING
                batch_of[channel] = batch
            self._inflight.append(batch)
            self.counters["rounds"] += 1
        counters = self.counters
        unsub_cmds = _chunks(unsubs, self.chunk)
        sub_cmds = _chunks(subs, self.chunk)
        counters["unsubscribe_commands"] += len(unsub_cmds)
        counters["unsubscribed"] += len(unsubs)
        counters["subscribe_commands"] += len(sub_cmds)
        counters["subscribed"] += len(subs)
        return Commands(unsub_cmds, sub_cmds, batch)

    def has_work(self, now: float) -> bool:
        """Whether :meth:`take` would return something now."""
        if self._pending and len(self._inflight) < self.max_inflight:
            return True
        due = self.next_due()
        return due is not None and due <= now

    def next_due(self) -> float | None:
        """When the first lingering channel is due for UNSUBSCRIBE (``None``: none lingers)."""
        for channel, due in self._linger.items():
            if self._state.get(channel) is State.ACTIVE:
                return due
        return None

    def confirm(self, channel: bytes) -> Batch | None:
        """Redis confirmed the SUBSCRIBE of ``channel``; returns its batch when that completes it."""
        if self._state.get(channel) is State.SUBSCRIBING:
            self._state[channel] = State.ACTIVE
            self._active += 1
        batch = self._batch_of.pop(channel, None)
        if batch is None:
            return None
        batch.remaining.discard(channel)
        if batch.remaining or batch.done:
            return None
        batch.done = batch.ok = True
        try:
            self._inflight.remove(batch)
        except ValueError:
            pass
        return batch

    def refused(self) -> list[Batch]:
        """Redis refused a subscription command (e.g. an ACL without the channels): give up the rounds in flight.

        Their unconfirmed channels count as active (never retried on this
        connection: the refusal would repeat); returns the batches, done and
        not ``ok``, whose waiters must stop waiting.
        """
        failed = list(self._inflight)
        self._inflight.clear()
        for batch in failed:
            for channel in batch.remaining:
                if self._state.get(channel) is State.SUBSCRIBING:
                    self._state[channel] = State.ACTIVE
                    self._active += 1
                self._batch_of.pop(channel, None)
            batch.remaining.clear()
            batch.done = True
            batch.ok = False
        self.counters["refused"] += len(failed)
        return failed

    def unsubscribed(self, channel: bytes) -> None:
        """Redis confirmed the UNSUBSCRIBE of ``channel`` (ignored when it is held again since)."""
        if self._state.get(channel) is State.UNSUBSCRIBING:
            del self._state[channel]

    def reset(self) -> tuple[Batch, list[Batch]]:
        """The connection is new (or lost): nothing is subscribed; every held channel is pending again.

        Returns the restore batch (every held channel, sent with the next
        :meth:`take`) and the batches abandoned (done, not ``ok``), whose
        waiters must stop waiting.
        """
        abandoned = [b for b in self._inflight if not b.done]
        if self._next.remaining or self._next.waiter is not None:
            abandoned.append(self._next)
        for batch in abandoned:
            batch.done = True
            batch.ok = False
        self._inflight.clear()
        self._batch_of.clear()
        self._linger.clear()
        self._pending = dict.fromkeys(self._refs)
        tail = self.tail
        if tail is not None and tail in self._pending:
            del self._pending[tail]
            self._pending[tail] = None
        self._state = dict.fromkeys(self._refs, State.PENDING)
        self._active = 0
        self._next = Batch()
        self._next.remaining.update(self._refs)
        self.counters["resets"] += 1
        return self._next, abandoned

    # -- monitoring -----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters plus ``channels`` (held), ``active``, ``pending`` and ``lingering`` now."""
        return {
            **self.counters,
            "channels": len(self._refs),
            "active": self._active,
            "pending": len(self._pending),
            "lingering": len(self._linger),
        }
