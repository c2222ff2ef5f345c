"""The README's install line, as a new user runs it: a fresh virtualenv, ``pip install '.[redis,gunicorn]'``.

Nothing from the project's own ``.venv`` leaks in: the checkout is copied
(so the build leaves nothing behind), installed into a new virtualenv with
only the documented line (pip's cache and the configured index make it take
seconds, not minutes), and the documented gunicorn command is started from
that virtualenv with Redis. A phoenix.js client then joins and chats through
it. Selected with ``-m install``; CI runs it (``make test``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from tests import httpclient as http
from tests.servers import ROOT, Gunicorn, redis_server  # noqa: F401

pytestmark = pytest.mark.install

#: The quickstart's gunicorn command in the README.
DOCUMENTED = re.compile(r"gunicorn -k phx_gevent\.worker\.GeventWebSocketWorker [^\n`]*quickstart:app")

# What a checkout has that the install does not need (or must not see: our own virtualenv).
_SKIP = shutil.ignore_patterns(".venv", "node_modules", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache")


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (
        f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkout copy, fresh virtualenv) after the README's install line; built once per run."""
    base = tmp_path_factory.mktemp("install")
    checkout = base / "phx_gevent"
    shutil.copytree(ROOT, checkout, ignore=_SKIP)
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    # The documented line, nothing else (no requirements.txt, no --no-deps).
    _run([str(env_dir / "bin" / "pip"), "install", "-q", ".[redis,gunicorn]"], checkout, timeout=600)
    return checkout, env_dir


def test_the_install_is_a_real_package_with_type_information(installed):
    checkout, env_dir = installed
    code = (
        "import phx_gevent, pathlib; p = pathlib.Path(phx_gevent.__file__).parent; "
        "print(p); print((p / 'py.typed').exists())"
    )
    out = _run([str(env_dir / "bin" / "python"), "-c", code], env_dir, timeout=60)
    where, typed = out.stdout.split()
    assert Path(where).is_relative_to(env_dir), f"imported from {where}, not from the new virtualenv"
    assert typed == "True"
    # The worker class gunicorn loads by name (it needs gunicorn's gevent extra: `packaging`).
    _run([str(env_dir / "bin" / "python"), "-c", "import phx_gevent.worker, redis"], env_dir, timeout=60)


def test_the_documented_gunicorn_command_serves_phoenix_js(installed, redis_server, js):  # noqa: F811
    checkout, env_dir = installed
    # The quickstart serves phoenix.js from node_modules: give the copy the project's.
    os.symlink(ROOT / "node_modules", checkout / "node_modules")
    # The README's command, as written, with the new virtualenv's gunicorn; only the address (port 0)
    # and the logs (to read the port and the workers back) are added.
    documented = shlex.split(DOCUMENTED.search((ROOT / "README.md").read_text()).group(0))
    assert documented[0] == "gunicorn" and documented[-1] == "quickstart:app", documented
    workers = int(documented[documented.index("-w") + 1])
    server = Gunicorn(workers=workers, env={"REDIS_URL": redis_server.url}, cwd=checkout)
    server.cmd = [
        str(env_dir / "bin" / "gunicorn"),
        *documented[1:-1],
        *("-b", "127.0.0.1:0", "--no-control-socket", "--access-logfile", "-", "--error-logfile", "-"),
        documented[-1],
    ]
    try:
        server.start(timeout=60)
        assert len(set(server.ready_pids())) == workers == 2
        page = http.get(server.http + "/")
        assert page.status == 200 and b'from "/phoenix.mjs"' in page.body
        asset = http.get(server.http + "/phoenix.mjs")
        assert asset.status == 200 and asset.headers["content-type"].startswith("text/javascript")
        clients = [js.join_room(server.ws + "/socket", user, "room:lobby") for user in ("ann", "bob", "cat", "dan")]
        since = js.mark()
        assert js.push(clients[0][1], "new_msg", {"body": "installed"})["status"] == "ok"
        for _, cid in clients:
            js.wait(
                ev="chan", channel=cid, event="new_msg", since=since, pred=lambda e: e["payload"]["body"] == "installed"
            )
    finally:
        server.stop(timeout=15)
        server.kill()
