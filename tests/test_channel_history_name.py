"""``history`` on a Channel subclass: phx_gevent's recovery setting (public API), and a user's own attribute."""

from __future__ import annotations

from typing import Any

import pytest

from phx_gevent import Channel, Endpoint, Socket, channel, ok
from phx_gevent.options import ConfigurationError
from phx_gevent.testing import ChannelTest


class LogChannel(Channel):
    """A channel that keeps its own message log under the name ``history``."""

    history: Any = []  # the application's own: not a history config

    def join(self, topic: str, payload: Any, socket: Any) -> Any:
        self.history = ["joined"]  # per instance, as applications do
        return ok({})

    def handle_in(self, event: str, payload: Any, socket: Any) -> Any:
        self.history.append(payload["body"])
        return ok({"history": self.history})


def test_a_user_attribute_named_history_is_refused_at_route_creation_naming_both_fixes():
    with pytest.raises(ConfigurationError) as info:
        channel("log:*", LogChannel)
    message = str(info.value)
    assert "LogChannel.history is []" in message and "docs/recovery.md" in message
    assert "rename it" in message and "channel('log:*', LogChannel, history=False)" in message
    assert isinstance(info.value, TypeError)  # what coerce raised before: applications still catch it


def test_with_history_false_the_attribute_is_the_applications_own():
    class LogSocket(Socket):
        channels = [channel("log:*", LogChannel, history=False)]

        def connect(self, params: Any, socket: Any, connect_info: Any) -> Any:
            return socket

    endpoint = Endpoint()
    endpoint.socket("/socket", LogSocket())
    room = ChannelTest(endpoint, "/socket").connect().join("log:1")
    assert room.joined
    assert room.assert_reply(room.push("say", {"body": "hi"})) == {"history": ["joined", "hi"]}
    assert endpoint.pubsub.history("log:1") is None  # no history kept for the route


def test_a_bad_route_history_names_the_route():
    class Plain(Channel):
        pass

    with pytest.raises(ConfigurationError, match=r"channel\('p:\*', \.\.\., history=\.\.\.\): unknown history"):
        channel("p:*", Plain, history={"sise": 10})
