"""Drive the real phoenix.js client (npm ``phoenix`` in Node, see ``tests/js/driver.mjs``) from tests.

Every event the client sees is recorded in order; tests wait for events
with a predicate and a timeout, never with fixed sleeps.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import gevent
from gevent.event import Event

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "js" / "driver.mjs"


def b64(data: bytes) -> dict[str, str]:
    """A binary payload for the driver."""
    return {"$binary": base64.b64encode(data).decode()}


def unb64(value: dict[str, str]) -> bytes:
    """Bytes back from a driver ``{"$binary": ...}`` value."""
    return base64.b64decode(value["$binary"])


def node_available() -> str | None:
    """Why the Node tests cannot run here, or None when they can."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (ROOT / "node_modules" / "phoenix").exists() or not (ROOT / "node_modules" / "ws").exists():
        return "node_modules missing: run `npm ci` (make test does)"
    return None


def matches(event: dict[str, Any], fields: dict[str, Any]) -> bool:
    """True when every given field of ``event`` equals the expected value."""
    return all(event.get(k) == v for k, v in fields.items())


class JSClient:
    """One Node process running phoenix.js; many sockets and channels inside it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["node", str(DRIVER)],
            cwd=str(ROOT),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "NODE_NO_WARNINGS": "1"},
        )
        self.events: list[dict[str, Any]] = []
        self._changed = Event()
        self._ids = itertools.count(1)
        self.topics: dict[str, str] = {}
        self._reader = gevent.spawn(self._read)
        self._stderr: list[bytes] = []
        self._err_reader = gevent.spawn(self._read_stderr)
        self.wait(ev="ready", timeout=15)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"ev": "garbage", "line": line.decode(errors="replace")})
            self._changed.set()
        self.events.append({"ev": "exited"})
        self._changed.set()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(cmd="exit")
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=5)
        self._err_reader.join(timeout=5)

    # -- low level ---------------------------------------------------------------------------

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def next_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    def find(self, since: int = 0, **fields: Any) -> list[dict[str, Any]]:
        """Recorded events from index ``since`` matching ``fields``."""
        return [e for e in self.events[since:] if matches(e, fields)]

    def wait(self, timeout: float = 10.0, since: int = 0, pred: Any = None, **fields: Any) -> dict[str, Any]:
        """The first event from ``since`` matching ``fields`` (and ``pred``); raises after ``timeout``."""
        with gevent.Timeout(timeout, AssertionError(f"no event matching {fields} within {timeout}s; {self._tail()}")):
            index = since
            while True:
                while index < len(self.events):
                    event = self.events[index]
                    index += 1
                    if event.get("ev") == "driver_error":
                        raise AssertionError(f"driver error: {event}")
                    if matches(event, fields) and (pred is None or pred(event)):
                        return event
                self._changed.clear()
                if index < len(self.events):
                    continue
                self._changed.wait()

    def index_of(self, event: dict[str, Any]) -> int:
        return next(i for i, e in enumerate(self.events) if e is event)

    def mark(self) -> int:
        """The current end of the event log (for ``since=``)."""
        return len(self.events)

    def _tail(self) -> str:
        tail = self.events[-12:]
        err = b"".join(self._stderr[-20:]).decode(errors="replace")
        return f"last events: {json.dumps(tail)[:3000]} stderr: {err[-2000:]}"

    # -- phoenix.js ----------------------------------------------------------------------------

    def socket(self, url: str, params: dict[str, Any] | None = None, connect: bool = True, **opts: Any) -> str:
        sid = self.next_id("s")
        self.send(cmd="socket", id=sid, url=url, params=params or {}, opts=opts, connect=connect)
        return sid

    def open_socket(self, url: str, params: dict[str, Any] | None = None, timeout: float = 10, **opts: Any) -> str:
        since = self.mark()
        sid = self.socket(url, params, **opts)
        self.wait(ev="open", socket=sid, since=since, timeout=timeout)
        return sid

    def channel(self, sid: str, topic: str, params: dict[str, Any] | None = None, track: str | None = None) -> str:
        """A phoenix.js channel; ``track``: rejoin with ``since`` = the ref of the last ``track`` event seen."""
        cid = self.next_id("c")
        self.topics[cid] = topic
        self.send(cmd="channel", id=cid, socket=sid, topic=topic, params=params or {}, track=track)
        return cid

    def _replied(self, cid: str, req: str, timeout: float) -> dict[str, Any]:
        # phoenix.js runs channel callbacks before the socket's onMessage hook, so
        # the "frame" event of a reply follows its "reply" event: wait for both,
        # so that mark() taken afterwards is past everything this reply caused.
        reply = self.wait(ev="reply", req=req, timeout=timeout)
        if reply["status"] != "timeout":
            topic = self.topics[cid]
            self.wait(
                ev="frame",
                since=self.index_of(reply),
                timeout=timeout,
                pred=lambda e: e["msg"]["event"] == "phx_reply" and e["msg"]["topic"] == topic,
            )
        return reply

    def join(self, cid: str, timeout: float = 10, client_timeout: int | None = None) -> dict[str, Any]:
        req = self.next_id("r")
        self.send(cmd="join", channel=cid, req=req, timeout=client_timeout)
        return self._replied(cid, req, timeout)

    def push(
        self, cid: str, event: str, payload: Any = None, timeout: float = 10, client_timeout: int | None = None
    ) -> dict[str, Any]:
        req = self.push_nowait(cid, event, payload, client_timeout)
        return self._replied(cid, req, timeout)

    def push_nowait(self, cid: str, event: str, payload: Any = None, client_timeout: int | None = None) -> str:
        req = self.next_id("r")
        self.send(
            cmd="push",
            channel=cid,
            event=event,
            payload={} if payload is None else payload,
            req=req,
            timeout=client_timeout,
        )
        return req

    def leave(self, cid: str, timeout: float = 10) -> dict[str, Any]:
        req = self.next_id("r")
        self.send(cmd="leave", channel=cid, req=req)
        return self._replied(cid, req, timeout)

    def presence(self, cid: str) -> None:
        """Attach phoenix.js's ``Presence`` to a channel (before its join); each sync is recorded."""
        self.send(cmd="presence", channel=cid)

    def wait_presence(self, cid: str, keys: set[str], since: int = 0, timeout: float = 10) -> dict[str, Any]:
        """The first ``presence_sync`` of ``cid`` whose list holds exactly ``keys``."""
        return self.wait(
            ev="presence_sync",
            channel=cid,
            since=since,
            timeout=timeout,
            pred=lambda e: {p["key"] for p in e["list"]} == keys,
        )

    def join_room(self, url: str, user: str, topic: str, **opts: Any) -> tuple[str, str]:
        """Open a socket as ``user`` and join ``topic``; returns (socket id, channel id)."""
        sid = self.open_socket(url, {"user": user}, **opts)
        cid = self.channel(sid, topic)
        reply = self.join(cid)
        assert reply["status"] == "ok", reply
        return sid, cid
