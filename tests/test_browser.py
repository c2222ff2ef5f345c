"""The example page in a real browser (headless Chromium over the DevTools protocol).

phoenix.js is loaded from the npm package by the page itself, the browser sends
an ``Origin`` header (so the default origin check is exercised), and the chat
log is read back from the DOM until it shows what we expect.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
import websocket  # websocket-client

from tests import httpclient as http
from tests.conftest import CI

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self) -> None:
        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={self.profile.name}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        port = self._devtools_port()
        pages = http.get(f"http://127.0.0.1:{port}/json/list").json()
        target = next(p for p in pages if p["type"] == "page")
        self.ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=10, suppress_origin=True)
        self.ids = itertools.count(1)

    def _devtools_port(self) -> int:
        assert self.proc.stderr is not None
        with gevent.Timeout(30, AssertionError("chromium did not start")):
            for line in self.proc.stderr:
                match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
                if match:
                    return int(match.group(1))
        raise AssertionError("chromium exited before listening")

    def call(self, method: str, **params: Any) -> Any:
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == call_id:
                assert "error" not in msg, msg
                return msg.get("result")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self, selector: str) -> str:
        expr = f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''"
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value", "")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, pred: Any, timeout: float = 15.0) -> Any:
        """Poll a JavaScript expression until ``pred(value)``; AssertionError after ``timeout``."""
        value = None
        with gevent.Timeout(timeout, False):
            while True:
                value = self.evaluate(expression)
                if pred(value):
                    return value
                gevent.sleep(0.05)
        raise AssertionError(f"{expression} never matched; it is {value!r}")

    def screenshot(self, path: str) -> None:
        """Save the page as a PNG (to look at what a user sees)."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def wait_text(self, selector: str, pred: Any, timeout: float = 15.0) -> str:
        """Poll the element's text until ``pred(text)``; AssertionError after ``timeout``."""
        text = ""
        with gevent.Timeout(timeout, False):
            while True:
                text = self.text(selector)
                if pred(text):
                    return text
                gevent.sleep(0.05)
        raise AssertionError(f"{selector} never matched; it shows {text!r}")

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            # Chromium's helper processes share its session: stop them all.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
            self.profile.cleanup()


@pytest.fixture
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        if CI:
            pytest.fail("chromium is required under CI (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    b = Browser()
    yield b
    b.close()


@pytest.mark.parametrize("transport", ["websocket", "longpoll"])
def test_the_example_page_joins_sends_and_shows_messages(example, browser, js, transport):
    longpoll = "&longpoll=1" if transport == "longpoll" else ""
    browser.goto(example.http + f"/?user=alice&room=lobby&send=hello{longpoll}")
    text = browser.wait_text("#log", lambda t: "alice: hello" in t)
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[0] == "joined room:lobby"
    assert lines[1] == f"welcome alice (served by {example.endpoint.node_name})"
    # The page's phoenix.js Presence lists who is online; a second user shows up there.
    browser.wait_text("#online", lambda t: t == "online: alice")
    sid = js.open_socket(example.ws + "/socket", {"user": "bob"})
    cid = js.channel(sid, "room:lobby", {"presence": True})
    assert js.join(cid)["status"] == "ok"
    browser.wait_text("#online", lambda t: t in ("online: alice, bob", "online: bob, alice"))
    # The state line: the transport in use and the connection's state, live.
    name = "long-poll" if transport == "longpoll" else "WebSocket"
    assert browser.text("#status") == f"transport: {name} · connection: open"
    assert browser.evaluate("document.querySelector('#status').dataset.history") == "connecting open"
    # A second connection of alice (another tab) lists her twice, and the page says why.
    other = js.open_socket(example.ws + "/socket", {"user": "alice"})
    assert js.join(js.channel(other, "room:lobby", {"presence": True}))["status"] == "ok"
    browser.wait_text("#online", lambda t: "alice (2)" in t)
    note = browser.text("#online-note")
    assert note.startswith("alice (2): 2 connections. Another tab, or a closed long-poll tab")
    if os.environ.get("PHX_SCREENSHOTS"):
        browser.screenshot(os.path.join(os.environ["PHX_SCREENSHOTS"], f"example-{transport}.png"))
    # The server drops alice's connections (POST /disconnect): the page shows it reconnecting, then open.
    assert http.post(example.http + "/disconnect", {"user": "alice"}).status == 204
    history = browser.wait_for(
        "document.querySelector('#status').dataset.history", lambda h: h.startswith("connecting open reconnecting")
    )
    browser.wait_text("#status", lambda t: t == f"transport: {name} · connection: open")
    assert history.split()[:3] == ["connecting", "open", "reconnecting"]


def test_a_refused_join_is_shown(example, browser):
    browser.goto(example.http + "/?user=alice&room=secret")
    browser.wait_text("#log", lambda t: "join refused: unauthorized" in t)


@pytest.mark.parametrize("transport", ["websocket", "longpoll"])
def test_the_page_sends_its_signed_token_and_a_blocked_user_is_refused(example, browser, transport):
    example.app.config["SECRET_KEY"] = "browser-test-secret-key-0123456789"
    longpoll = "&longpoll=1" if transport == "longpoll" else ""
    browser.goto(example.http + f"/?user=tina&room=lobby{longpoll}")
    browser.wait_text("#log", lambda t: "joined room:lobby" in t)
    # The page handed phoenix.js its token (authToken); connect verified it and assigned it.
    conns = example.endpoint.mounts[0].connections
    assert [c.socket.assigns.get("page") for c in conns if c.socket.assigns["user"] == "tina"] == ["index"]
    browser.goto(example.http + f"/?user=blocked_tina&room=lobby{longpoll}")
    browser.wait_text("#log", lambda t: "connection error" in t)
    assert "joined" not in browser.text("#log")
