"""A small chat on phx_gevent: ``python app_example.py`` serves it on http://127.0.0.1:4000.

``HOST`` and ``PORT`` override the address (``PORT=0`` picks a free port and
prints it), ``REDIS_URL`` connects workers and machines through Redis,
``SECRET_KEY`` signs long-poll session tokens (a development key otherwise), and
``RELOAD=1`` restarts the server when the code changes. Under gunicorn::

    gunicorn -k phx_gevent.worker.GeventWebSocketWorker -w 1 app_example:app

Other checks rely on the behaviour described in the README ("The example app").
"""

from gevent import monkey

monkey.patch_all()  # first, before anything imports socket or threading

import hmac  # noqa: E402
import ipaddress  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from flask import Flask, Response, abort, current_app, request, send_file  # noqa: E402

from phx_gevent import (  # noqa: E402
    BroadcastTimeout,
    Channel,
    Endpoint,
    Presence,
    Socket,
    SocketState,
    channel,
    error,
    ok,
    refuse,
    stop,
    token,
)

HERE = Path(__file__).resolve().parent
PHOENIX_JS = HERE / "node_modules" / "phoenix" / "priv" / "static"

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>phx_gevent chat</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; padding: 0 1rem; }
  #log { border: 1px solid #ccc; height: 20rem; overflow-y: auto; padding: .5rem; margin: .5rem 0; }
  #log p { margin: .15rem 0; } .sys { color: #777; } .err { color: #b00; }
  form { display: flex; gap: .5rem; } input[type=text] { flex: 1; }
  #status::before { content: "● "; color: #999; }
  #status[data-state=open]::before { color: #1a7f37; } #status[data-state=reconnecting]::before { color: #d4a017; }
  #status[data-state=closed]::before { color: #b00; }
</style>
</head>
<body>
<h1>phx_gevent chat</h1>
<form id="join">
  <input id="user" type="text" placeholder="your name" required maxlength="64">
  <input id="room" type="text" value="lobby" required>
  <label><input id="longpoll" type="checkbox"> long-poll</label>
  <button>Join</button>
</form>
<div id="status" class="sys">not connected</div>
<div id="online" class="sys"></div>
<div id="online-note" class="sys"></div>
<div id="log"></div>
<form id="send">
  <input id="body" type="text" placeholder="message" maxlength="2000" disabled><button>Send</button>
</form>
<script type="module">
import { Socket, LongPoll, Presence } from "/assets/phoenix.mjs";

const log = document.getElementById("log");
function say(text, cls) {
  const p = document.createElement("p");
  p.textContent = text;
  if (cls) p.className = cls;
  log.appendChild(p);
  log.scrollTop = log.scrollHeight;
}

let socket = null, channel = null;

// The transport in use and the connection's state, live: connecting, open, reconnecting
// (phoenix.js retries with backoff after a drop), closed (socket.disconnect()).
// data-history keeps every state shown, for the tests.
const status = document.getElementById("status");
function watchConnection(s) {
  const show = (state) => {
    if (s !== socket) return;  // a replaced socket's late callbacks
    const transport = s.transport === LongPoll ? "long-poll" : "WebSocket";
    status.textContent = `transport: ${transport} · connection: ${state}`;
    status.dataset.state = state;
    status.dataset.history = ((status.dataset.history || "") + " " + state).trim();
  };
  show("connecting");
  s.onOpen(() => show("open"));
  // phoenix.js reconnects by itself after any close it did not ask for.
  s.onClose(() => show(s.closeWasClean ? "closed" : "reconnecting"));
}

