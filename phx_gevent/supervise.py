"""Background work that must not die, and error logs that a client cannot amplify.

Every background greenlet of the library (the Redis adapter's listener,
delivery and publisher, each presence tracker's replication loop) runs under
:func:`spawn`: an exception that escapes its own handling is logged (at most
once a minute per name, with a count of what was suppressed), counted in
:data:`counters`, and the function is started again after a short backoff, as
long as its owner still wants it. Hub callbacks that cannot be restarted (the
WebSocket sweeper, the writers' flusher) report what they catch through
:func:`failed` and keep running.

:class:`LogLimiter` is the same rate limit for errors caused by client data:
one client sending garbage must not turn into one traceback per message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent import GreenletExit

__all__ = ["spawn", "failed", "counters", "LogLimiter", "LOG_INTERVAL"]

log = logging.getLogger(__name__)

_monotonic = time.monotonic

#: Seconds between two log lines of one kind.
LOG_INTERVAL = 60.0

#: ``{name: {"failures": n, "restarts": n}}`` for every supervised name in this process.
counters: dict[str, dict[str, int]] = {}


class LogLimiter:
    """At most one log line per ``interval`` seconds; says how many were suppressed in between."""

    __slots__ = ("interval", "next_at", "suppressed")

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self.next_at = 0.0
        self.suppressed = 0

    def ready(self) -> int | None:
        """``None`` when a line was logged recently (this one is counted), else how many were suppressed."""
        now = _monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return None
        self.next_at = now + self.interval
        n, self.suppressed = self.suppressed, 0
        return n

    def log(self, logger: logging.Logger, level: int, msg: str, *args: Any, exc_info: bool = False) -> bool:
        """Log ``msg % args`` unless one was logged within the interval; True when it was logged."""
        suppressed = self.ready()
        if suppressed is None:
            return False
        if suppressed:
            msg += " (%d similar suppressed)"
            args = (*args, suppressed)
        logger.log(level, msg, *args, exc_info=exc_info)
        return True


_limiters: dict[str, LogLimiter] = {}


def _count(name: str, what: str) -> None:
    entry = counters.get(name)
    if entry is None:
        entry = counters[name] = {"failures": 0, "restarts": 0}
    entry[what] += 1


def failed(name: str) -> None:
    """Record an exception caught in background work ``name`` (call inside ``except``); logs it rate-limited."""
    _count(name, "failures")
    limiter = _limiters.get(name)
    if limiter is None:
        limiter = _limiters[name] = LogLimiter()
    limiter.log(log, logging.ERROR, "phx_gevent: %s failed", name, exc_info=True)


def _supervise(name: str, fn: Callable[..., Any], args: tuple[Any, ...], alive: Callable[[], bool]) -> None:
    delay = 0.05
    while True:
        try:
            fn(*args)
            return
        except GreenletExit:
            raise
        except Exception:
            failed(name)
        if not alive():
            return
        _count(name, "restarts")
        gevent.sleep(delay)
        delay = min(delay * 2, 5.0)
        if not alive():
            return


def spawn(name: str, fn: Callable[..., Any], *args: Any, alive: Callable[[], bool] = lambda: True) -> Any:
    """Run ``fn(*args)`` in a greenlet that restarts it (counted, logged) when it raises.

    A normal return ends the greenlet; so does ``alive()`` turning false
    (checked after a failure, before and after the backoff). Killing the
    greenlet stops it for good. Returns the greenlet.
    """
    return gevent.spawn(_supervise, name, fn, args, alive)
