"""How the servers set up their process: the garbage collector (phx_gevent.collector) and the listen backlog.

``tune_collector`` changes process-wide state (``gc.freeze``, thresholds), so
it is exercised in child processes, never in the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from phx_gevent.collector import DEFAULT_THRESHOLD, check_threshold, describe, threshold_from_env
from phx_gevent.options import ConfigurationError
from tests.servers import ROOT, gunicorn  # noqa: F401  (a fixture)


def test_the_environment_variable_is_read_and_checked():
    assert threshold_from_env({}) == DEFAULT_THRESHOLD == 10_000
    assert threshold_from_env({"PHX_GC_THRESHOLD": " "}) == DEFAULT_THRESHOLD
    assert threshold_from_env({"PHX_GC_THRESHOLD": "50000"}) == 50_000
    for off in ("off", "OFF", "none"):
        assert threshold_from_env({"PHX_GC_THRESHOLD": off}) is None
    with pytest.raises(ConfigurationError, match="PHX_GC_THRESHOLD='10k' must be a whole number"):
        threshold_from_env({"PHX_GC_THRESHOLD": "10k"})
    with pytest.raises(ConfigurationError, match="PHX_GC_THRESHOLD must be None or an int from 100"):
        threshold_from_env({"PHX_GC_THRESHOLD": "5"})


@pytest.mark.parametrize("value", [0, 99, 10_000_001, 1.5, "700", True])
def test_implausible_thresholds_are_refused(value):
    with pytest.raises(ConfigurationError, match="gc_threshold must be None or an int"):
        check_threshold(value)


PROBE = """
import gc, json, sys
from phx_gevent.collector import tune_collector
before = gc.get_threshold()
frozen = tune_collector(*(json.loads(sys.argv[1])))
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": frozen,
                  "count": gc.get_freeze_count()}))
"""


def probe(*args: object) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(args))], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_tune_collector_freezes_start_up_and_raises_the_first_threshold_only():
    seen = probe(25_000)
    assert seen["before"][0] == 700  # Python's default, untouched until then
    assert seen["after"] == [25_000, seen["before"][1], seen["before"][2]]
    assert seen["frozen"] == seen["count"] > 1000  # modules, classes, functions of start-up
    assert describe(25_000, seen["frozen"]) == f"gc threshold 25000, {seen['frozen']} objects frozen"


def test_none_leaves_the_collector_as_python_set_it():
    seen = probe(None)
    assert seen["after"] == seen["before"] and seen["frozen"] is None and seen["count"] == 0
    assert describe(None, None) == "gc as Python set it"


def test_the_gunicorn_worker_tunes_it_and_says_so(gunicorn):  # noqa: F811
    server = gunicorn(workers=1, env={"PHX_GC_THRESHOLD": "20000"})
    line = server.log.wait(r"phx_gevent: worker \d+ ready \(node [^,]+, gc threshold 20000, (\d+) objects frozen\)")
    assert int(line[0].group(1)) > 1000
    off = gunicorn(workers=1, env={"PHX_GC_THRESHOLD": "off"})
    assert off.log.wait(r"phx_gevent: worker \d+ ready \(node [^,]+, gc as Python set it\)")


def test_a_bad_value_stops_the_workers_boot_with_the_reason(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-k", "phx_gevent.worker.GeventWebSocketWorker", "-w", "1",
         "-b", "127.0.0.1:0", "--no-control-socket", "app_example:app"],
        env={**os.environ, "PHX_GC_THRESHOLD": "lots"},
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "PHX_GC_THRESHOLD='lots' must be a whole number" in proc.stdout + proc.stderr


def test_serve_tunes_the_collector_before_serving(monkeypatch):
    from flask import Flask

    from phx_gevent import server as server_module

    calls: list[object] = []
    monkeypatch.setattr(server_module, "tune_collector", lambda threshold: calls.append(("tune", threshold)))
    monkeypatch.setattr(server_module.Server, "serve_forever", lambda self, stop_timeout=None: calls.append("serve"))
    server_module.serve(Flask("gc_serve"), "127.0.0.1", 0)
    server_module.serve(Flask("gc_serve_off"), "127.0.0.1", 0, gc_threshold=None)
    assert calls == [("tune", DEFAULT_THRESHOLD), "serve", ("tune", None), "serve"]
    with pytest.raises(ConfigurationError):
        server_module.serve(Flask("gc_serve_bad"), "127.0.0.1", 0, gc_threshold=5)


def test_make_server_listens_with_gunicorns_backlog_not_gevents():
    from flask import Flask

    from phx_gevent import make_server
    from phx_gevent.server import DEFAULT_BACKLOG

    server = make_server(Flask("backlog"), "127.0.0.1", 0)
    try:
        assert server.backlog == DEFAULT_BACKLOG == 2048
    finally:
        server.close()
    small = make_server(Flask("backlog_small"), "127.0.0.1", 0, backlog=64)
    try:
        assert small.backlog == 64
    finally:
        small.close()
