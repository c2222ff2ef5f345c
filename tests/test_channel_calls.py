"""Calls, casts and idle timeouts into a channel (GenServer.call/cast, ``{:noreply, socket, timeout}``)."""

from __future__ import annotations

from typing import Any

import gevent
import pytest
from flask import Flask
from gevent.event import Event

from phx_gevent import (
    TIMEOUT,
    CallTimeout,
    Channel,
    ChannelError,
    ChannelExited,
    Endpoint,
    PhxError,
    Socket,
    channel,
    noreply,
    ok,
    stop,
)
from phx_gevent.testing import ChannelTest

GATE: dict[str, Event] = {}


class Counter(Channel):
    def join(self, topic: str, payload: Any, socket: Any) -> Any:
        self.count = 0
        self.casts: list[Any] = []
        return ok({})

    def handle_call(self, message: Any, from_: Any, socket: Any) -> Any:
        if message == "incr":
            self.count += 1
            return self.count
        if message == "none":
            return None
        if message == "later":
            gevent.spawn(from_.reply, {"late": self.count})
            return noreply()
        if message == "never":
            return noreply()
        if message == "crash":
            raise RuntimeError("call crashed")
        if message == "stop":
            return stop("normal")
        if message == "reply_then_stop":
            from_.reply("bye")
            return stop("normal")
        if message == "block":
            GATE["entered"].set()
            GATE["block"].wait(5)
            return "unblocked"
        if message == "self":
            try:
                socket.channel_pid.call("incr")
            except ChannelError as exc:
                return f"refused: {exc}"
        return super().handle_call(message, from_, socket)

    def handle_cast(self, message: Any, socket: Any) -> Any:
        self.casts.append(message)
        if message == "push":
            self.push(socket, "cast_seen", {"casts": list(self.casts)})
        if message == "stop":
            return stop("shutdown")
        return None

    def handle_in(self, event: str, payload: Any, socket: Any) -> Any:
        if event == "idle":
            return noreply(timeout=payload["seconds"])
        if event == "ping":
            return ok({})
        if event == "bad_noreply":
            return noreply(timeout=0.01), 1
        return None

    def handle_info(self, message: Any, socket: Any) -> Any:
        if message == TIMEOUT:
            self.push(socket, "idle_timeout", {})
            return None
        if message == "again":
            return noreply(timeout=0.05)
        return None


class CounterSocket(Socket):
    channels = [channel("c:*", Counter)]


def make(max_mailbox: int | None = None) -> Any:
    if max_mailbox is not None:
        handler = type("Small", (CounterSocket,), {"max_mailbox": max_mailbox})
    else:
        handler = CounterSocket
    endpoint = Endpoint(Flask(__name__))
    endpoint.socket("/socket", handler)
    return ChannelTest(endpoint).socket("u1", {})


def test_call_returns_what_handle_call_returns_from_any_greenlet():
    room = make().join("c:1")
    pid = room.channel_pid
    assert pid.call("incr") == 1
    assert gevent.spawn(pid.call, "incr").get(timeout=5) == 2
    assert pid.call("none") is None
    assert pid.call("later") == {"late": 2}


def test_call_times_out_and_a_gone_channel_raises():
    client = make()
    room = client.join("c:1")
    with pytest.raises(CallTimeout):
        room.channel_pid.call("never", timeout=0.05)
    assert room.channel_pid.call("incr") == 1  # the channel is still fine
    with pytest.raises(ChannelExited) as crashed:
        room.channel_pid.call("crash")
    assert isinstance(crashed.value.reason, RuntimeError)
    room.assert_error()
    with pytest.raises(ChannelExited):
        room.channel_pid.call("incr")  # already gone
    assert issubclass(CallTimeout, PhxError) and issubclass(ChannelExited, PhxError)


def test_stop_from_handle_call_and_reply_first():
    client = make()
    a = client.join("c:a")
    with pytest.raises(ChannelExited) as exc:
        a.channel_pid.call("stop")
    assert exc.value.reason == "normal"
    a.assert_close()
    b = client.join("c:b")
    assert b.channel_pid.call("reply_then_stop") == "bye"
    b.assert_close()


def test_a_missing_handle_call_clause_crashes_the_channel_like_phoenix():
    room = make().join("c:1")
    with pytest.raises(ChannelExited) as exc:
        room.channel_pid.call("unknown")
    assert isinstance(exc.value.reason, NotImplementedError)
    room.assert_error()


def test_a_channel_cannot_call_itself():
    room = make().join("c:1")
    assert room.channel_pid.call("self").startswith("refused: channel 'c:1' cannot call itself")


def test_cast_reaches_handle_cast_in_mailbox_order():
    room = make().join("c:1")
    pid = room.channel_pid
    pid.cast("a")
    pid.send("info")
    pid.cast("push")
    assert room.assert_push("cast_seen") == {"casts": ["a", "push"]}
    pid.cast("stop")
    room.assert_close()
    pid.cast("ignored")  # a stopped channel ignores casts, like send


def test_calls_are_bounded_by_the_mailbox():
    GATE["block"], GATE["entered"] = Event(), Event()
    room = make(max_mailbox=3).join("c:1")
    pid = room.channel_pid
    blocked = gevent.spawn(pid.call, "block")
    assert GATE["entered"].wait(5)  # the channel is busy in handle_call
    for _ in range(3):
        pid.cast("x")
    # A full mailbox: the call ends the channel (phx_error), as send does.
    incr = gevent.spawn(pid.call, "incr")
    GATE["block"].set()
    assert blocked.get(timeout=5) == "unblocked"  # answered before the overflow was handled
    with pytest.raises(ChannelExited):
        incr.get(timeout=5)
    room.assert_error()


def test_noreply_timeout_runs_handle_info_timeout():
    room = make().join("c:1")
    room.push("idle", {"seconds": 0.01})
    room.assert_push("idle_timeout")
    room.channel_pid.send("again")  # handle_info may re-arm it
    room.assert_push("idle_timeout")


def test_a_message_before_the_timeout_cancels_it():
    room = make().join("c:1")
    room.push("idle", {"seconds": 0.5})
    room.assert_reply(room.push("ping"), "ok")  # arrives long before the half second
    room.refute_push("idle_timeout", timeout=1.0)


def test_noreply_validation_and_a_bad_tuple_is_a_callback_error():
    with pytest.raises(ValueError):
        noreply(timeout=-1)
    room = make().join("c:1")
    room.push("bad_noreply")
    room.assert_error()
