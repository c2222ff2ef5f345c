"""A channel's join (PROTOCOL.md 5.2): run ``join``, then reply, register and subscribe with no switch between.

The connection's reader waits for the join (``join_timeout``); on success the
channel greenlet registers the channel, subscribes to the topic and queues the
join reply without any greenlet switch in between, and only then runs its
mailbox. So neither an ``after_join`` push nor a concurrent broadcast can
overtake the reply, and no broadcast published after it is missed. A join with
``since`` on a history topic goes through :mod:`.recovery` instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent

from ..channel import SHUTDOWN, Reply
from ..errors import CallbackReturnError
from .recovery import join_recovering
from .states import JOINED, JOINING, STOPPED

if TYPE_CHECKING:  # pragma: no cover
    from .process import ChannelProcess

__all__ = ["join"]

log = logging.getLogger(__name__)


def join(proc: ChannelProcess, payload: Any, ref: Any, timeout: float | None) -> bool:
    """Run ``join`` in the caller's greenlet (the connection's reader, which waits for it anyway); True when joined.

    No greenlet is taken for the join itself (a reconnect storm joins
    thousands at once): the reader handles nothing else of this connection
    until the join is answered, and other connections have readers of their
    own. What the join queued (``after_join``) then runs in the channel's
    own greenlet, from the hub's next turn. Past ``timeout`` seconds the join is interrupted (a
    ``gevent.Timeout`` raised where it waits) and answered with ``{"reason":
    "join timeout"}``.
    """
    timer = None
    if timeout is not None:
        timer = gevent.Timeout(timeout)
        timer.start()
    proc.greenlet = gevent.getcurrent()  # for call()'s "cannot call itself" check
    release: list[Callable[[], None]] = []  # the held output of a join that queued messages
    try:
        try:
            joined = _run_join(proc, payload, ref, release)
            if timer is not None and not timer.pending and proc.state == JOINING:
                raise timer  # it expired in the join, which caught and ignored it
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            joined = _timed_out(proc, ref, timeout)
        finally:
            proc.greenlet = None
            if timer is not None:
                timer.close()
        if joined and proc.mailbox:
            # What the join queued (after_join) runs in the channel's greenlet, from the hub's next turn;
            # the reader goes on meanwhile (later messages of this channel queue behind it, in order).
            proc._activate()
            if release and proc.greenlet is not None:
                # Released by the hub right after that run (callbacks run in order): the pushes of a
                # run that does not block leave in the reply's send(); one that blocks lets it go then.
                gevent.get_hub().loop.run_callback(release.pop())
    finally:
        if release:
            release.pop()()  # not handed to the hub: out now
    return joined


def _timed_out(proc: ChannelProcess, ref: Any, timeout: float | None) -> bool:
    if proc.state != JOINING:
        return proc.state == JOINED  # answered just as the timer fired
    log.error("phx_gevent: join of %r did not answer within %ss; gave up on it", proc.topic, timeout)
    proc.state = STOPPED
    proc._notify_down()
    proc.refusal = {"reason": "join timeout"}
    proc.conn.send_reply(proc.join_ref, ref, proc.topic, "error", proc.refusal)
    return False


def _run_join(proc: ChannelProcess, payload: Any, ref: Any, release: list[Callable[[], None]]) -> bool:
    conn = proc.conn
    try:
        outcome = proc.instance.join(proc.topic, payload, proc.socket)
        if proc.state != JOINING:
            return False  # given up meanwhile (the channel was killed)
        if not isinstance(outcome, Reply) or outcome.status not in ("ok", "error"):
            raise CallbackReturnError(
                f"{type(proc.instance).__name__}.join must return ok(...) or error(...), got {outcome!r}"
            )
        if outcome.status == "error":
            proc.state = STOPPED
            proc.exit_reason = SHUTDOWN
            proc._notify_down()
            proc.refusal = outcome.response
            conn.send_reply(proc.join_ref, ref, proc.topic, "error", outcome.response)
            # As Phoenix: a refused join stops the channel with :shutdown, running terminate.
            proc._terminate(SHUTDOWN)
            return False
        # Per-topic routing: Redis confirms this node's subscription before the reply, so a
        # broadcast published after the reply reaches it from any node (bounded; not during an outage).
        conn.pubsub.wait_routed(proc.topic)
        if proc.state != JOINING:
            return False
        if proc.history is not None and isinstance(payload, dict) and ("since" in payload or "last" in payload):
            if not join_recovering(proc, payload, ref, outcome):
                return False  # given up while reading the history (connection gone)
        else:
            # Encode first: a join reply that cannot be encoded is a crashed join.
            data = conn.serializer.encode_reply(proc.join_ref, ref, proc.topic, "ok", outcome.response)
            # From here to the write: no greenlet switch, so nothing of this
            # channel can reach the socket before its join reply.
            conn.channel_joined(proc)
            conn.pubsub.subscribe(proc.topic, proc)
            proc.state = JOINED
            proc.socket.joined = True
            if proc.mailbox:
                # The join queued messages (after_join, whose pushes follow at once): hold the
                # connection's output so that the reply and those pushes leave in one send().
                held = conn.hold_output()
                if held is not None:
                    release.append(held)
            conn.send_encoded(data)
        proc.partition.joined += 1
        return True
    except Exception as exc:
        proc.conn.log_error("phx_gevent: %s.join crashed for %r", type(proc.instance).__name__, proc.topic)
        if proc.state == JOINING:
            proc.state = STOPPED
            proc.exit_reason = exc
            proc._notify_down()
            conn.channel_exited(proc)
            proc.refusal = {"reason": "join crashed"}
            conn.send_reply(proc.join_ref, ref, proc.topic, "error", proc.refusal)
            proc._terminate(exc)  # a crashed process runs terminate with the exception
        return False
