"""phx_gevent.testing: ChannelTest-style helpers, exercised on the example app's channels."""

import pytest

from phx_gevent.testing import ChannelTest, ConnectRefused


@pytest.fixture
def endpoint():
    import app_example

    return app_example.create_app()[1]


def test_connect_join_push_reply_and_pushes(endpoint):
    client = ChannelTest(endpoint, "/socket").connect({"user": "alice"})
    assert client.socket.assigns == {"user": "alice"} and client.socket.id == "user_socket:alice"
    room = client.join("room:lobby")
    assert room.joined and room.reply.response == {"user": "alice"}
    assert room.assert_push("welcome") == {"user": "alice", "node": endpoint.node_name}
    ref = room.push("ping", {"x": 1})
    assert room.assert_reply(ref, "ok") == {"x": 1}
    assert room.assert_reply(room.push("ping", b"\x00\x01"), "ok") == b"\x00\x01"
    room.assert_reply(room.push("new_msg", {"body": "hi"}), "ok", {})
    assert room.assert_push("new_msg") == {"user": "alice", "body": "hi"}
    room.assert_reply(room.push("new_msg", {}), "error", {"reason": "invalid body"})
    endpoint.broadcast("room:lobby", "announce", {"a": 1})
    assert room.assert_push("announce") == {"a": 1, "to": "alice"}
    room.refute_push("announce")


def test_refusals_crash_stop_leave_and_disconnect(endpoint):
    with pytest.raises(ConnectRefused):
        ChannelTest(endpoint).connect({})
    client = ChannelTest(endpoint).connect({"user": "bob"})
    assert client.join("room:secret").reply.response == {"reason": "unauthorized"}
    crashing = client.join("room:a")
    crashing.push("crash")
    crashing.assert_error()
    stopping = client.join("room:b")
    stopping.assert_reply(stopping.push("stop"), "ok")
    stopping.assert_close()
    leaving = client.join("room:c")
    leaving.assert_reply(leaving.leave(), "ok")
    leaving.assert_close()
    endpoint.broadcast("user_socket:bob", "disconnect", {})
    assert client.assert_closed() == (1001, "disconnected")


def test_assertions_fail_with_a_useful_message(endpoint):
    room = ChannelTest(endpoint).connect({"user": "carol"}).join("room:x")
    with pytest.raises(AssertionError, match="timed out"):
        room.assert_push("never", timeout=0.05)
    with pytest.raises(AssertionError, match="expected status 'error'"):
        room.assert_reply(room.push("ping", {}), "error")


def test_subscribe_and_join_sees_the_example_broadcasts(endpoint):
    room = ChannelTest(endpoint).connect({"user": "dora"}).subscribe_and_join("room:sub")
    room.assert_reply(room.push("new_msg", {"body": "hello"}), "ok", {})
    assert room.assert_broadcast("new_msg") == {"user": "dora", "body": "hello"}
    room.broadcast_from("announce", {"a": 1})  # the channel's handle_out runs; the test is not told
    assert room.assert_push("announce") == {"a": 1, "to": "dora"}
    room.refute_broadcast("announce")
    room.close()
    assert not room.channel_pid.alive


def test_a_socket_without_connect_joins_the_example_room(endpoint):
    room = ChannelTest(endpoint).socket("user_socket:eve", {"user": "eve"}).join("room:lobby")
    assert room.reply.response == {"user": "eve"}
    assert room.assert_push("welcome")["user"] == "eve"
