"""The Flusher: one hub callback that sends what writers queued, a chunk of connections at a time.

It walks the writers with pending output in chunks, re-arming a zero-second
timer between chunks so the server keeps reading requests while a large
fan-out drains (see :mod:`phx_gevent.transports.writer`). One per hub, owned
by :class:`~phx_gevent.runtime.Runtime`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .. import supervise
from ..flow import flow

if TYPE_CHECKING:
    from .writer import Writer

__all__ = ["CHUNK", "Flusher"]

log = logging.getLogger(__name__)

_monotonic = time.monotonic

# How many writers one hub callback flushes before letting the hub poll again.
CHUNK = 128


class Flusher:
    """Flushes writers with pending output from hub callbacks, a chunk at a time."""

    __slots__ = ("loop", "dirty", "armed", "_timer")

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.dirty: list[Writer] = []
        self.armed = False
        self._timer = loop.timer(0.0)

    def schedule(self, writer: Writer) -> None:
        """Flush ``writer`` in the next chunk (the caller sets ``writer.scheduled``)."""
        self.dirty.append(writer)
        if not self.armed:
            self.armed = True
            self.loop.run_callback(self._run)

    def _run(self) -> None:
        # A hub callback: if it raised, ``armed`` would stay set and no writer
        # would ever be flushed again. Whatever happens, the next chunk runs.
        try:
            self._chunk()
        except Exception:
            supervise.failed("writer flusher")
            if self.dirty:
                self._timer.start(self._run)
            else:
                self.armed = False

    def _chunk(self) -> None:
        dirty = self.dirty
        if len(dirty) <= CHUNK:
            batch = dirty
            self.dirty = []
        else:
            batch = dirty[:CHUNK]
            del dirty[:CHUNK]
        now = _monotonic()
        done = 0
        for writer in batch:
            writer.scheduled = False
            queue = writer.queue
            if writer.state or len(queue) != 1:
                try:
                    writer.flush()
                except Exception:  # pragma: no cover - a bug here must not kill the hub
                    log.exception("phx_gevent: writer flush failed")
                    writer.abort()
                continue
            # The common case of a fan-out, inlined from Writer.flush: one
            # frame queued, taken whole by the kernel. A Python call and the
            # accounting per connection are most of the fan-out's latency
            # beyond the send() itself.
            data = queue[0]
            try:
                sent = writer.raw.send(data)
            except BlockingIOError:
                sent = 0
            except Exception:
                # OSError: the peer is gone; anything else is a bug, and only this connection pays.
                writer.abort()
                continue
            n = len(data)
            if sent == n:
                queue.clear()
                writer.qbytes -= n
                writer.sent_bytes += n
                writer.last_drain = now
                done += n
                if writer.excess:
                    # Bytes above the soft cap were never counted in the process total.
                    done -= writer.excess
                    writer.excess = 0
            else:
                writer.sent_partly(data, sent)
        if done:
            flow.release(done)
        if self.dirty:
            # Poll I/O before the next chunk: new requests are read between chunks.
            self._timer.start(self._run)
        else:
            self.armed = False
