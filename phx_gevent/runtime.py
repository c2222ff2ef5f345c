"""The process's delivery machinery, owned by one object: :data:`runtime`.

Everything here is shared by every connection of the process, whatever
endpoint it came through, because it is bound to the process's gevent hub and
to its memory: the flow control (:mod:`phx_gevent.flow`: the high-water mark
of queued output and the slow-client policy), the flusher that coalesces
writes, the WebSocket idle sweeper and the budget of immediate sends.

Lifetime: :data:`runtime` is created when the package is imported. Its
hub-bound parts (flusher, sweeper) are created on first use and again in a
process whose hub changed (a forked gunicorn worker). Its settings are the
defaults of :class:`~phx_gevent.flow.FlowControl` until an
:class:`~phx_gevent.Endpoint` claims some: an endpoint that passes
``max_queued_bytes=...`` (or another overload setting) owns that value while
it lives (until it is garbage-collected or :meth:`Runtime.release` is called
for it). A second endpoint that asks for a *different* value of a setting
somebody owns gets :class:`~phx_gevent.options.ConfigurationError` instead of
silently retuning the first; the same value, or no value, is fine. When the
last owner of a setting goes, the setting returns to its default.
"""

from __future__ import annotations

import gc
import os
import weakref
from typing import TYPE_CHECKING, Any

from .flow import FlowControl, flow
from .options import ConfigurationError, check_seconds

if TYPE_CHECKING:
    from .transports.flusher import Flusher
    from .transports.sweeper import IdleSweeper

__all__ = ["Runtime", "runtime", "DIRECT_BUDGET", "DIRECT_PERIOD", "process_id"]

# With ``flow.direct_send``, at most DIRECT_BUDGET frames per DIRECT_PERIOD
# seconds are sent at once from the fan-out, and only while the flusher is idle;
# the rest go through the flusher, coalesced (see Writer.write and
# benchmarks/README.md). 1,000 per 50 ms is 20k immediate sends/s (~0.15 core):
# a small fan-out at a modest rate goes out at once, a large or saturated one
# is coalesced.
DIRECT_BUDGET = 1000
DIRECT_PERIOD = 0.05

#: The settings an endpoint can claim (``Endpoint(...)`` keyword arguments).
SETTINGS = (
    "max_queued_bytes",
    "broadcast_timeout",
    "max_connection_queue_bytes",
    "slow_client_timeout",
    "sndbuf",
    "direct_send",
    "max_incomplete_input_bytes",
    "input_timeout",
)
_SECONDS = ("broadcast_timeout", "slow_client_timeout", "input_timeout")


