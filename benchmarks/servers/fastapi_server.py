"""FastAPI on uvicorn (uvloop, httptools, websockets), the asyncio peer.

The ConnectionManager pattern of FastAPI's WebSocket guide, per topic: the
manager keeps the accepted sockets of each topic, and ``broadcast`` awaits
``send_text`` for each of them in turn. It answers the same subset of the
Phoenix V2 protocol as raw_server.py (``phx_join``, ``phx_leave``,
heartbeats, other pushes answered with their payload) on
``/socket/websocket``, and ``POST /broadcast`` ``{topic, event, payload}``
serialises the frame once. uvicorn with ``loop="uvloop"``,
``http="httptools"``, ``ws="websockets"``, no access log; asyncio and uvloop
set TCP_NODELAY on every connection themselves. Versions are pinned in
benchmarks/requirements.txt.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import warnings
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_args


class ConnectionManager:
    """The guide's manager, with a list of connections per topic."""

    def __init__(self) -> None:
        self.topics: dict[str, list[WebSocket]] = {}

    def join(self, topic: str, websocket: WebSocket) -> None:
        self.topics.setdefault(topic, []).append(websocket)

    def leave(self, topic: str, websocket: WebSocket) -> None:
        subs = self.topics.get(topic)
        if subs and websocket in subs:
            subs.remove(websocket)

    async def broadcast(self, topic: str, message: str) -> None:
        for connection in list(self.topics.get(topic, ())):
            try:
                await connection.send_text(message)
            except Exception:  # a closing connection; its endpoint cleans up
                pass


manager = ConnectionManager()
ready: asyncio.Event | None = None


def dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@asynccontextmanager
async def lifespan(app: FastAPI):
    print(f"LISTENING {app.state.port}", flush=True)
    yield


app = FastAPI(lifespan=lifespan)


@app.post("/broadcast")
async def broadcast(request: Request) -> Response:
    data = json.loads(await request.body())
    await manager.broadcast(data["topic"], dumps([None, None, data["topic"], data["event"], data["payload"]]))
    return Response(status_code=204)


@app.websocket("/socket/websocket")
async def websocket_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    joined: list[str] = []
    try:
        while True:
            text = await websocket.receive_text()
            try:
                join_ref, ref, topic, event, payload = json.loads(text)[:5]
            except (ValueError, TypeError):
                await websocket.close(1011)
                break
            if event == "heartbeat":
                response, join_ref = {}, None
            elif event == "phx_join":
                manager.join(topic, websocket)
                joined.append(topic)
                response = {}
            elif event == "phx_leave":
                manager.leave(topic, websocket)
                response = {}
            else:
                response = payload
            reply = [join_ref, ref, topic, "phx_reply", {"status": "ok", "response": response}]
            await websocket.send_text(dumps(reply))
    except WebSocketDisconnect:
        pass
    finally:
        for topic in joined:
            manager.leave(topic, websocket)


def main() -> None:
    # uvicorn 0.54 calls ws="websockets" (the websockets library's legacy protocol) deprecated; it is
    # what the FastAPI guide's `uvicorn[standard]` install serves.
    warnings.filterwarnings("ignore", message=".*websockets.* implementation is deprecated")
    args = parse_args("FastAPI/uvicorn benchmark server")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    app.state.port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        ws="websockets",
        ws_per_message_deflate=False,
        access_log=False,
        log_level="warning",
        lifespan="on",
        backlog=args.backlog,
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
