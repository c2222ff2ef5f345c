"""Flask-SocketIO on gevent (gevent-websocket), the peer: emit to a room, emit with ack.

Socket.IO equivalents of the phx_gevent operations:

* joining ``room:lobby``: the client emits ``join`` ``{"room": ...}`` with an
  ack; the handler calls ``join_room``;
* ``POST /broadcast`` ``{topic, event, payload}``: ``socketio.emit(event,
  payload, to=topic)`` (emit to a room);
* push and reply: the client emits ``echo`` with an ack; the handler returns
  the payload (emit with ack).

Served as ``socketio.run`` does for gevent (``pywsgi.WSGIServer`` with
gevent-websocket's handler), plus TCP_NODELAY on every connection.
Versions are pinned in benchmarks/requirements.txt.
"""

from gevent import monkey

monkey.patch_all()

import socket as pysocket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from flask import Flask, Response, request  # noqa: E402
from flask_socketio import SocketIO, join_room  # noqa: E402
from gevent import pywsgi  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_args, serve  # noqa: E402


class NoDelayHandler(WebSocketHandler):
    def handle(self):
        self.socket.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
        super().handle()


def create_app():
    app = Flask(__name__)
    socketio = SocketIO(app, async_mode="gevent", logger=False, engineio_logger=False, cors_allowed_origins="*")

    @socketio.on("join")
    def on_join(data):
        join_room(data["room"])
        return {"status": "ok"}

    @socketio.on("echo")
    def on_echo(data):
        return data

    @app.post("/broadcast")
    def broadcast():
        data = request.get_json(silent=True)
        socketio.emit(data["event"], data["payload"], to=data["topic"])
        return Response(status=204)

    return app, socketio


def main() -> None:
    args = parse_args("Flask-SocketIO benchmark server")
    app, _socketio = create_app()
    server = pywsgi.WSGIServer(
        (args.host, args.port), app, handler_class=NoDelayHandler, log=None, backlog=args.backlog
    )
    server.init_socket()
    serve(server)


if __name__ == "__main__":
    main()
