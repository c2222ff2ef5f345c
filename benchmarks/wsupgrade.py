"""The client side of a WebSocket upgrade to the example app's ``/socket``, shared by the scripts
that drive the server over plain blocking sockets (callgrind.py, callgrind_storm.py, slow_readers.py)."""

from __future__ import annotations

import base64
import os
import socket


def upgrade_request(port: int, user: str) -> bytes:
    """The GET that asks ``/socket/websocket`` (Phoenix V2 JSON) for an upgrade, as ``user``."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /socket/websocket?vsn=2.0.0&user={user} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def read_101(sock: socket.socket) -> None:
    """Read the response head up to the blank line (byte by byte: no frame bytes are consumed).

    Raises ``RuntimeError`` when the server closes first or answers anything but a 101.
    """
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise RuntimeError("handshake refused")
        head += chunk
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(head.decode(errors="replace"))


def upgrade(sock: socket.socket, port: int, user: str) -> socket.socket:
    """Upgrade a connected ``sock``; returns it once the 101 has been read."""
    sock.sendall(upgrade_request(port, user))
    read_101(sock)
    return sock