// A user listed twice is one person with two connections: another tab, or a tab
// that was closed while on long-poll (its session lingers until it times out).
function explainDuplicates(dupes) {
  document.getElementById("online-note").textContent = dupes.length === 0 ? "" :
    dupes.map(([user, n]) => `${user} (${n}): ${n} connections`).join(", ") +
    ". Another tab, or a closed long-poll tab: its session stays until its timeout (15 to 30 s).";
}
document.getElementById("join").addEventListener("submit", (e) => {
  e.preventDefault();
  if (socket) socket.disconnect();
  const user = document.getElementById("user").value;
  const room = "room:" + document.getElementById("room").value;
  const opts = { params: { user } };
  const pageToken = document.querySelector('meta[name="socket-token"]');
  if (pageToken) opts.authToken = pageToken.content;  // checked by UserSocket.connect
  if (document.getElementById("longpoll").checked) opts.transport = LongPoll;
  socket = new Socket("/socket", opts);
  socket.onError(() => say("connection error", "err"));
  watchConnection(socket);
  socket.connect();
  // Recovery (docs/recovery.md): the params function runs on every (re)join, so a rejoin
  // sends the offset of the last message seen; the first join asks for a backlog.
  let lastOffset = null, recovering = null;
  channel = socket.channel(room, () => lastOffset === null
    ? { presence: true, since: null, last: 50 } : { presence: true, since: lastOffset });
  const presence = new Presence(channel);
  presence.onSync(() => {
    const names = presence.list((user, { metas }) => metas.length > 1 ? `${user} (${metas.length})` : user);
    document.getElementById("online").textContent = "online: " + names.join(", ");
    explainDuplicates(presence.list((user, { metas }) => [user, metas.length]).filter(([, n]) => n > 1));
  });
  channel.on("welcome", (m) => {
    // The replay comes between the join reply and this push.
    if (recovering !== null) say(`recovered ${recovering} messages`, "sys");
    recovering = null;
    say(`welcome ${m.user} (served by ${m.node})`, "sys");
  });
  channel.on("new_msg", (m, ref) => {
    if (ref) lastOffset = ref;  // the offset, in the ref slot of history messages
    if (recovering !== null) recovering++;
    say(`${m.user}: ${m.body}`);
  });
  channel.on("announce", (m) => say(`announcement for ${m.to}: ${JSON.stringify(m)}`, "sys"));
  channel.join()
    .receive("ok", (r) => {
      say(`joined ${room}`, "sys");
      document.getElementById("body").disabled = false;
      if (r.recovered === false) say("missed messages could not be recovered: reload for the latest", "err");
      recovering = lastOffset !== null && r.recovered ? 0 : null;
    })
    .receive("error", (r) => say(`join refused: ${r.reason}`, "err"));
});
// ?user=alice&room=lobby[&longpoll=1][&send=hello] joins (and sends) at once: handy for demos and tests.
const query = new URLSearchParams(location.search);
if (query.get("user")) {
  document.getElementById("user").value = query.get("user");
  document.getElementById("room").value = query.get("room") || "lobby";
  document.getElementById("longpoll").checked = query.get("longpoll") === "1";
  document.getElementById("join").requestSubmit();
  if (query.get("send")) channel.on("welcome", () => channel.push("new_msg", { body: query.get("send") }));
}
document.getElementById("send").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = document.getElementById("body");
  if (!channel || !input.value) return;
  channel.push("new_msg", { body: input.value })
    .receive("error", (r) => say(`not sent: ${r.reason}`, "err"));
  input.value = "";
});
</script>
</body>
</html>
"""


class RoomChannel(Channel):
    """``room:*``: chat messages, echo pings, presence, and a few events to exercise the protocol.

    Presence is opt-in (join payload ``{"presence": true}``, as the page
    does), so clients that did not ask see exactly the frames they would
    without it.

    History (docs/recovery.md): the last 100 ``new_msg`` of each room, for
    300 s. A join with ``since`` (null or an offset) gets offsets in the ref
    of ``new_msg`` frames, ``recovered`` in the reply and the missed
    messages; ``last: N`` (at most 100) asks for a backlog.
    """

    intercept = ["announce", "presence_diff"]
    history = {"size": 100, "ttl": 300, "events": ["new_msg"]}

    def join(self, topic: str, payload: Any, socket: SocketState):
        if topic == "room:secret":
            return error({"reason": "unauthorized"})
        self.wants_presence = isinstance(payload, dict) and payload.get("presence") is True
        socket.channel_pid.send("after_join")  # handled in handle_info, after the join reply
        return ok({"user": socket.assigns["user"]})

    def handle_info(self, message: Any, socket: SocketState):
        if message == "after_join":
            user = socket.assigns["user"]
            self.push(socket, "welcome", {"user": user, "node": socket.endpoint.node_name})
            if self.wants_presence:
                presence = socket.handler.presence
                presence.track(socket, user, {"online_at": int(time.time() * 1000), "node": socket.endpoint.node_name})
                self.push(socket, "presence_state", presence.list(socket))
        return None

    def handle_in(self, event: str, payload: Any, socket: SocketState):
        if event == "new_msg":
            body = payload.get("body") if isinstance(payload, dict) else None
            if not isinstance(body, str) or not 1 <= len(body) <= 2000:
                return error({"reason": "invalid body"})
            self.broadcast(socket, "new_msg", {"user": socket.assigns["user"], "body": body})
            return ok({})
        if event == "ping":
            return ok(payload)  # bytes in, bytes out: a binary reply
        if event == "crash":
            raise RuntimeError("crash requested by the client")
        if event == "stop":
            return stop("normal", ok({}))
        return error({"reason": "unknown event"})

    def handle_out(self, event: str, payload: Any, socket: SocketState):
        if event == "presence_diff":
            if self.wants_presence:  # only to the clients that asked for presence
                self.push(socket, event, payload)
            return None
        # "announce": each client gets its own copy.
        self.push(socket, event, {**payload, "to": socket.assigns["user"]})
        return None


class UserSocket(Socket):
    channels = [channel("room:*", RoomChannel)]

    def __init__(self, presence: Presence) -> None:
        super().__init__()
        self.presence = presence  # channels reach it as socket.handler.presence

    def connect(self, params: dict, socket: SocketState, connect_info: dict):
        user = params.get("user")
        if not isinstance(user, str) or not 1 <= len(user) <= 64:
            return None  # refused: HTTP 403
        if user.startswith("blocked"):
            return refuse("blocked")  # refused with a reason: handle_error answers the handshake
        page_token = connect_info.get("auth_token")
        if page_token and has_real_secret(current_app):
            # Optional: the page's token (see index()) must be ours and less than a day old.
            try:
                socket.assign(page=token.verify(socket, "example page", page_token, max_age=86400))
            except token.TokenExpired:
                return refuse("token expired")
            except token.TokenError:
                return refuse("invalid token")
        return socket.assign(user=user)

    def handle_error(self, reason: Any) -> Response:
        # Phoenix's transport :error_handler: the WebSocket handshake's answer to refuse(reason).
        # (Long-poll clients get {"status": 403, "reason": reason}, which phoenix.js understands.)
        if reason in ("blocked", "invalid token", "token expired"):
            return Response(reason, status=401, headers={"WWW-Authenticate": 'Bearer realm="phx_gevent example"'})
        return super().handle_error(reason)

    def id(self, socket: SocketState) -> str:
        return "user_socket:" + socket.assigns["user"]


def _env_list(name: str, default: list[str] | None) -> list[str] | None:
    value = os.environ.get(name)
    return default if value is None else [v.strip() for v in value.split(",") if v.strip()]


def dashboard_auth(req: Any) -> str | bool:
    """Who may open /phx/dashboard: with ``DASHBOARD_TOKEN`` set, whoever passes ``?token=<it>``; else loopback."""
    token = os.environ.get("DASHBOARD_TOKEN")
    if token:
        return hmac.compare_digest(req.args.get("token", ""), token) and "dashboard token holder"
    try:
        addr = ipaddress.ip_address(req.remote_addr or "")
    except ValueError:
        return False
    loopback = addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)
    return loopback and f"loopback client {req.remote_addr}"


def add_observability(endpoint: Endpoint) -> None:
    """Health probes, Prometheus metrics (loopback or token, as the dashboard) and the dashboard."""
    endpoint.health()  # /phx/health and /phx/ready
    endpoint.dashboard("/phx/dashboard", auth=dashboard_auth)
    try:
        endpoint.metrics("/metrics", auth=dashboard_auth)
    except ImportError:  # prometheus_client is an optional extra
        logging.getLogger(__name__).info("metrics off: pip install 'phx_gevent[metrics]'")


# Signs long-poll session tokens (and the Flask session). A development value, so that `make example`
# (and gunicorn -w 2 without SECRET_KEY) works out of the box: set SECRET_KEY for anything public.
DEV_SECRET_KEY = "phx-gevent-example-development-key-not-secret"


def has_real_secret(app: Flask) -> bool:
    """A SECRET_KEY of the operator's (not the development one): the page tokens are on only then."""
    return app.config.get("SECRET_KEY") not in (None, "", DEV_SECRET_KEY)


