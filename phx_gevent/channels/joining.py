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
from typing import TYPE_CHECKING, Any

import gevent
from gevent import GreenletExit
from gevent.event import AsyncResult

from ..channel import SHUTDOWN, Reply
from ..errors import CallbackReturnError
from .recovery import join_recovering
from .states import JOINED, JOINING, STOPPED

if TYPE_CHECKING:  # pragma: no cover
    from .process import ChannelProcess

__all__ = ["join"]

log = logging.getLogger(__name__)


def join(proc: ChannelProcess, payload: Any, ref: Any, timeout: float | None) -> bool:
    """Run ``join`` in the channel greenlet and wait for it; True when joined.

    Past ``timeout`` seconds the join is answered with ``{"reason": "join
    timeout"}`` and the greenlet is killed.
    """
    result: AsyncResult = AsyncResult()
    proc.greenlet = proc.partition.run(_run_join, proc, payload, ref, result)
    try:
        return bool(result.get(timeout=timeout))
    except gevent.Timeout:
        if result.ready():
            return bool(result.get())
        log.error("phx_gevent: join of %r did not answer within %ss; killing it", proc.topic, timeout)
        proc.state = STOPPED
        proc._notify_down()
        greenlet, proc.greenlet = proc.greenlet, None
        if greenlet is not None:
            greenlet.kill(block=False)
        proc.refusal = {"reason": "join timeout"}
        proc.conn.send_reply(proc.join_ref, ref, proc.topic, "error", proc.refusal)
        return False


def _run_join(proc: ChannelProcess, payload: Any, ref: Any, result: AsyncResult) -> None:
    conn = proc.conn
    if proc.state != JOINING:
        return  # given up (join timeout) before this run even started
    try:
        outcome = proc.instance.join(proc.topic, payload, proc.socket)
        if proc.state != JOINING:
            return  # the reader gave up on us (join timeout)
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
            result.set(False)
            # As Phoenix: a refused join stops the channel with :shutdown, running terminate.
            proc._terminate(SHUTDOWN)
            return
        if proc.history is not None and isinstance(payload, dict) and ("since" in payload or "last" in payload):
            if not join_recovering(proc, payload, ref, outcome):
                return  # given up while reading the history (join timeout, connection gone)
        else:
            # Encode first: a join reply that cannot be encoded is a crashed join.
            data = conn.serializer.encode_reply(proc.join_ref, ref, proc.topic, "ok", outcome.response)
            # From here to the write: no greenlet switch, so nothing of this
            # channel can reach the socket before its join reply.
            conn.channel_joined(proc)
            conn.pubsub.subscribe(proc.topic, proc)
            proc.state = JOINED
            proc.socket.joined = True
            conn.send_encoded(data)
        proc.partition.joined += 1
        result.set(True)
    except GreenletExit:
        raise
    except Exception as exc:
        proc.conn.log_error("phx_gevent: %s.join crashed for %r", type(proc.instance).__name__, proc.topic)
        if proc.state == JOINING:
            proc.state = STOPPED
            proc.exit_reason = exc
            proc._notify_down()
            conn.channel_exited(proc)
            proc.refusal = {"reason": "join crashed"}
            conn.send_reply(proc.join_ref, ref, proc.topic, "error", proc.refusal)
            result.set(False)
            proc._terminate(exc)  # a crashed process runs terminate with the exception
            return
        result.set(False)
        return
    finally:
        proc.greenlet = None
    # The join is answered: run what the join queued (after_join) in this greenlet.
    if proc.mailbox:
        proc.greenlet = gevent.getcurrent()
        proc._run()
