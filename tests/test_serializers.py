"""Serializers: V2 JSON, V2 binary (PROTOCOL.md 2.4 test vectors), V1 JSON, vsn negotiation."""

import json

import pytest

from phx_gevent.serializers import V1, V2, DecodeError, EncodeError, Message, dumps, negotiate


def test_v2_decode_keeps_refs_exactly_and_ignores_extra_elements():
    m = V2.decode('[0, "0", "room:1", "new_msg", {"a": 1}, "extra"]')
    assert m == Message(0, "0", "room:1", "new_msg", {"a": 1})
    assert type(m.join_ref) is int and type(m.ref) is str


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"topic": "x"}',
        '["1", "1", "t", "e"]',
        '["1", "1", 5, "e", {}]',
        '["1", "1", "t", null, {}]',
        "[" * 5000,
    ],
)
def test_v2_decode_rejects_malformed_frames(text):
    with pytest.raises(DecodeError):
        V2.decode(text)


def test_v2_payload_may_be_any_json_value():
    assert V2.decode('[null, "1", "t", "e", [1, 2]]').payload == [1, 2]
    assert V2.decode('[null, "1", "t", "e", "s"]').payload == "s"


def test_binary_push_vector_decodes():
    frame = bytes([0, 2, 3, 5, 5]) + b"12" + b"123" + b"topic" + b"event" + bytes([101, 102, 103])
    assert V2.decode(frame) == Message("12", "123", "topic", "event", b"efg")


def test_binary_push_with_empty_join_ref_stays_empty_string():
    frame = bytes([0, 0, 1, 1, 1]) + b"1" + b"t" + b"e" + b"x"
    assert V2.decode(frame).join_ref == ""


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        bytes([0, 1]),
        bytes([1, 0, 0, 0, 0]),
        bytes([0, 9, 9, 9, 9]) + b"short",
        bytes([0, 0, 0, 1, 1]) + b"\xff" + b"e",
    ],
)
def test_binary_decode_rejects_bad_frames(frame):
    with pytest.raises(DecodeError):
        V2.decode(frame)


def test_binary_server_vectors():
    assert V2.encode_push("12", "topic", "event", b"efg") == bytes([0, 2, 5, 5]) + b"12topicevent" + b"efg"
    assert V2.encode_reply("12", "123", "topic", "ok", b"efg") == bytes([1, 2, 3, 5, 2]) + b"12123topicok" + b"efg"
    assert V2.encode_broadcast("topic", "event", b"efg") == bytes([2, 5, 5]) + b"topicevent" + b"efg"


def test_binary_reply_with_null_refs_writes_zero_lengths():
    assert V2.encode_reply(None, None, "t", "ok", b"x")[:5] == bytes([1, 0, 0, 1, 2])


def test_binary_fields_over_255_bytes_raise():
    with pytest.raises(EncodeError):
        V2.encode_push("1", "t" * 256, "e", b"x")
    with pytest.raises(EncodeError):
        V2.encode_broadcast("t", "é" * 128, b"x")


def test_v2_json_encoding():
    assert json.loads(V2.encode_push("3", "room:1", "welcome", {"a": "/é"})) == [
        "3",
        None,
        "room:1",
        "welcome",
        {"a": "/é"},
    ]
    assert V2.encode_push("3", "r", "e", {"u": "a/é"}) == '["3",null,"r","e",{"u":"a/é"}]'
    assert json.loads(V2.encode_reply("3", 0, "r", "ok", [1])) == [
        "3",
        0,
        "r",
        "phx_reply",
        {"status": "ok", "response": [1]},
    ]
    assert json.loads(V2.encode_broadcast("r", "e", {})) == [None, None, "r", "e", {}]
    assert json.loads(V2.encode_control("7", "r", "phx_error")) == [
        "7",
        "7",
        "r",
        "phx_error",
        {"reason": "channel_crash"},
    ]
    assert json.loads(V2.encode_control("7", "r", "phx_close")) == ["7", "7", "r", "phx_close", {}]


@pytest.mark.parametrize("payload", [[1], "s", 3, None])
def test_push_and_broadcast_payloads_must_be_dict_or_bytes(payload):
    with pytest.raises(EncodeError):
        V2.encode_push("1", "t", "e", payload)
    with pytest.raises(EncodeError):
        V2.encode_broadcast("t", "e", payload)


def test_unencodable_values_raise():
    with pytest.raises(TypeError):
        dumps({"x": object()})
    with pytest.raises(OverflowError):
        dumps({"x": float("nan")})


def test_v1_round_trip_has_no_join_ref_on_output():
    m = V1.decode('{"topic": "t", "event": "e", "payload": {}, "ref": "1", "join_ref": "2"}')
    assert m == Message("2", "1", "t", "e", {})
    assert json.loads(V1.encode_reply("2", "1", "t", "ok", {})) == {
        "topic": "t",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": "1",
    }
    assert json.loads(V1.encode_broadcast("t", "e", {"a": 1})) == {
        "topic": "t",
        "event": "e",
        "payload": {"a": 1},
        "ref": None,
    }


@pytest.mark.parametrize("text", ['["t"]', '{"topic": "t", "event": "e", "payload": {}}', b"\x00\x01"])
def test_v1_decode_rejects_missing_keys_arrays_and_binary(text):
    with pytest.raises(DecodeError):
        V1.decode(text)


def test_v1_cannot_send_binary():
    with pytest.raises(EncodeError):
        V1.encode_push(None, "t", "e", b"x")


@pytest.mark.parametrize(
    ("vsn", "expected"),
    [
        (None, V1),
        ("1.0.0", V1),
        ("1.0.9", V1),
        ("2.0.0", V2),
        ("2.0.5", V2),
        ("2.1.0", None),
        ("3.0.0", None),
        ("2.0", None),
        ("x", None),
        (2, None),
        ("2.0.0-rc.1", None),
        ("1.1.0", None),
    ],
)
def test_vsn_negotiation(vsn, expected):
    assert negotiate(vsn) is expected


def test_server_binary_frames_decode_strictly_and_client_pushes_encode_in_one_place():
    from phx_gevent.serializers import decode_server_binary, decode_server_frame, encode_client_push

    push, reply, cast = (
        V2.encode_push("1", "t", "e", b"x"),
        V2.encode_reply("1", "2", "t", "ok", b"x"),
        V2.encode_broadcast("t", "e", b"x"),
    )
    assert decode_server_binary(push) == Message("1", None, "t", "e", b"x")
    assert decode_server_binary(reply) == Message("1", "2", "t", "phx_reply", {"status": "ok", "response": b"x"})
    assert decode_server_binary(cast) == decode_server_frame(cast) == Message(None, None, "t", "e", b"x")
    for bad in (b"", b"\x07abc", b"\x01\x01", bytes.fromhex("00ff0000") + b"x", b"\x02\x01\x01\xff\xfe"):
        with pytest.raises(DecodeError):
            decode_server_binary(bad)
    # The client's push is what the server's decoder reads (the client wire uses these two).
    assert V2.decode(encode_client_push("1", "2", "t", "e", b"\x00x")) == Message("1", "2", "t", "e", b"\x00x")
