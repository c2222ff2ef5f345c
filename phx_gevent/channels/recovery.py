"""Joining with history recovery: subscribe into a buffer, read the history, reply, replay, flush.

A join with ``since`` (or a ``last`` backlog) on a history topic. The channel
process (:mod:`.process`) calls :func:`join_recovering` from its join; the
offsets and stores are :mod:`phx_gevent.pubsub.history`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..channel import Reply
from ..pubsub.history import MAX_LAST, parse_offset
from ..pubsub.local import RecoveryBuffer
from .states import JOINED, JOINING

if TYPE_CHECKING:  # pragma: no cover
    from .process import ChannelProcess

__all__ = ["join_recovering"]

log = logging.getLogger(__name__)


# Encoded replay frames: (encoder, with offset, topic, offset) -> frame. Offsets are
# unique per topic (the epoch changes when a history restarts), so entries never go stale.
_replay_frames: dict[tuple[Any, ...], Any] = {}
_REPLAY_CACHE_SIZE = 20_000


class _GaveUp(Exception):
    """The join was given up while it read the history."""


def _since_seq(since: Any) -> int:
    parsed = parse_offset(since)
    return 0 if parsed is None else parsed[1]


def join_recovering(proc: ChannelProcess, payload: dict[str, Any], ref: Any, outcome: Reply) -> bool:
    """Join ``proc`` with history recovery; False when the join was given up meanwhile (see below)."""
    # A join with ``since`` (or a ``last`` backlog) on a history topic.
    # Subscribe first, into a buffer, then read the history (this may wait
    # for Redis), then send the join reply, the replay, and what arrived
    # live meanwhile minus what the replay covered: every message once, in
    # offset order, nothing of this channel before its join reply.
    conn = proc.conn
    pubsub = conn.pubsub
    has_since = "since" in payload
    since = payload.get("since")
    last = payload.get("last")
    if type(last) is not int or last < 0:
        last = None
    else:
        last = min(last, MAX_LAST)
    proc.offsets = has_since
    real_writer = proc.writer
    buffer = RecoveryBuffer(real_writer.encoder)
    proc.writer = buffer
    pubsub.subscribe(proc.topic, proc)
    try:
        try:
            recovery = pubsub.fetch_history(proc.topic, since, last, has_since=has_since)
        except Exception:
            log.exception("phx_gevent: history recovery of %r failed", proc.topic)
            recovery = None
        if proc.state != JOINING:
            raise _GaveUp
        response = outcome.response
        if has_since:
            recovered = recovery is not None and recovery.recovered
            response = {**response, "recovered": recovered} if isinstance(response, dict) else response
        data = conn.serializer.encode_reply(proc.join_ref, ref, proc.topic, "ok", response)
    except BaseException as exc:
        pubsub.unsubscribe(proc.topic, proc)
        proc.writer = real_writer
        if isinstance(exc, _GaveUp):
            return False
        raise
    # From here to the end: no greenlet switch.
    conn.channel_joined(proc)
    proc.state = JOINED
    proc.socket.joined = True
    conn.send_encoded(data)
    epoch, last_seq = None, 0
    if recovery is not None and (recovery.recovered or not has_since):
        epoch, last_seq = recovery.epoch, _since_seq(since) if has_since else 0
        enc = real_writer.encoder
        cache = _replay_frames
        if len(cache) > _REPLAY_CACHE_SIZE:
            cache.clear()
        for entry in recovery.entries:
            # A reconnect storm replays the same messages to thousands of
            # clients: each frame is encoded once per encoder and variant.
            key = (enc, has_since, proc.topic, entry.offset)
            frame = cache.get(key, cache)
            if frame is cache:
                try:
                    if has_since:
                        frame = enc.broadcast_ref(proc.topic, entry.event, entry.payload, entry.offset)
                    else:
                        frame = enc.broadcast(proc.topic, entry.event, entry.payload)
                except Exception:
                    log.exception("phx_gevent: could not encode a replayed message of %r", proc.topic)
                    continue
                cache[key] = frame
            if frame is not None:
                real_writer.write(frame)
        if recovery.entries:
            parsed = parse_offset(recovery.entries[-1].offset)
            if parsed is not None:
                epoch, last_seq = parsed
    buffer.flush_into(real_writer, epoch, last_seq)
    if epoch is not None and last_seq > 0:
        proc.replayed = (epoch, last_seq)
    proc.writer = real_writer
    return True
