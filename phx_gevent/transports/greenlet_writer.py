"""The writer of TLS connections (a greenlet per burst), and :func:`make_writer`, which picks a connection's writer.

A TLS socket cannot be written raw from a hub callback (the SSL object may
need to read or write more than asked), so :class:`GreenletWriter` keeps the
:class:`~phx_gevent.transports.writer.Writer` interface (queue, close,
abort, accounting) and sends from a greenlet with ``sendall``.
"""

from __future__ import annotations

import socket as _pysocket
import time
from collections.abc import Callable
from typing import Any

import gevent

from ..flow import flow
from . import frames
from .writer import CLOSED, CLOSING, Writer

__all__ = ["GreenletWriter", "make_writer"]

_monotonic = time.monotonic
_join = b"".join


class GreenletWriter(Writer):
    """Writer for sockets whose bytes cannot be written raw (TLS): a greenlet does ``sendall``."""

    __slots__ = ("_greenlet",)

    def __init__(self, sock: Any, encoder: Any) -> None:
        super().__init__(sock, encoder)
        self._greenlet: Any = None

    def write_now(self, data: bytes) -> None:
        self.write(data)  # its greenlet sends as soon as it runs

    def hold(self) -> Callable[[], None] | None:
        return None  # its greenlet sends whatever is queued when it runs: nothing to gain

    def write(self, data: bytes | memoryview) -> None:
        if self.state:
            return
        if not self.queue:
            self.last_drain = _monotonic()
        self._append(data)
        self._kick()

    def close(self, code: int | None = None, reason: str = "") -> None:
        if self.state:
            return
        self.close_code = code
        self.state = CLOSING
        data = frames.close_frame(code, reason)
        self.queue.append(data)
        self.qbytes += len(data)
        flow.queued += len(data)
        self._kick()

    def _kick(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._drain)

    def _drain(self) -> None:
        try:
            while self.queue and self.state != CLOSED:
                data = _join(self.queue)
                self.queue.clear()
                try:
                    self.sock.sendall(data)
                except OSError:
                    self.abort()
                    return
                n = len(data)
                self.sent_bytes += n
                self._account_sent(n)
                self.last_drain = _monotonic()
            if self.state == CLOSING and not self.queue:
                self._closed(self.sock, _pysocket.SHUT_WR)
        finally:
            self._greenlet = None

    def abort(self, code: int | None = None, reason: str = "") -> None:
        if self.state == CLOSED:
            return
        self._release()
        self._closed(self.sock, _pysocket.SHUT_RDWR)


def make_writer(sock: Any, encoder: Any) -> Writer:
    """The right writer for ``sock``: raw non-blocking for TCP and unix sockets, greenlet for TLS."""
    if hasattr(sock, "_sslobj") or not hasattr(sock, "_sock"):
        return GreenletWriter(sock, encoder)
    return Writer(sock, encoder)
