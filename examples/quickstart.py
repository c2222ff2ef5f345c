"""phx_gevent quickstart: a chat room in one file, with the official phoenix.js client (README.md shows it).

    pip install '.[redis,gunicorn]'     # from a checkout of phx_gevent
    npm install phoenix ws              # phoenix.js for the page (ws: for the Node client)
    python examples/quickstart.py       # then open http://127.0.0.1:4000 in two tabs

PORT and HOST change the address, RELOAD=1 restarts on code changes, REDIS_URL
connects several workers: see README.md ("Deployment in short").
"""

from gevent import monkey

monkey.patch_all()  # first, before anything else imports socket, ssl or threading

import logging  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

from flask import Flask, Response, send_file  # noqa: E402

from phx_gevent import Channel, Endpoint, Socket, channel, error, ok, serve  # noqa: E402

# The library logs connects, joins and refusals, but never configures logging: the app does.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class RoomChannel(Channel):
    def join(self, topic, payload, socket):
        if topic == "room:secret":
            return error({"reason": "unauthorized"})
        return ok({"user": socket.assigns["user"]})

    def handle_in(self, event, payload, socket):
        if event == "new_msg":
            body = str(payload.get("body", ""))[:2000]
            self.broadcast(socket, "new_msg", {"user": socket.assigns["user"], "body": body})
            return ok({})
        return error({"reason": f"unknown event {event!r}"})


class UserSocket(Socket):
    channels = [channel("room:*", RoomChannel)]

    def connect(self, params, socket, connect_info):
        user = params.get("user")
        if not isinstance(user, str) or not 1 <= len(user) <= 64:
            return None  # refused: the client gets HTTP 403
        return socket.assign(user=user)

    def id(self, socket):  # endpoint.broadcast("user_socket:ann", "disconnect", {}) closes ann's sockets
        return "user_socket:" + socket.assigns["user"]


app = Flask(__name__)
# Signs long-poll session tokens. Development value: set SECRET_KEY (the same in every worker) in production.
app.config["SECRET_KEY"] = os.environ.get("SECRET_KEY", "quickstart-development-key-not-secret")
# REDIS_URL unset: one process. Set: broadcasts reach every worker and machine using that Redis.
endpoint = Endpoint(app, pubsub=os.environ.get("REDIS_URL") or None)
endpoint.socket("/socket", UserSocket, longpoll=True)

PAGE = """<!doctype html>
<meta charset="utf-8"><title>phx_gevent quickstart</title>
<ul id="messages"></ul>
<form id="send"><input id="body" autocomplete="off"> <button>Send</button></form>
<script type="module">
import { Socket } from "/phoenix.mjs";

const user = new URLSearchParams(location.search).get("user") || "guest" + Math.floor(Math.random() * 1000);
const show = (text) => {
  const li = document.createElement("li");
  li.textContent = text;
  document.getElementById("messages").append(li);
};
const socket = new Socket("/socket", { params: { user } });
socket.connect();
const room = socket.channel("room:lobby", {});
room.on("new_msg", (msg) => show(`${msg.user}: ${msg.body}`));
room.join().receive("ok", () => show(`joined as ${user}`)).receive("error", (resp) => show(`refused: ${resp.reason}`));
document.getElementById("send").addEventListener("submit", (event) => {
  event.preventDefault();
  room.push("new_msg", { body: document.getElementById("body").value });
  document.getElementById("body").value = "";
});
</script>
"""


@app.get("/")
def index():
    return PAGE


@app.get("/phoenix.mjs")
def phoenix_js():
    # No bundler: the npm package ships an ES module build that the page imports as is.
    here = Path(__file__).resolve().parent
    for base in (Path.cwd(), here, *here.parents):
        path = base / "node_modules" / "phoenix" / "priv" / "static" / "phoenix.mjs"
        if path.is_file():
            return send_file(path, mimetype="text/javascript")
    why = "phoenix.js not found: run `npm install phoenix` in your project (looked for node_modules/phoenix)"
    logging.getLogger("quickstart").error(why)
    return Response(why + "\n", status=500, mimetype="text/plain")


if __name__ == "__main__":
    # Says where it listens; RELOAD=1 restarts it when a source file changes (development).
    serve(
        app,
        os.environ.get("HOST", "127.0.0.1"),
        int(os.environ.get("PORT", "4000")),
        reload=os.environ.get("RELOAD") == "1",
    )
