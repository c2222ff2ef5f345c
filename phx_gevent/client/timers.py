"""Time for the client's protocol core: keyed deadlines on an injected clock, and phoenix.js's backoff.

No I/O and no threads: :class:`Timers` only remembers what is due when; the
driver asks for :meth:`Timers.next_deadline` and the core runs what is due.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable

__all__ = ["Backoff", "Timers", "reconnect_after", "rejoin_after"]

_RECONNECT = (0.010, 0.050, 0.100, 0.150, 0.200, 0.250, 0.500, 1.0, 2.0)
_REJOIN = (1.0, 2.0, 5.0)


def reconnect_after(tries: int) -> float:
    """phoenix.js's socket reconnection delay in seconds for the ``tries``-th attempt (1-based)."""
    return _RECONNECT[tries - 1] if 1 <= tries <= len(_RECONNECT) else 5.0


def rejoin_after(tries: int) -> float:
    """phoenix.js's channel rejoin delay in seconds for the ``tries``-th attempt (1-based)."""
    return _REJOIN[tries - 1] if 1 <= tries <= len(_REJOIN) else 10.0


class Timers:
    """One callback per key, each with a deadline on ``clock``; setting a key again replaces its timer."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        # key -> (deadline, sequence, callback); the heap holds (deadline, sequence, key), stale entries skipped.
        self._timers: dict[Hashable, tuple[float, int, Callable[[], None]]] = {}
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = itertools.count()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._timers

    def set(self, key: Hashable, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` ``delay`` seconds from now (replacing the timer of ``key``)."""
        when = self.clock() + delay
        seq = next(self._seq)
        self._timers[key] = (when, seq, callback)
        heapq.heappush(self._heap, (when, seq, key))

    def cancel(self, key: Hashable) -> None:
        """Forget the timer of ``key`` (nothing when there is none)."""
        self._timers.pop(key, None)

    def deadline(self, key: Hashable) -> float | None:
        """The clock value at which the timer of ``key`` runs, or ``None``."""
        entry = self._timers.get(key)
        return None if entry is None else entry[0]

    def next_deadline(self) -> float | None:
        """The earliest deadline of any timer, or ``None``."""
        heap = self._heap
        while heap:
            when, seq, key = heap[0]
            entry = self._timers.get(key)
            if entry is not None and entry[1] == seq:
                return when
            heapq.heappop(heap)  # cancelled or rescheduled
        return None

    def pop_due(self) -> Callable[[], None] | None:
        """Remove and return the callback of the earliest timer that is due now, or ``None``."""
        when = self.next_deadline()
        if when is None or when > self.clock():
            return None
        _, _, key = heapq.heappop(self._heap)
        return self._timers.pop(key)[2]


class Backoff:
    """phoenix.js's Timer: a callback after ``schedule(tries)`` seconds, the count reset on success."""

    __slots__ = ("timers", "key", "callback", "schedule", "tries")

    def __init__(
        self, timers: Timers, key: Hashable, callback: Callable[[], None], schedule: Callable[[int], float]
    ) -> None:
        self.timers = timers
        self.key = key
        self.callback = callback
        self.schedule = schedule
        self.tries = 0

    def reset(self) -> None:
        """Cancel the pending attempt and start counting from the first delay again."""
        self.tries = 0
        self.timers.cancel(self.key)

    def schedule_timeout(self) -> None:
        """Schedule the next attempt after the next delay of the schedule."""
        self.tries += 1
        self.timers.set(self.key, self.schedule(self.tries), self.callback)

    @property
    def pending(self) -> bool:
        """True while an attempt is scheduled."""
        return self.key in self.timers
