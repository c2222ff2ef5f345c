"""A raw WebSocket client for tests that need to send what no well-behaved client sends."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from typing import Any


class Closed(Exception):
    """The server closed the TCP connection."""


class RawWS:
    """Speaks RFC 6455 by hand over a plain socket; every read has a timeout."""

    def __init__(
        self,
        port: int,
        path: str = "/socket/websocket?vsn=2.0.0&user=raw",
        headers: dict[str, str] | None = None,
        method: str = "GET",
        upgrade: bool = True,
        timeout: float = 5.0,
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        hdrs = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": key,
            "Sec-WebSocket-Version": "13",
        }
        if not upgrade:
            hdrs = {}
        hdrs.update(headers or {})
        lines += [f"{k}: {v}" for k, v in hdrs.items() if v is not None]
        if method != "GET":
            lines.append("Content-Length: 0")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = self._read_until(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {}
        for line in header_lines:
            if ":" in line:
                k, v = line.split(":", 1)
                self.headers[k.strip().lower()] = v.strip()

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed
            self.buf += chunk
        head, _, self.buf = self.buf.partition(marker)
        return head

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    # -- sending -----------------------------------------------------------------------------

    def send_frame(
        self, opcode: int, payload: bytes, fin: bool = True, mask: bool = True, rsv: int = 0, length: int | None = None
    ) -> None:
        n = len(payload) if length is None else length
        b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
        if n < 126:
            head = struct.pack("!BB", b0, (0x80 if mask else 0) | n)
        elif n < 65536:
            head = struct.pack("!BBH", b0, (0x80 if mask else 0) | 126, n)
        else:
            head = struct.pack("!BBQ", b0, (0x80 if mask else 0) | 127, n)
        if mask:
            key = os.urandom(4)
            payload = (
                bytes(b ^ key[i % 4] for i, b in enumerate(payload))
                if len(payload) < 4096
                else _fast_mask(payload, key)
            )
            head += key
        self.sock.sendall(head + payload)

    def send_text(self, text: str | bytes) -> None:
        self.send_frame(0x1, text.encode() if isinstance(text, str) else text)

    def send_json(self, obj: Any) -> None:
        self.send_text(json.dumps(obj))

    # -- receiving ---------------------------------------------------------------------------

    def recv_frame(self) -> tuple[int, bytes]:
        b0, data = self.recv_raw_frame()
        return b0 & 0x0F, data

    def recv_raw_frame(self) -> tuple[int, bytes]:
        """(first header byte: FIN, RSV and opcode bits; payload) of the next frame."""
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read(8))
        assert not b1 & 0x80, "server frames are never masked"
        return b0, self._read(n)

    def recv_json(self) -> Any:
        while True:
            op, data = self.recv_frame()
            if op == 0x1:
                return json.loads(data)
            if op == 0x8:
                raise Closed(data)

    def recv_until(self, pred: Any) -> Any:
        while True:
            msg = self.recv_json()
            if pred(msg):
                return msg

    def expect_close(self) -> tuple[int | None, str]:
        """Read until the server's close frame; returns (code, reason)."""
        while True:
            op, data = self.recv_frame()
            if op == 0x8:
                if len(data) >= 2:
                    return struct.unpack("!H", data[:2])[0], data[2:].decode()
                return None, ""

    def expect_eof(self) -> None:
        """Read until the server closes TCP (discarding frames)."""
        try:
            while True:
                if not self.sock.recv(65536):
                    return
        except ConnectionResetError:
            return

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def join(ws: RawWS, topic: str = "room:1", ref: str = "1") -> None:
    """Join ``topic`` (join_ref = ref) and assert the join reply is ok."""
    ws.send_json([ref, ref, topic, "phx_join", {}])
    reply = ws.recv_until(lambda m: m[1] == ref)
    assert reply[4]["status"] == "ok", reply


def _fast_mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")
