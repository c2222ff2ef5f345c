"""The states of a channel process and the tags of its mailbox items (IntEnums: tested on every message)."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ChannelState", "JOINED", "JOINING", "STOPPED"]


class _Tag(IntEnum):
    """What a mailbox item is (the first element of the tuple)."""

    IN = 0  # a client message
    OUT = 1  # a broadcast intercepted for handle_out
    INFO = 2  # a handle_info message
    LEAVE = 3  # the client left
    DOWN = 4  # the connection went away
    OVERFLOW = 5  # the mailbox overflowed
    CALL = 6  # a handle_call request (a caller waits for the answer)
    CAST = 7  # a handle_cast message
    TIMEOUT = 8  # a timeout the channel asked for fired


_IN, _OUT, _INFO, _LEAVE, _DOWN, _OVERFLOW, _CALL, _CAST, _TIMEOUT = _Tag


class ChannelState(IntEnum):
    """Where a channel process is in its life (an IntEnum: compared on every message)."""

    JOINING = 0
    JOINED = 1
    STOPPED = 2


JOINING, JOINED, STOPPED = ChannelState
