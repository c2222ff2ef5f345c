"""Running one mailbox item through the channel's callbacks and acting on what they return.

``handle_in``, ``handle_out``, ``handle_info``, ``handle_call``,
``handle_cast``, leaving and the connection going down: :func:`dispatch` is
called by :meth:`ChannelProcess._run <phx_gevent.channels.process.ChannelProcess>`,
in the channel's greenlet, one item at a time. A callback that raises ends
the channel with ``phx_error``.
"""

from __future__ import annotations

import functools
import logging
from time import perf_counter
from typing import TYPE_CHECKING, Any

from gevent import GreenletExit

from ..channel import LEFT, TIMEOUT, NoReply, Reply, Stop, is_graceful
from ..errors import CallbackReturnError, ConnectionOverloaded
from ..telemetry import channel_handled_in, emit, format_duration
from .states import _CALL, _CAST, _DOWN, _IN, _INFO, _LEAVE, _OUT, _OVERFLOW, _TIMEOUT

if TYPE_CHECKING:  # pragma: no cover
    from .process import ChannelProcess

__all__ = ["dispatch"]

log = logging.getLogger(__name__)
_debug = functools.partial(log.isEnabledFor, logging.DEBUG)


def _expected(callback: str) -> str:
    if callback == "handle_in":
        return "None, ok(...)/error(...)/Reply(status, response), noreply(...) or stop(...)"
    return "None, noreply(...) or stop(...)"


def dispatch(proc: ChannelProcess, item: tuple[Any, ...]) -> None:
    """Run one mailbox item through ``proc``'s callbacks (in its greenlet); a callback that raises ends it."""
    tag = item[0]
    if proc._idle is not None:
        # Any message cancels a pending noreply timeout; its own expiry is delivered.
        expired = tag == _TIMEOUT and item[1] is proc._idle
        proc._cancel_idle()
        if expired:
            item = (_INFO, TIMEOUT)
            tag = _INFO
    instance = proc.instance
    socket = proc.socket
    try:
        if tag == _IN:
            msg = item[1]
            socket.ref = msg.ref
            # Timed only when observed: a telemetry receiver, or debug logs of this mount.
            timed = channel_handled_in.receivers or (proc.conn.log_level is not None and _debug())
            if timed:
                started = perf_counter()
            try:
                result = instance.handle_in(msg.event, msg.payload, socket)
            finally:
                socket.ref = None
            if timed:
                _handled_in(proc, msg, perf_counter() - started)
            if isinstance(result, Reply):
                proc.conn.send_reply(proc.join_ref, msg.ref, proc.topic, result.status, result.response)
                return
            if isinstance(result, Stop) and result.reply is not None:
                rep = result.reply  # the reply goes out before the channel stops
                proc.conn.send_reply(proc.join_ref, msg.ref, proc.topic, rep.status, rep.response)
            _noreply(proc, "handle_in", result)
        elif tag == _OUT:
            _noreply(proc, "handle_out", instance.handle_out(item[1], item[2], socket))
        elif tag == _INFO:
            _noreply(proc, "handle_info", instance.handle_info(item[1], socket))
        elif tag == _CALL:
            from_ = item[2]
            result = instance.handle_call(item[1], from_, socket)
            if isinstance(result, Stop):
                _stop(proc, result.reason)
            elif isinstance(result, NoReply):
                if result.timeout is not None:
                    proc._arm_idle(result.timeout)
            else:
                from_.reply(result)
        elif tag == _CAST:
            _noreply(proc, "handle_cast", instance.handle_cast(item[1], socket))
        elif tag == _LEAVE:
            # Unsubscribe before the reply is queued: once the client has
            # the reply, no broadcast on this topic may follow it.
            if proc._detach(LEFT):
                proc.conn.send_reply(proc.join_ref, item[1], proc.topic, "ok", {})
                proc.conn.send_control(proc.join_ref, proc.topic, "phx_close")
                proc._terminate(LEFT)
        elif tag == _DOWN:
            proc._exit(item[1], None)
        elif tag == _OVERFLOW:
            raise ConnectionOverloaded(f"mailbox of {proc.topic!r} overflowed")
        # _TIMEOUT left here was cancelled by a message that overtook it: nothing to do.
    except GreenletExit:
        raise
    except Exception as exc:
        proc.conn.log_error("phx_gevent: %s crashed on %r", type(instance).__name__, proc.topic)
        proc._exit(exc, "phx_error")


def _handled_in(proc: ChannelProcess, msg: Any, duration: float) -> None:
    name = type(proc.instance).__name__
    if channel_handled_in.receivers:
        emit(
            channel_handled_in,
            proc.conn.endpoint,
            {"duration": duration},
            {"event": msg.event, "topic": proc.topic, "channel": name, "ref": msg.ref, "socket": proc.socket},
        )
    if proc.conn.log_level is not None and _debug():
        log.debug("HANDLED %s INCOMING ON %s (%s) in %s", msg.event, proc.topic, name, format_duration(duration))


def _noreply(proc: ChannelProcess, callback: str, result: Any) -> None:
    if result is None:
        return
    if isinstance(result, Stop):
        _stop(proc, result.reason)
        return
    if isinstance(result, NoReply):
        if result.timeout is not None:
            proc._arm_idle(result.timeout)
        return
    _bad_return(proc, callback, result)


def _bad_return(proc: ChannelProcess, callback: str, result: Any) -> None:
    raise CallbackReturnError(
        f"{type(proc.instance).__name__}.{callback} must return {_expected(callback)}, got {result!r}"
    )


def _stop(proc: ChannelProcess, reason: Any) -> None:
    if is_graceful(reason):
        proc._exit(reason, "phx_close")
    else:
        log.error("phx_gevent: %s on %r stopped with reason %r", type(proc.instance).__name__, proc.topic, reason)
        proc._exit(reason, "phx_error")