def create_app() -> tuple[Flask, Endpoint]:
    app = Flask(__name__)
    app.config["SECRET_KEY"] = os.environ.get("SECRET_KEY") or DEV_SECRET_KEY
    endpoint = Endpoint(
        app,
        pubsub=os.environ.get("REDIS_URL") or None,
        # ALLOWED_HOSTS="chat.example.com,...": only these Host names are
        # answered (a DNS-rebinding page is refused). Unset, `python
        # app_example.py` on loopback still answers only loopback names (serve()'s
        # default); under gunicorn, set it for the names the app is served under.
        allowed_hosts=_env_list("ALLOWED_HOSTS", None),
        # TRUSTED_PROXIES="127.0.0.1" behind nginx: the loopback-only endpoints
        # and per-address limits then see the real client address.
        trusted_proxies=_env_list("TRUSTED_PROXIES", []),
    )
    endpoint.socket("/socket", UserSocket(Presence(endpoint)), auth_token=True, longpoll=True)
    add_observability(endpoint)

    def loopback_only() -> None:
        # Behind a reverse proxy every request comes from the proxy's address:
        # see the README before exposing these two endpoints.
        try:
            if ipaddress.ip_address(request.remote_addr or "").is_loopback:
                return
            mapped = ipaddress.ip_address(request.remote_addr or "")
            if getattr(mapped, "ipv4_mapped", None) and mapped.ipv4_mapped.is_loopback:
                return
        except ValueError:
            pass
        abort(403)

    @app.get("/")
    def index() -> Response:
        html = INDEX_HTML
        if has_real_secret(app):
            # Hand the page a signed token; phoenix.js sends it back as authToken (checked in connect).
            meta = f'<meta name="socket-token" content="{token.sign(app, "example page", "index")}">'
            html = html.replace("<head>", "<head>\n" + meta, 1)
        return Response(html, mimetype="text/html")

    @app.get("/assets/phoenix.mjs")
    def phoenix_js() -> Response:
        path = PHOENIX_JS / "phoenix.mjs"
        if not path.exists():
            return Response("phoenix.js is not installed: run `make example` (or npm ci)", status=500)
        return send_file(path, mimetype="text/javascript")

    @app.post("/broadcast")
    def broadcast() -> Response:
        loopback_only()
        data = request.get_json(silent=True)
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("topic"), str)
            or not isinstance(data.get("event"), str)
            or not isinstance(data.get("payload"), dict)
        ):
            return Response("expected JSON {topic: str, event: str, payload: object}", status=400)
        try:
            endpoint.broadcast(data["topic"], data["event"], data["payload"])
        except BroadcastTimeout:
            return Response("overloaded", status=503)
        except (TypeError, ValueError, OverflowError):
            return Response("payload cannot be encoded", status=400)
        return Response(status=204)

    @app.post("/disconnect")
    def disconnect() -> Response:
        loopback_only()
        data = request.get_json(silent=True)
        if not isinstance(data, dict) or not isinstance(data.get("user"), str):
            return Response("expected JSON {user: str}", status=400)
        endpoint.broadcast("user_socket:" + data["user"], "disconnect", {})
        return Response(status=204)

    return app, endpoint


app, endpoint = create_app()


if __name__ == "__main__":
    from phx_gevent import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Writes "phx_gevent: serving on http://HOST:PORT" to stderr; RELOAD=1 restarts on code changes.
    serve(
        app,
        os.environ.get("HOST", "127.0.0.1"),
        int(os.environ.get("PORT", "4000")),
        reload=os.environ.get("RELOAD") == "1",
    )