class Runtime:
    """Flow control, flusher, idle sweeper and direct-send budget of this process (see the module doc)."""

    __slots__ = (
        "flow",
        "direct_max",
        "direct_period",
        "direct_left",
        "direct_refill",
        "_flusher",
        "_sweeper",
        "_claims",
        "_defaults",
    )

    def __init__(self, flow_control: FlowControl) -> None:
        #: The flow control every writer and broadcaster uses (also :data:`phx_gevent.flow.flow`).
        self.flow = flow_control
        #: Immediate sends allowed per period, and the period in seconds.
        self.direct_max = DIRECT_BUDGET
        self.direct_period = DIRECT_PERIOD
        #: Immediate sends left in the current period, and when that period began.
        self.direct_left = 0
        self.direct_refill = -1.0
        self._flusher: Flusher | None = None
        self._sweeper: IdleSweeper | None = None
        #: setting -> (weak reference to its owner, value)
        self._claims: dict[str, tuple[weakref.ref[Any], Any]] = {}
        self._defaults = self._current()

    # -- the hub-bound parts ---------------------------------------------------------------

    def flusher(self) -> Flusher:
        """The flusher of the current hub (a forked worker gets its own)."""
        import gevent

        loop = gevent.get_hub().loop
        flusher = self._flusher
        if flusher is None or flusher.loop is not loop:
            from .transports.flusher import Flusher

            flusher = self._flusher = Flusher(loop)
        return flusher

    def sweeper(self) -> IdleSweeper:
        """The WebSocket idle sweeper of the current hub (a forked worker gets its own)."""
        import gevent

        loop = gevent.get_hub().loop
        sweeper = self._sweeper
        if sweeper is None or sweeper.loop is not loop:
            from .transports.sweeper import IdleSweeper

            sweeper = self._sweeper = IdleSweeper(loop)
        return sweeper

    def direct_budget(self, now: float) -> bool:
        """Take one immediate send from the process's budget (:attr:`direct_max` per :attr:`direct_period`)."""
        if self.direct_left <= 0:
            if now - self.direct_refill < self.direct_period:
                return False
            self.direct_left = self.direct_max
            self.direct_refill = now
        self.direct_left -= 1
        return True

    # -- settings and their owners ---------------------------------------------------------

    def claim(self, owner: object, **settings: Any) -> None:
        """Apply ``settings`` (names in :data:`SETTINGS`) for as long as ``owner`` lives.

        ``None`` (and ``False`` for ``sndbuf``, whose ``None`` means "the OS
        default") leaves a setting alone. Raises
        :class:`~phx_gevent.options.ConfigurationError` for an unknown name, a
        bad value, or a value that differs from the one another living owner
        set; then nothing was changed.
        """
        wanted = {name: value for name, value in settings.items() if not _unset(name, value)}
        unknown = sorted(set(wanted) - set(SETTINGS))
        if unknown:
            raise ConfigurationError(f"unknown runtime setting(s) {unknown}; known: {list(SETTINGS)}")
        for name in _SECONDS:
            if name in wanted:
                check_seconds(name, wanted[name])
        conflicts = self._conflicts(owner, wanted)
        if conflicts:
            gc.collect()  # an owner that is only garbage waiting for the cycle collector owns nothing
            conflicts = self._conflicts(owner, wanted)
        if conflicts:
            raise ConfigurationError(
                "these settings are process-wide and another Endpoint already set them: "
                + "; ".join(f"{name}={theirs!r} (this one asks {wanted[name]!r})" for name, theirs in conflicts)
                + ". Pass the same values, or leave them out of the second Endpoint."
            )
        self.flow.configure(**wanted)  # validates before anything is recorded
        ref = weakref.ref(owner, self._owner_gone)
        for name, value in wanted.items():
            self._claims[name] = (ref, value)

    def release(self, owner: object) -> None:
        """Drop what ``owner`` claimed; each setting nobody owns any more returns to its default."""
        self._drop(lambda ref: ref() is owner)

    def owner(self, name: str) -> object | None:
        """The living owner of setting ``name``, or ``None`` (the default, or set directly on :attr:`flow`)."""
        claim = self._claims.get(name)
        return None if claim is None else claim[0]()

    def _conflicts(self, owner: object, wanted: dict[str, Any]) -> list[tuple[str, Any]]:
        out = []
        for name, value in wanted.items():
            claim = self._claims.get(name)
            if claim is None:
                continue
            holder = claim[0]()
            if holder is not None and holder is not owner and claim[1] != value:
                out.append((name, claim[1]))
        return out

    def _owner_gone(self, ref: weakref.ref[Any]) -> None:
        self._drop(lambda r: r is ref)

    def _drop(self, match: Any) -> None:
        gone = [name for name, (ref, _) in self._claims.items() if match(ref) or ref() is None]
        for name in gone:
            del self._claims[name]
        if gone:
            self.flow.configure(**{name: self._defaults[name] for name in gone})

    def _current(self) -> dict[str, Any]:
        f = self.flow
        return {
            "max_queued_bytes": f.high_water,
            "broadcast_timeout": f.timeout,
            "max_connection_queue_bytes": f.connection_limit,
            "slow_client_timeout": f.slow_timeout,
            "sndbuf": f.sndbuf,
            "direct_send": f.direct_send,
            "max_incomplete_input_bytes": f.max_incomplete,
            "input_timeout": f.input_timeout,
        }


def _unset(name: str, value: Any) -> bool:
    return value is False if name == "sndbuf" else value is None


#: The process's runtime; its :attr:`~Runtime.flow` is :data:`phx_gevent.flow.flow`.
runtime = Runtime(flow)


#: This process's id, kept up to date across forks: ``os.getpid()`` is a system call each time.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def process_id() -> int:
    """This process's id, without a system call (updated in a child after ``os.fork()``)."""
    return _pid
