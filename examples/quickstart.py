"""phx_gevent quickstart: a chat room in one file, with the official phoenix.js client.

Run it from a checkout of phx_gevent (or copy this file into your project):

    pip install '.[redis,gunicorn]'     # phx_gevent with the Redis and gunicorn extras
    npm install phoenix ws              # phoenix.js for the page (and ws for the Node client)
    python examples/quickstart.py       # open http://127.0.0.1:4000 in two tabs

In production, several workers share broadcasts through Redis:

    REDIS_URL=redis://127.0.0.1:6379/0 SECRET_KEY=... \
        gunicorn -k phx_gevent.worker.GeventWebSocketWorker -w 2 -b 127.0.0.1:4000 --chdir examples quickstart:app
"""

from gevent import monkey

monkey.patch_all()  # first, before anything else imports socket, ssl or threading

import logging  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

from flask import Flask, Response, send_file  # noqa: E402

from phx_gevent import Channel, Endpoint, Socket, channel, error, ok, serve  # noqa: E402

# The library logs (connects, joins, refusals) but never configures logging: the app does.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log = logging.getLogger("quickstart")


class RoomChannel(Channel):
    """``room:*`` topics: anyone may join (except room:secret) and chat."""

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
    """One connection per browser tab: ``connect`` authenticates it, ``channels`` route its topics."""

    channels = [channel("room:*", RoomChannel)]

    def connect(self, params, socket, connect_info):
        user = params.get("user")
        if not isinstance(user, str) or not 1 <= len(user) <= 64:
            return None  # refused: the client gets HTTP 403
        return socket.assign(user=user)

    def id(self, socket):
        # endpoint.broadcast("user_socket:alice", "disconnect", {}) closes alice's connections.
        return "user_socket:" + socket.assigns["user"]


app = Flask(__name__)
# Signs long-poll session tokens; development only: set SECRET_KEY (the same in every worker) in production.
app.config["SECRET_KEY"] = os.environ.get("SECRET_KEY", "quickstart-development-key-not-secret")
# REDIS_URL unset: one process. Set: broadcasts reach every worker and machine on that Redis.
endpoint = Endpoint(app, pubsub=os.environ.get("REDIS_URL") or None)
endpoint.socket("/socket", UserSocket, longpoll=True)

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>phx_gevent quickstart</title>
<p id="state">connecting...</p>
<ul id="messages"></ul>
<form id="send"><input id="body" autocomplete="off" placeholder="message"> <button>Send</button></form>
<script type="module">
import { Socket } from "/phoenix.mjs";

const user = new URLSearchParams(location.search).get("user") || "guest" + Math.floor(Math.random() * 1000);
const show = (text) => {
  const li = document.createElement("li");
  li.textContent = text;
  document.getElementById("messages").append(li);
};
const socket = new Socket("/socket", { params: { user } });
socket.onOpen(() => (document.getElementById("state").textContent = `connected as ${user}`));
socket.onError(() => (document.getElementById("state").textContent = "connection lost, retrying..."));
socket.connect();

const room = socket.channel("room:lobby", {});
room.on("new_msg", (msg) => show(`${msg.user}: ${msg.body}`));
room.join()
  .receive("ok", () => show("joined room:lobby"))
  .receive("error", (resp) => show(`join refused: ${resp.reason}`));

document.getElementById("send").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("body");
  room.push("new_msg", { body: input.value });
  input.value = "";
});
</script>
"""


@app.get("/")
def index():
    return PAGE


def find_phoenix_js():
    """node_modules/phoenix/priv/static/phoenix.mjs in the working directory or next to this file (or above)."""
    here = Path(__file__).resolve().parent
    for base in (Path.cwd(), here, *here.parents):
        path = base / "node_modules" / "phoenix" / "priv" / "static" / "phoenix.mjs"
        if path.is_file():
            return path
    return None


@app.get("/phoenix.mjs")
def phoenix_js():
    # No bundler needed: the npm package ships an ES module build the page imports directly.
    path = find_phoenix_js()
    if path is None:
        why = "phoenix.js not found: run `npm install phoenix` in this directory (looked for node_modules/phoenix)"
        log.error(why)
        return Response(why + "\n", status=500, mimetype="text/plain")
    return send_file(path, mimetype="text/javascript")


if __name__ == "__main__":
    # Prints where it listens; RELOAD=1 restarts on code changes, like `flask run --debug`.
    serve(
        app,
        os.environ.get("HOST", "127.0.0.1"),
        int(os.environ.get("PORT", "4000")),
        reload=os.environ.get("RELOAD") == "1",
    )
