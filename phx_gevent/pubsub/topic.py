"""A topic's subscribers and its fan-out: one encoding per wire format, the same frame to every writer.

:class:`Topic` is the hot path of a broadcast (see docs/architecture.md);
:class:`RecoveryBuffer` stands in for a joining channel's writer while it
recovers history. :class:`~phx_gevent.pubsub.PubSub` owns the topics.
"""

from __future__ import annotations

from typing import Any

from ..contracts import Subscriber, Writer
from ..serializers import EncodeError
from .history import parse_offset

__all__ = ["ALL_EVENTS", "RecoveryBuffer", "Topic"]


class _AllEvents:
    """A container that holds every event name."""

    __slots__ = ()

    def __contains__(self, item: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "ALL_EVENTS"


#: ``intercept`` value of subscribers that take every event through ``deliver``.
ALL_EVENTS = _AllEvents()


class RecoveryBuffer:
    """Stands in for a channel's writer while its join recovers history.

    Live frames of the topic are kept here, each with its offset (``None``
    for messages without one), until the join reply and the replay are out;
    then :meth:`flush_into` writes those the replay did not already cover.
    """

    __slots__ = ("encoder", "items")

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        self.items: list[tuple[Any, str | None]] = []

    def write(self, frame: Any) -> None:
        """A frame without offset (from the plain fan-out)."""
        self.items.append((frame, None))

    def add(self, frame: Any, offset: str) -> None:
        """A frame with its offset."""
        self.items.append((frame, offset))

    def flush_into(self, writer: Writer, epoch: str | None, last_seq: int) -> int:
        """Write the kept frames except those at or before ``last_seq`` of ``epoch``; returns how many."""
        n = 0
        for frame, offset in self.items:
            if offset is not None and epoch is not None:
                parsed = parse_offset(offset)
                if parsed is not None and parsed[0] == epoch and parsed[1] <= last_seq:
                    continue  # already sent by the replay
            writer.write(frame)
            n += 1
        self.items = []
        return n


class Topic:
    """The subscribers of one topic and the loop that delivers to them."""

    __slots__ = ("name", "subs", "hist", "size")

    def __init__(self, name: str) -> None:
        self.name = name
        # An insertion-ordered set: O(1) unsubscribe, delivery in join order.
        self.subs: dict[Subscriber, None] = {}
        #: Bytes of the last broadcast's first fastlane frame (for telemetry).
        self.size = 0
        #: (epoch, seq) of the last history message delivered here (gap detection).
        self.hist: tuple[str, int] | None = None

    def dispatch_offset(self, event: str, payload: Any, from_: Any, offset: str) -> int:
        """Deliver a history broadcast: the offset goes in the ref of subscribers that asked for it.

        At most two frames per encoder (with and without the offset). The
        payload was already encoded once on its way here, so it is valid.
        """
        topic = self.name
        frames: dict[Any, Any] = {}
        self.size = 0
        parsed: Any = None
        last_enc: Any = None
        last_offs: Any = None
        last_frame: Any = None
        n = 0
        # Any: past the intercept check a subscriber has a writer (only ALL_EVENTS
        # subscribers have none), and it may know history (offsets, replayed).
        subs: list[Any] = list(self.subs)
        for sub in subs:
            if sub.owner is from_:
                continue
            if event in sub.intercept:
                sub.deliver(topic, event, payload)
                n += 1
                continue
            try:
                offs = sub.offsets
                replayed = sub.replayed
            except AttributeError:  # a subscriber that knows nothing of history
                offs = False
                replayed = None
            if replayed is not None:
                # This subscriber's recovery already sent messages up to ``replayed``
                # (epoch, seq); copies still in flight from Redis are dropped once.
                if parsed is None:
                    parsed = parse_offset(offset) or ("", 0)
                if parsed[0] == replayed[0] and parsed[1] <= replayed[1]:
                    continue
                sub.replayed = None
            writer = sub.writer
            enc = writer.encoder
            if enc is not last_enc or offs is not last_offs:
                key = (enc, offs)
                last_frame = frames.get(key, frames)
                if last_frame is frames:
                    try:
                        if offs:
                            last_frame = enc.broadcast_ref(topic, event, payload, offset)
                        else:
                            last_frame = enc.broadcast(topic, event, payload)
                    except EncodeError:
                        last_frame = None
                    frames[key] = last_frame
                    if not self.size and last_frame is not None:
                        self.size = len(last_frame)
                last_enc = enc
                last_offs = offs
            if last_frame is None:
                continue
            if writer.__class__ is RecoveryBuffer:
                writer.add(last_frame, offset)
            else:
                writer.write(last_frame)
            n += 1
        return n

    def dispatch(self, event: str, payload: Any, from_: Any = None) -> int:
        """Deliver to every subscriber except ``from_``'s; returns the number reached.

        Raises ``TypeError``/``OverflowError``/:class:`EncodeError` before
        delivering anything when the payload cannot be encoded.
        """
        topic = self.name
        # Any: past the intercept check a subscriber has a writer (only ALL_EVENTS subscribers have none).
        subs: list[Any] = list(self.subs)
        frames: dict[Any, Any] = {}
        self.size = 0
        # Encode for the first fastlane subscriber before any delivery, so a
        # payload that cannot be encoded fails the whole broadcast, not half of it.
        for sub in subs:
            if event not in sub.intercept:
                enc = sub.writer.encoder
                try:
                    frame = frames[enc] = enc.broadcast(topic, event, payload)
                    self.size = len(frame) if frame is not None else 0
                except EncodeError:
                    # The format cannot carry it (binary over V1): skip those connections.
                    frames[enc] = None
                break
        last_enc: Any = None
        last_frame: Any = None
        n = 0
        for sub in subs:
            if sub.owner is from_:
                continue
            if event in sub.intercept:
                sub.deliver(topic, event, payload)
                n += 1
                continue
            writer = sub.writer
            enc = writer.encoder
            if enc is not last_enc:
                last_frame = frames.get(enc, frames)
                if last_frame is frames:
                    try:
                        last_frame = enc.broadcast(topic, event, payload)
                    except EncodeError:
                        last_frame = None
                    frames[enc] = last_frame
                last_enc = enc
            if last_frame is not None:
                writer.write(last_frame)
                n += 1
        return n
