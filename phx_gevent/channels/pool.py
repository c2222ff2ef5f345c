"""A pool of reusable worker greenlets: where channel callbacks run.

Generic (it knows nothing of channels): :class:`Partition` runs a function in a
worker greenlet and parks the worker afterwards for the next run;
:class:`Partitions` spreads connections over several of them. The channel
runtime (:mod:`phx_gevent.channels.process`) takes a worker per mailbox run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import gevent
from gevent.pool import Pool

__all__ = ["Partition", "Partitions", "TRIM_PERIOD", "default_partitions", "reader_pool"]

log = logging.getLogger(__name__)


def default_partitions() -> int:
    """The usable core count (the CPU affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


#: Parked workers unused for a whole period of this many seconds are let go.
TRIM_PERIOD = 10.0


class Partition:
    """A ``gevent.pool.Pool`` of worker greenlets that run channel callbacks, reused between runs.

    A channel's mailbox is run by a worker taken from here. A worker whose
    run is over parks itself and is resumed by the next run instead of a new
    greenlet being spawned: spawning was a third of the server's time in the
    push/reply benchmark (greenlet creation, gevent's spawn-tree bookkeeping,
    stack allocation), and reuse more than doubled the replies per second
    (benchmarks/README.md). At most ``max_idle`` workers stay parked, and
    those a whole :data:`TRIM_PERIOD` did not need are let go, so a burst
    leaves no lasting memory behind. The pool holds running and parked
    workers alike; it is unbounded unless ``size`` is given.
    """

    __slots__ = ("pool", "idle", "joined", "max_idle", "_unused", "_timer")

    def __init__(self, size: int | None = None, max_idle: int = 1024) -> None:
        self.pool = Pool(size)
        #: Workers parked in the hub, most recently used last.
        self.idle: list[Any] = []
        #: Joined channels in this partition.
        self.joined = 0
        self.max_idle = max_idle
        # The fewest parked workers seen since the last trim: that many were not needed.
        self._unused = 0
        self._timer: Any = None

    def run(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` in a worker greenlet (a parked one if any); returns the worker.

        Never blocks (unless the pool is bounded and full) and never switches
        greenlets: the run starts at the hub's next turn.
        """
        idle = self.idle
        if idle:
            worker = idle.pop()
            if len(idle) < self._unused:
                self._unused = len(idle)
            worker.parent.loop.run_callback(self._resume, worker, fn, args)
            return worker
        return self.pool.spawn(self._work, fn, args)

    def run_from_hub(self, fn: Any, *args: Any) -> Any:
        """As :meth:`run`, called from a hub callback: a parked worker starts at once, not a hub turn later.

        Used by watched WebSocket connections (one wake-up per arriving
        frame): their read watcher's callback runs in the hub, so switching
        straight to the worker saves a callback round per message.
        """
        idle = self.idle
        if idle:
            worker = idle.pop()
            if len(idle) < self._unused:
                self._unused = len(idle)
            self._resume(worker, fn, args)
            return worker
        return self.pool.spawn(self._work, fn, args)

    def _resume(self, worker: Any, fn: Any, args: tuple[Any, ...]) -> None:
        # Hub callback. A worker killed while its run was pending is dead:
        # give the run to a fresh one (the run sees its channel stopped).
        if not worker.dead:
            worker.switch(fn, args)
        elif fn is not None:
            self.pool.spawn(self._work, fn, args)

    def _work(self, fn: Any, args: Any) -> None:
        me = gevent.getcurrent()
        park = me.parent.switch
        idle = self.idle
        while True:
            try:
                fn(*args)
            except Exception:  # pragma: no cover - runs handle their own errors
                log.exception("phx_gevent: a channel run failed")
            fn = args = None  # nothing stays referenced while parked
            if len(idle) >= self.max_idle:
                return
            idle.append(me)
            if self._timer is None:
                self._timer = me.parent.loop.timer(TRIM_PERIOD, TRIM_PERIOD)
                self._timer.start(self._trim)
            fn, args = park()
            if fn is None:
                return  # let go by _trim

    def _trim(self) -> None:
        # Hub callback: let the oldest parked workers go if the last period never needed them.
        idle = self.idle
        release, self._unused = self._unused, 0
        for worker in idle[:release]:
            worker.parent.loop.run_callback(self._resume, worker, None, ())
        del idle[:release]
        self._unused = len(idle)
        if not idle and self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None

    def stats(self) -> dict[str, int]:
        """Running and parked worker greenlets, and joined channels."""
        return {"running": len(self.pool) - len(self.idle), "idle": len(self.idle), "joined": self.joined}


class Partitions:
    """The partitions of a socket mount; a connection's channels share one (chosen by hash).

    Pools give accounting (how many channel greenlets run where) and a place
    to bound concurrency later; by default they are unbounded, as Phoenix's
    channel supervisors are.
    """

    def __init__(self, count: int | None = None, size: int | None = None) -> None:
        count = default_partitions() if count is None else int(count)
        if count < 1:
            raise ValueError("partitions must be at least 1")
        self.partitions = [Partition(size) for _ in range(count)]

    def pick(self, key: object) -> Partition:
        """The partition for ``key`` (a connection), by hash."""
        return self.partitions[(hash(key) >> 4) % len(self.partitions)]

    def stats(self) -> list[dict[str, int]]:
        """Per partition: running and parked worker greenlets, and joined channels."""
        return [p.stats() for p in self.partitions]


_readers: Partition | None = None
_readers_loop: Any = None


def reader_pool() -> Partition:
    """The worker greenlets that serve watched WebSocket connections' reads (one pool per hub, unbounded).

    Separate from the channel partitions, whose pools an application may
    bound: a wake-up is started from a hub callback and must never wait.
    """
    global _readers, _readers_loop
    loop = gevent.get_hub().loop
    if _readers is None or _readers_loop is not loop:
        _readers, _readers_loop = Partition(), loop
    return _readers
