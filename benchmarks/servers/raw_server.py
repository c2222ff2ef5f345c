"""The raw reference: bare gevent + gevent-websocket, one pre-built frame, one ``sendall`` per connection.

No Flask, no channels, no queues: ``POST /broadcast`` builds the WebSocket
frame once and writes it to every subscriber with one ``sendall`` each, in
the request's greenlet. It speaks just enough of the Phoenix V2 wire
protocol for the same load generator: ``phx_join`` (answered ok, adds the
connection to the topic), heartbeats, and ``ping`` pushes answered with
their own payload. ``GET /socket/websocket`` is the WebSocket URL, as for
phx_gevent. TCP_NODELAY is set on every connection.

A per-connection lock keeps the reader's replies and concurrent broadcasts
from writing to one socket at once (gevent raises ConcurrentObjectUseError
otherwise; it only contends when a socket's kernel buffer is full).
"""

from gevent import monkey

monkey.patch_all()

import socket as pysocket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import ujson  # noqa: E402
from gevent import pywsgi  # noqa: E402
from gevent.lock import Semaphore  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_args, serve  # noqa: E402


def dumps(obj):
    return ujson.dumps(obj, escape_forward_slashes=False, ensure_ascii=False)


def text_frame(text: str) -> bytes:
    data = text.encode("utf-8")
    n = len(data)
    if n < 126:
        return bytes((0x81, n)) + data
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + data
    return struct.pack("!BBQ", 0x81, 127, n) + data


class Conn:
    __slots__ = ("sock", "lock", "alive")

    def __init__(self, sock):
        self.sock = sock
        self.lock = Semaphore()
        self.alive = True

    def write(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)


TOPICS: dict[str, dict[Conn, None]] = {}


class NoDelayHandler(WebSocketHandler):
    def handle(self):
        self.socket.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
        super().handle()


def reply(conn: Conn, join_ref, ref, topic, response) -> None:
    conn.write(text_frame(dumps([join_ref, ref, topic, "phx_reply", {"status": "ok", "response": response}])))


def websocket(environ) -> None:
    ws = environ["wsgi.websocket"]
    conn = Conn(ws.handler.socket)
    joined: list[str] = []
    try:
        while True:
            message = ws.receive()
            if message is None:
                break
            try:
                join_ref, ref, topic, event, payload = ujson.loads(message)[:5]
            except (ValueError, TypeError):
                break
            if event == "heartbeat":
                reply(conn, None, ref, "phoenix", {})
            elif event == "phx_join":
                TOPICS.setdefault(topic, {})[conn] = None
                joined.append(topic)
                reply(conn, join_ref, ref, topic, {})
            elif event == "phx_leave":
                TOPICS.get(topic, {}).pop(conn, None)
                reply(conn, join_ref, ref, topic, {})
            else:
                reply(conn, join_ref, ref, topic, payload)
    except OSError:
        pass
    finally:
        conn.alive = False
        for topic in joined:
            TOPICS.get(topic, {}).pop(conn, None)


def broadcast(environ, start_response):
    body = environ["wsgi.input"].read()
    data = ujson.loads(body)
    frame = text_frame(dumps([None, None, data["topic"], data["event"], data["payload"]]))
    for conn in list(TOPICS.get(data["topic"], ())):
        try:
            conn.write(frame)
        except OSError:
            pass
    start_response("204 No Content", [])
    return []


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/socket/websocket" and "wsgi.websocket" in environ:
        websocket(environ)
        return []
    if path == "/broadcast" and environ["REQUEST_METHOD"] == "POST":
        return broadcast(environ, start_response)
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]


def main() -> None:
    args = parse_args("raw gevent-websocket reference server")
    server = pywsgi.WSGIServer(
        (args.host, args.port), app, handler_class=NoDelayHandler, log=None, backlog=args.backlog
    )
    server.init_socket()
    serve(server)


if __name__ == "__main__":
    main()
