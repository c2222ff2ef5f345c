"""RFC 6455 framing: what gevent-websocket does slowly or not at all, done here.

* server frames are built once as ready bytes (header + payload), so a
  broadcast frame can be shared by every connection;
* client frames are unmasked with one big-integer XOR (C speed, ~1 GB/s)
  instead of a Python loop, and text is validated by ``bytes.decode``;
* the announced length is checked against ``max_frame_size`` before any of
  the payload is read;
* close frames carry their status code and a UTF-8 reason;
* permessage-deflate (RFC 7692) without context takeover in either
  direction: each message is compressed on its own, so a compressed
  broadcast frame is still built once and shared, and a connection keeps no
  zlib state between messages (no memory per connection).
"""

from __future__ import annotations

import struct
import zlib

from ..errors import PhxError

__all__ = [
    "OP_CONT",
    "OP_TEXT",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "ProtocolError",
    "frame",
    "text_frame",
    "binary_frame",
    "close_frame",
    "parse_close",
    "unmask",
    "RSV1",
    "deflate_frame",
    "inflate",
    "negotiate_deflate",
    "COMPRESS_THRESHOLD",
]

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# Close codes used by the server (PROTOCOL.md 3.8): the one place they are defined.
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013

_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack


class ProtocolError(PhxError):
    """The peer broke RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def frame(opcode: int, payload: bytes) -> bytes:
    """Build one unmasked, final server frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return _pack_short(0x80 | opcode, 126, n) + payload
    return _pack_long(0x80 | opcode, 127, n) + payload


#: The "compressed" bit of permessage-deflate, on the first frame of a message.
RSV1 = 0x40
#: Messages shorter than this are sent uncompressed (not worth the CPU; as the ``ws`` library does).
COMPRESS_THRESHOLD = 1024
_SYNC_TAIL = b"\x00\x00\xff\xff"


def deflate_frame(opcode: int, payload: bytes) -> bytes:
    """A final server frame with ``payload`` compressed (RSV1), or plain when that is not smaller.

    A fresh compressor per message: the frame depends on nothing sent
    before, so it can go to every connection (``server_no_context_takeover``).
    """
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    data = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    if data.endswith(_SYNC_TAIL):
        data = data[:-4]  # RFC 7692 7.2.1: the receiver appends it back
    if len(data) >= len(payload):
        return frame(opcode, payload)
    n = len(data)
    b0 = 0x80 | RSV1 | opcode
    if n < 126:
        return bytes((b0, n)) + data
    if n < 65536:
        return _pack_short(b0, 126, n) + data
    return _pack_long(b0, 127, n) + data


def inflate(data: bytes, max_size: int) -> bytes:
    """Decompress one client message; :class:`ProtocolError` 1009 past ``max_size`` bytes, 1007 if corrupt.

    The output is capped while inflating, so a small "zip bomb" never
    allocates more than ``max_size``. A fresh decompressor per message: the
    handshake required ``client_no_context_takeover``.
    """
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(data + _SYNC_TAIL, max_size + 1)
    except zlib.error:
        raise ProtocolError(CLOSE_INVALID_DATA, "invalid compressed data") from None
    if len(out) > max_size:
        raise ProtocolError(CLOSE_TOO_BIG, "message too big")
    return out


def negotiate_deflate(header: str | None) -> str | None:
    """The ``Sec-WebSocket-Extensions`` answer to a client's offers, or ``None`` to not compress.

    Accepts the first ``permessage-deflate`` offer whose parameters are all
    known and valid, answering with no context takeover in both directions.
    An offer that limits the server's window (``server_max_window_bits`` <
    15) is declined: shared broadcast frames use one window size.
    """
    if not header:
        return None
    for offer in header.split(","):
        name, *params = [part.strip() for part in offer.split(";")]
        if name.lower() != "permessage-deflate":
            continue
        seen: set[str] = set()
        ok = True
        for param in params:
            key, _, value = param.partition("=")
            key = key.strip().lower()
            value = value.strip().strip('"')
            if key in seen:
                ok = False
            seen.add(key)
            if key in ("server_no_context_takeover", "client_no_context_takeover"):
                ok = ok and not value
            elif key == "server_max_window_bits":
                ok = ok and value == "15"
            elif key == "client_max_window_bits":
                ok = ok and (not value or (value.isdigit() and 8 <= int(value) <= 15))
            else:
                ok = False
        if ok:
            return "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    return None


def text_frame(text: str) -> bytes:
    """Build a text frame from a ``str``."""
    return frame(OP_TEXT, text.encode("utf-8"))


def binary_frame(data: bytes) -> bytes:
    """Build a binary frame."""
    return frame(OP_BINARY, bytes(data))


def close_frame(code: int | None = None, reason: str = "") -> bytes:
    """Build a close frame; ``code=None`` sends an empty close (no status)."""
    if code is None:
        return frame(OP_CLOSE, b"")
    data = reason.encode("utf-8")[:123]
    # Cutting may split a UTF-8 sequence; drop the partial character.
    data = data.decode("utf-8", "ignore").encode("utf-8")
    return frame(OP_CLOSE, struct.pack("!H", code) + data)


def _valid_close_code(code: int) -> bool:
    # RFC 6455 7.4: codes a peer may put on the wire.
    if 1000 <= code <= 1014:
        return code not in (1004, 1005, 1006)
    return 3000 <= code <= 4999


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """Read a client close frame: ``(code, reason)``; ``code`` is None when absent.

    Raises :class:`ProtocolError` (1002 or 1007) for a malformed close payload.
    """
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    (code,) = struct.unpack("!H", payload[:2])
    if not _valid_close_code(code):
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "close reason is not valid UTF-8") from None
    return code, reason


def unmask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (RFC 6455 5.3).

    One XOR of two big integers runs in C; a 1 MB frame costs about a
    millisecond instead of the ~85 ms of a Python loop.
    """
    n = len(data)
    if n == 0:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")
