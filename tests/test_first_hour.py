"""The first hour of a new user: the quickstart file runs as written, and mistakes fail fast with their fix.

Each program runs in its own interpreter, as a user would start it
(``python examples/quickstart.py``, ``node examples/client.mjs``), so what is
checked is what they see: the lines on stderr, HTTP statuses and bodies, and
what phoenix.js receives.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from phx_gevent import Endpoint, Socket
from tests import httpclient as http
from tests.servers import ROOT, OutputLog, wait_until
from tests.test_browser import browser  # noqa: F401  (the headless Chromium fixture)

QUICKSTART = ROOT / "examples" / "quickstart.py"
SERVING = r"phx_gevent: serving on http://127\.0\.0\.1:(\d+)"


class Program:
    """A Python program started as a user would, its stdout and stderr collected together."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        inherited = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "SECRET_KEY", "RELOAD")}
        self.proc = subprocess.Popen(
            args,
            cwd=str(cwd),
            env={**inherited, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the reloader's child too: stopped with the group
        )
        self.log = OutputLog(self.proc.stdout)

    def port(self, timeout: float = 30.0) -> int:
        return int(self.log.wait(SERVING, timeout)[0].group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a reloader child left behind
        except ProcessLookupError:
            pass
        self.log.join()

    def output(self) -> str:
        return "\n".join(self.log.lines)


@pytest.fixture
def program() -> Iterator[Any]:
    """A factory: ``program([...], cwd, env)`` starts one; all are stopped afterwards."""
    started: list[Program] = []

    def start(args: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None) -> Program:
        p = Program(args, cwd, env)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh, unpatched interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- the quickstart -------------------------------------------------------------------------


def test_the_quickstart_runs_as_written_and_phoenix_js_chats_through_it(program, js):
    app = program([sys.executable, "examples/quickstart.py"], env={"PORT": "0"})
    port = app.port()
    base = f"http://127.0.0.1:{port}"
    page = http.get(base + "/")
    assert page.status == 200 and b'import { Socket } from "/phoenix.mjs"' in page.body
    asset = http.get(base + "/phoenix.mjs")
    assert asset.status == 200 and asset.headers["content-type"].startswith("text/javascript")
    assert b"export {" in asset.body and b"  Socket\n" in asset.body
    # Both transports, one room.
    url = f"ws://127.0.0.1:{port}/socket"
    _, ann = js.join_room(url, "ann", "room:lobby")
    _, bob = js.join_room(url, "bob", "room:lobby", longpoll=True)
    since = js.mark()
    assert js.push(ann, "new_msg", {"body": "hi bob"})["status"] == "ok"
    for cid in (ann, bob):
        js.wait(ev="chan", channel=cid, event="new_msg", since=since, payload={"user": "ann", "body": "hi bob"})
    # A refused join and a refused connect, as the user sees them.
    sid = js.open_socket(url, {"user": "eve"})
    secret = js.channel(sid, "room:secret")
    reply = js.join(secret)
    assert (reply["status"], reply["response"]) == ("error", {"reason": "unauthorized"})
    refused = js.socket(url, {})
    js.wait(ev="error", socket=refused)
    # The app configured logging: connects, joins and the refusal (with the handler's name) are on stderr.
    app.log.wait(r"INFO phx_gevent\.mount: CONNECTED TO UserSocket in .* \(path /socket, transport websocket")
    app.log.wait(r"INFO phx_gevent\.mount: CONNECTED TO UserSocket in .* \(path /socket, transport longpoll")
    app.log.wait(r"JOINED room:lobby in .* \(RoomChannel\)")
    app.log.wait(r"REFUSED CONNECTION TO UserSocket in .* transport websocket.*: UserSocket\.connect returned None")
    # A patched process starts without the unpatched warning.
    assert "not monkey-patched" not in app.output()

    # The README's Node snippet, run as written (the URL given on its command line).
    since = js.mark()
    node = subprocess.run(["node", "examples/client.mjs", url], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert node.returncode == 0, node.stderr
    assert node.stdout.strip() == "node: hello from Node"
    js.wait(ev="chan", channel=ann, event="new_msg", since=since, payload={"user": "node", "body": "hello from Node"})


def test_the_quickstart_page_loads_phoenix_js_without_a_bundler(program, browser, js):  # noqa: F811
    app = program([sys.executable, "examples/quickstart.py"], env={"PORT": "0"})
    port = app.port()
    browser.goto(f"http://127.0.0.1:{port}/?user=ann")
    browser.wait_text("#messages", lambda t: "joined as ann" in t)
    _, bob = js.join_room(f"ws://127.0.0.1:{port}/socket", "bob", "room:lobby")
    assert js.push(bob, "new_msg", {"body": "hello ann"})["status"] == "ok"
    browser.wait_text("#messages", lambda t: "bob: hello ann" in t)


def test_the_quickstart_says_how_to_get_phoenix_js_when_it_is_missing(program, tmp_path):
    # Copied into an empty project: no node_modules anywhere above it.
    shutil.copy(QUICKSTART, tmp_path / "quickstart.py")
    app = program([sys.executable, "quickstart.py"], cwd=tmp_path, env={"PORT": "0"})
    resp = http.get(f"http://127.0.0.1:{app.port()}/phoenix.mjs")
    assert resp.status == 500
    assert b"npm install phoenix" in resp.body
    app.log.wait(r"ERROR quickstart: phoenix\.js not found: run `npm install phoenix`")


def test_make_example_serves_without_warnings(program, js):
    app = program([sys.executable, "app_example.py"], env={"PORT": "0"})
    port = app.port()
    # Long-poll signs its session tokens: the example has a development key, so no SECRET_KEY warning.
    js.join_room(f"ws://127.0.0.1:{port}/socket", "ann", "room:lobby", longpoll=True)
    app.log.wait(r"CONNECTED TO UserSocket in .* transport longpoll")
    assert not [line for line in app.log.lines if "WARNING" in line or "SECRET_KEY" in line], app.output()


# -- the development server -------------------------------------------------------------------

RELOADING_APP = """\
from gevent import monkey

monkey.patch_all()

from flask import Flask

from phx_gevent import Endpoint, serve

app = Flask(__name__)
Endpoint(app)


@app.get("/")
def index():
    return "version {version}"


if __name__ == "__main__":
    serve(app, "127.0.0.1", 0, reload=True, reload_interval=0.2)
"""


@pytest.mark.parametrize("how", ["serve", "flask phx run"])
def test_the_reloader_restarts_on_a_code_change_and_keeps_the_port(program, tmp_path, how):
    source = tmp_path / "app.py"
    source.write_text(RELOADING_APP.format(version=1))
    if how == "serve":  # python app.py, whose __main__ calls serve(..., reload=True)
        app = program([sys.executable, "app.py"], cwd=tmp_path)
    else:  # Flask's command line; the Endpoint adds the `phx` group
        command = ["-m", "flask", "--app", "app", "phx", "run", "--port", "0", "--reload"]
        app = program([sys.executable, *command], cwd=tmp_path)
    port = app.port()
    app.log.wait(r"reloader on")
    url = f"http://127.0.0.1:{port}/"
    assert wait_until(lambda: http.get(url).body == b"version 1", 30, "the first version")
    source.write_text(RELOADING_APP.format(version=2))
    # A later modification time than the first version's, whatever the file system's granularity.
    later = time.time() + 5
    os.utime(source, (later, later))
    assert wait_until(lambda: http.get(url).body == b"version 2", 30, "the reloaded version", interval=0.1)
    app.log.wait(r"Detected change in .*app\.py")


def test_an_unpatched_server_warns_and_names_the_fix():
    out = run_python(
        """
        from flask import Flask
        from phx_gevent import Endpoint, make_server
        app = Flask("unpatched")
        Endpoint(app)
        server = make_server(app, "127.0.0.1", 0)
        print("started")
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "started"
    assert "phx_gevent: this process is not monkey-patched (socket, select, time, threading)" in out.stderr
    assert "from gevent import monkey; monkey.patch_all()" in out.stderr


def test_the_redis_adapter_refuses_an_unpatched_process_and_points_to_the_emitter():
    # No Redis is needed: the refusal comes before any connection (nothing is on port 9).
    out = run_python(
        """
        from flask import Flask
        from phx_gevent import Endpoint, NotMonkeyPatchedError, make_server
        app = Flask("unpatched")
        endpoint = Endpoint(app, pubsub="redis://127.0.0.1:9/0")
        for attempt in (lambda: make_server(app, "127.0.0.1", 0), lambda: endpoint.broadcast("t", "e", {})):
            try:
                attempt()
            except NotMonkeyPatchedError as exc:
                print("refused:", exc)
            else:
                print("started")
        """,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("refused: ") for line in lines), out.stdout
    for line in lines:
        assert "monkey.patch_all()" in line
        assert "phx_gevent.Emitter" in line
        assert "GeventWebSocketWorker" in line


def test_serve_refuses_an_unpatched_redis_process_instead_of_hanging():
    out = run_python(
        """
        from flask import Flask
        from phx_gevent import Endpoint, serve
        app = Flask("unpatched")
        Endpoint(app, pubsub="redis://127.0.0.1:9/0")
        serve(app, "127.0.0.1", 0)
        """,
        timeout=30,
    )
    assert out.returncode == 1
    assert "NotMonkeyPatchedError" in out.stderr and "phx_gevent.Emitter" in out.stderr
    assert "serving on" not in out.stderr


# -- refusals that name their fix --------------------------------------------------------------


class NamedSocket(Socket):
    def connect(self, params, socket, connect_info):
        return socket.assign(user=params["user"]) if params.get("user") else None


def socket_app(**options: Any) -> Flask:
    app = Flask(__name__)
    Endpoint(app).socket("/socket", NamedSocket, longpoll=True, **options)
    return app


def test_an_origin_refusal_names_check_origin_and_the_value_to_add(live_server, caplog):
    srv = live_server(socket_app())
    origin = {"Origin": "http://localhost:3000"}
    with caplog.at_level(logging.WARNING, logger="phx_gevent"):
        lp = http.get(srv.http + "/socket/longpoll?vsn=2.0.0&user=a", headers=origin)
        upgrade = {**origin, "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"}
        ws = http.get(srv.http + "/socket/websocket?vsn=2.0.0&user=a", headers={**upgrade, "Sec-WebSocket-Key": "x"})
    assert lp.json() == {"status": 403}
    assert ws.status == 403
    messages = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(messages) == 2, messages
    for message, what in zip(messages, ("long-poll request", "WebSocket connection"), strict=True):
        assert message.startswith(f"phx_gevent: refused a {what} to /socket from origin 'http://localhost:3000'")
        assert "endpoint.socket('/socket', ..., check_origin=['http://localhost:3000'])" in message


def test_a_refused_connect_is_logged_at_the_mounts_level_with_the_handlers_name(live_server, caplog):
    srv = live_server(socket_app(log="warning"))
    with caplog.at_level(logging.DEBUG, logger="phx_gevent"):
        assert http.get(srv.http + "/socket/longpoll?vsn=2.0.0").json() == {"status": 403}
    [record] = [r for r in caplog.records if "REFUSED" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("REFUSED CONNECTION TO NamedSocket in ")
    assert "(path /socket, transport longpoll, params: vsn): " in record.getMessage()
    assert "NamedSocket.connect returned None" in record.getMessage()


def test_a_misspelled_socket_path_gets_a_404_that_lists_the_socket_urls(live_server, caplog):
    srv = live_server(socket_app())
    with caplog.at_level(logging.WARNING, logger="phx_gevent"):
        for path in ("/sockets/websocket", "/socket/websockets", "/socket/websocket/websocket"):
            resp = http.get(srv.http + path + "?vsn=2.0.0")
            assert resp.status == 404
            assert (
                f"no socket at {path}. Mounted socket URLs: /socket/websocket, /socket/longpoll".encode() in resp.body
            )
        http.get(srv.http + "/sockets/websocket")  # again: logged once per path
    assert len([r for r in caplog.records if "no socket at" in r.getMessage()]) == 3
    # Other paths keep Flask's 404, and an app's own 404 handler is left alone.
    assert b"no socket" not in http.get(srv.http + "/elsewhere").body
    app = Flask(__name__)
    app.register_error_handler(404, lambda exc: ("mine", 404))
    Endpoint(app).socket("/socket", NamedSocket)
    assert http.get(live_server(app).http + "/sockets/websocket").body == b"mine"


def test_a_websocket_served_by_another_server_gets_a_500_that_names_the_fix(caplog):
    # Flask's test client stands for `flask run` or any WSGI server without phx_gevent's handler.
    client = socket_app().test_client()
    with caplog.at_level(logging.ERROR, logger="phx_gevent"):
        resp = client.get(
            "/socket/websocket?vsn=2.0.0&user=a", headers={"Upgrade": "websocket", "Connection": "Upgrade"}
        )
    assert resp.status_code == 500
    assert b"phx_gevent.serve(app)" in resp.data and b"flask phx run" in resp.data
    assert b"phx_gevent.worker.GeventWebSocketWorker" in resp.data
    assert any("served without phx_gevent's WSGI handler" in r.getMessage() for r in caplog.records)
