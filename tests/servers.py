"""External servers for tests: a private ``redis-server`` and a gunicorn launcher.

Both run as child processes on 127.0.0.1 with ports chosen at run time (or
a unix socket in a temporary directory); nothing touches a system Redis.
Their output is collected by a greenlet, and tests wait on it with
timeouts, never with fixed sleeps.

Use the fixtures by importing them into a test module::

    from tests.servers import redis_server  # noqa: F401

Without ``redis-server`` the Redis fixtures skip, except under CI
(``CI=true``), where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent.event import Event

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_redis() -> str:
    """The path of ``redis-server``; skips the test without it (fails under CI)."""
    path = shutil.which("redis-server")
    if path is None:
        reason = "redis-server is not installed (apt-get install redis-server); Redis tests need it"
        if CI:
            pytest.fail(f"Redis tests cannot run under CI: {reason}")
        pytest.skip(reason)
    return path


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition", interval: float = 0.01) -> Any:
    """Poll ``pred`` until it returns something truthy; AssertionError after ``timeout`` seconds.

    The one polling helper of the suite: every wait has a deadline, none a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        gevent.sleep(interval)


class Recorder:
    """An in-process listener on one topic of a PubSub node: records (event, payload) in order."""

    def __init__(self, node: Any, topic: str) -> None:
        self.got: list[tuple[str, Any]] = []
        node.connect(self, topic)

    def __call__(self, topic: str, event: str, payload: Any, from_: Any) -> None:
        self.got.append((event, payload))

    def events(self) -> list[str]:
        return [e for e, _ in self.got]

    def wait(self, n: int, timeout: float = 10.0) -> list[tuple[str, Any]]:
        wait_until(lambda: len(self.got) >= n, timeout, f"{n} messages (have {self.events()[-5:]})")
        return self.got


