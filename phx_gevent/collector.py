"""The cyclic garbage collector's settings for a server process: fewer full collections, smaller ones.

A server that holds thousands of connections keeps hundreds of thousands of
container objects alive (each connection's socket, writer, channel state),
and CPython's collector walks all of them at every full collection. With
Python's defaults (first-generation threshold 700) a reconnect storm of
10,000 clients triggered six full collections; together with the young
collections they were about a fifth of the server's CPU during the storm, and
each full one held every connection's heartbeat for up to hundreds of
milliseconds (``benchmarks/results/storm-10000-gc-tune.md``).

:func:`tune_collector` is what ``phx_gevent.serve()`` and the gunicorn worker
do once the application is loaded, before the first connection:

* ``gc.collect()`` then ``gc.freeze()``: the objects of start-up (modules,
  classes, the app and its routes: tens of thousands) move to the permanent
  generation, which no collection walks again (under gunicorn's
  ``--preload`` this also keeps the workers from writing to pages they share
  with the master);
* the first generation's threshold goes from 700 to :data:`DEFAULT_THRESHOLD`
  allocations. Young collections then run a fourteenth as often (each
  longer: about 0.1 ms for 10,000 young objects on the benchmark machine),
  and full ones, which follow every hundred young ones at most, far less
  often: none during the 10,000-client storm, against six before.

Nothing else changes: reference counting frees almost everything at once as
before; only cyclic garbage waits longer (at most ``threshold`` more objects).
``threshold=None`` leaves Python's settings alone; the gunicorn worker reads
``PHX_GC_THRESHOLD`` (a number, or ``off``).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping

from .options import ConfigurationError, from_env

__all__ = ["DEFAULT_THRESHOLD", "THRESHOLD_ENV", "check_threshold", "describe", "threshold_from_env", "tune_collector"]

log = logging.getLogger(__name__)

#: The first-generation threshold a server process runs with (Python's default is 700).
DEFAULT_THRESHOLD = 10_000
#: The environment variable that sets the threshold for the gunicorn worker (``off``: Python's own).
THRESHOLD_ENV = "PHX_GC_THRESHOLD"


def check_threshold(value: object, what: str = "gc_threshold") -> int | None:
    """``value`` as a first-generation threshold (``None``: leave the collector alone).

    Raises :class:`~phx_gevent.options.ConfigurationError` (a ``ValueError``)
    for anything but ``None`` or an int from 100 to 10,000,000 (below, the
    collector would run more often than Python's default; above, cyclic
    garbage could pile up for minutes).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 10_000_000:
        raise ConfigurationError(f"{what} must be None or an int from 100 to 10000000, got {value!r}")
    return value


def threshold_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The gunicorn worker's threshold: ``$PHX_GC_THRESHOLD``; unset or empty: :data:`DEFAULT_THRESHOLD`.

    ``off`` (or ``none``) gives ``None``: Python's settings, untouched and
    nothing frozen. Raises :class:`~phx_gevent.options.ConfigurationError`
    for a value that is not such a number (the worker then fails to boot,
    saying why).
    """
    value = from_env(environ, THRESHOLD_ENV, DEFAULT_THRESHOLD, int, "a whole number (e.g. 10000)")
    return check_threshold(value, THRESHOLD_ENV)


def tune_collector(threshold: int | None = DEFAULT_THRESHOLD) -> int | None:
    """Collect, freeze what is alive (start-up's objects) and set the first generation's ``threshold``.

    Returns how many objects are frozen, or ``None`` when ``threshold`` is
    ``None`` (then nothing is done at all). Call it once the application is
    loaded and before it serves; calling it again freezes what was made
    since. The other two generations keep their thresholds (full
    collections still follow CPython's 25% growth rule). Raises
    :class:`~phx_gevent.options.ConfigurationError` for a bad ``threshold``.
    """
    threshold = check_threshold(threshold)
    if threshold is None:
        return None
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(threshold, second, third)
    frozen = gc.get_freeze_count()
    log.debug("phx_gevent: %d start-up objects frozen, collector threshold %d", frozen, threshold)
    return frozen


def describe(threshold: int | None, frozen: int | None) -> str:
    """How the collector was set up, for a start-up log line."""
    if threshold is None or frozen is None:
        return "gc as Python set it"
    return f"gc threshold {threshold}, {frozen} objects frozen"
