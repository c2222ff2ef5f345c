"""Memory hygiene: a rate-limited full collection that hands memory back to the OS.

The Python counterpart of Erlang's ``:fullsweep_after`` and ``:garbage_collect``
(PROTOCOL.md 3.11). A full ``gc.collect()`` walks every object in the process
and stalls every connection while it runs (milliseconds to hundreds of
milliseconds on a busy worker), so it is rate-limited process-wide: at most
one per :data:`MIN_INTERVAL` seconds; requests in between are dropped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time
from typing import Any

__all__ = ["collect", "MIN_INTERVAL"]

log = logging.getLogger(__name__)

#: Seconds between two collections, process-wide.
MIN_INTERVAL = 1.0

_last = 0.0
_malloc_trim: Any = None
_looked_up = False


def _trim() -> None:
    # glibc keeps freed memory in its arenas; malloc_trim(0) returns what it can.
    global _malloc_trim, _looked_up
    if not _looked_up:
        _looked_up = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _malloc_trim = libc.malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = None
    if _malloc_trim is not None:
        _malloc_trim(0)


def collect(force: bool = False) -> bool:
    """Run a full collection and trim the C heap, unless one ran in the last second.

    Returns True when it ran. Costly: it pauses the whole process.
    """
    global _last
    now = time.monotonic()
    if not force and now - _last < MIN_INTERVAL:
        return False
    _last = now
    gc.collect()
    _trim()
    return True