class OutputLog:
    """Collects the lines a child process writes; tests wait for a line matching a regex."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._changed = Event()
        self._reader = gevent.spawn(self._read, stream)

    def _read(self, stream: Any) -> None:
        for raw in stream:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self.lines.append("<EOF>")
        self._changed.set()

    def find(self, pattern: str, since: int = 0) -> list[re.Match[str]]:
        """Every match of ``pattern`` in the lines from index ``since``."""
        rx = re.compile(pattern)
        return [m for line in self.lines[since:] if (m := rx.search(line))]

    def wait(self, pattern: str, timeout: float = 20.0, since: int = 0, count: int = 1) -> list[re.Match[str]]:
        """The first ``count`` matches of ``pattern`` from line ``since``; AssertionError after ``timeout``."""
        rx = re.compile(pattern)
        found: list[re.Match[str]] = []
        index = since
        deadline = time.monotonic() + timeout
        while True:
            while index < len(self.lines):
                m = rx.search(self.lines[index])
                index += 1
                if m:
                    found.append(m)
                    if len(found) >= count:
                        return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = "\n".join(self.lines[-40:])
                raise AssertionError(f"no {count} lines matching {pattern!r} within {timeout}s; output tail:\n{tail}")
            self._changed.clear()
            if index < len(self.lines):
                continue
            self._changed.wait(min(remaining, 1.0))

    def mark(self) -> int:
        return len(self.lines)

    def join(self, timeout: float = 5.0) -> None:
        self._reader.join(timeout=timeout)


class RedisServer:
    """A private ``redis-server`` on a free TCP port of 127.0.0.1 and a unix socket.

    ``kill()`` and ``start()`` again simulate an outage: the restarted
    server listens on the same port and socket path.
    """

    def __init__(self, directory: str | None = None, extra_args: list[str] | tuple[str, ...] = ()) -> None:
        self.binary = require_redis()
        #: More ``redis-server`` arguments (TLS, ACL users, replication, cluster mode).
        self.extra_args = list(extra_args)
        self._own_dir = directory is None
        self.dir = directory or tempfile.mkdtemp(prefix="phx-redis-")
        self.unix_path = os.path.join(self.dir, "redis.sock")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.output: OutputLog | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_path}?db=0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        """Start (or restart on the same port); returns once it answers PING."""
        attempts = 0
        while True:
            attempts += 1
            first = self.port == 0
            if first:
                self.port = free_port()
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--unixsocket", self.unix_path,
                    "--unixsocketperm", "700",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", self.dir,
                    "--daemonize", "no",
                    "--loglevel", "warning",
                    *self.extra_args,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )  # fmt: skip
            self.output = OutputLog(self.proc.stdout)
            try:
                wait_until(self._answers, timeout, f"redis-server on port {self.port}")
                return self
            except AssertionError:
                exited = self.proc.poll() is not None
                self.kill()
                if not (first and exited and attempts < 5):
                    raise
                self.port = 0  # the port was taken meanwhile: pick another

    def _answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited: {self.output and self.output.lines[-10:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str | bytes, timeout: float = 5.0) -> Any:
        """Run one command on a fresh connection (redis-py, decoded replies)."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout, decode_responses=True)
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server (an abrupt outage) and wait for it to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.output is not None:
            self.output.join()

    def close(self) -> None:
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server (TCP ``.url`` and ``.unix_url``), killed after the test."""
    server = RedisServer().start()
    yield server
    server.close()


class Gunicorn:
    """``gunicorn -k phx_gevent.worker.GeventWebSocketWorker`` on 127.0.0.1, port chosen by the OS.

    The real port and the workers' pids are read from gunicorn's log (error
    and access logs both go to :attr:`log`).
    """

    WORKER = "phx_gevent.worker.GeventWebSocketWorker"

    def __init__(
        self,
        app: str = "app_example:app",
        workers: int = 2,
        env: dict[str, str] | None = None,
        args: list[str] | tuple[str, ...] = (),
        graceful_timeout: float = 10,
        cwd: str | Path = ROOT,
    ) -> None:
        self.cwd = str(cwd)
        self.cmd = [
            sys.executable, "-m", "gunicorn",
            "-k", self.WORKER,
            "-w", str(workers),
            "-b", "127.0.0.1:0",
            "--no-control-socket",
            "--access-logfile", "-",
            "--error-logfile", "-",
            "--log-level", "info",
            "--graceful-timeout", str(graceful_timeout),
            "--timeout", "60",
            *args,
            app,
        ]  # fmt: skip
        self.workers = workers
        # REDIS_URL only when the test asks for it: the environment's must not leak in.
        inherited = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        self.env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: OutputLog | None = None
        self.port = 0

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 40.0) -> Gunicorn:
        """Start and wait until every worker logged that it is ready."""
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.log = OutputLog(self.proc.stdout)
        self.port = int(self.log.wait(r"Listening at: http://127\.0\.0\.1:(\d+)", timeout)[0].group(1))
        self.wait_ready(self.workers, timeout=timeout)
        return self

    def wait_ready(self, count: int, since: int = 0, timeout: float = 40.0) -> list[int]:
        """Pids of the first ``count`` workers that logged readiness from line ``since``."""
        assert self.log is not None
        found = self.log.wait(r"phx_gevent: worker (\d+) ready", timeout, since=since, count=count)
        return [int(m.group(1)) for m in found]

    def ready_pids(self) -> list[int]:
        """Every worker pid that ever logged readiness, in order."""
        assert self.log is not None
        return [int(m.group(1)) for m in self.log.find(r"phx_gevent: worker (\d+) ready")]

    def signal_worker(self, pid: int, sig: int) -> None:
        os.kill(pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM gunicorn and wait; SIGKILL the whole group when it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.log is not None:
            self.log.join()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL gunicorn's whole process group (cleanup after a failed test)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        if self.log is not None:
            self.log.join()


@pytest.fixture
def gunicorn() -> Iterator[Callable[..., Gunicorn]]:
    """A factory: ``gunicorn(workers=2, env={...})`` starts one; all are stopped afterwards."""
    started: list[Gunicorn] = []

    def start(**kwargs: Any) -> Gunicorn:
        server = Gunicorn(**kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        try:
            server.stop(timeout=15)
        finally:
            server.kill()
