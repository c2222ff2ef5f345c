"""RFC 6455 framing helpers."""

import os
import struct

import pytest

from phx_gevent.transports.frames import (
    OP_BINARY,
    OP_TEXT,
    ProtocolError,
    close_frame,
    frame,
    parse_close,
    text_frame,
    unmask,
)


def test_unmask_matches_a_byte_loop_for_all_lengths():
    mask = os.urandom(4)
    for n in list(range(20)) + [125, 126, 65535, 65536, 100_003]:
        data = os.urandom(n)
        expected = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        assert unmask(data, mask) == expected


@pytest.mark.parametrize(
    ("n", "header"), [(5, b"\x81\x05"), (126, b"\x81\x7e\x00\x7e"), (70000, b"\x81\x7f" + struct.pack("!Q", 70000))]
)
def test_frame_headers_use_the_shortest_length_form(n, header):
    data = frame(OP_TEXT, b"x" * n)
    assert data[: len(header)] == header and len(data) == len(header) + n


def test_text_and_binary_frames():
    assert text_frame("é") == b"\x81\x02" + "é".encode()
    assert frame(OP_BINARY, b"\x00\x01") == b"\x82\x02\x00\x01"


def test_close_frame_carries_code_and_a_utf8_reason_cut_at_123_bytes():
    data = close_frame(1001, "é" * 100)
    assert data[0] == 0x88 and data[1] <= 125
    assert struct.unpack("!H", data[2:4])[0] == 1001
    data[4:].decode("utf-8")  # the cut did not split a character
    assert close_frame(None) == b"\x88\x00"


def test_parse_close():
    assert parse_close(b"") == (None, "")
    assert parse_close(struct.pack("!H", 1000) + b"bye") == (1000, "bye")
    for bad in (b"\x03", struct.pack("!H", 1005), struct.pack("!H", 999), struct.pack("!H", 1000) + b"\xff"):
        with pytest.raises(ProtocolError):
            parse_close(bad)
