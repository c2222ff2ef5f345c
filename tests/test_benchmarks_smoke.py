"""Smoke test of the benchmark suite (benchmarks/): tiny sizes, phx_gevent and the raw reference only.

It runs the real runner and load generator end to end so the scripts do not
rot. Nothing here is timed: it checks that every workload completes and
that every accepted broadcast reached every subscriber. Needs Node (the
``ws`` package of the project's node_modules), not the peers of
benchmarks/requirements.txt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CI
from tests.jsclient import node_available

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"


@pytest.fixture(autouse=True)
def need_node() -> None:
    reason = node_available()
    if reason is not None:
        if CI:
            pytest.fail(f"the benchmark smoke test cannot run under CI: {reason}")
        pytest.skip(reason)


def run(tmp_path: Path, *args: str) -> dict[str, list[dict[str, Any]]]:
    """Run ``benchmarks/run.py`` with ``args``; the per-contender results it saved."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(RUN), *args, "--reps", "1", "--no-pin", "--max-wait", "0", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((out / "raw").glob("*.json"))
    assert len(files) == 1, proc.stderr[-3000:]
    saved = json.loads(files[0].read_text())
    assert list(out.glob("*.md")), "the Markdown summary was not written"
    return saved["results"]


def test_fanout_runs_and_every_accepted_broadcast_is_delivered(tmp_path: Path) -> None:
    results = run(
        tmp_path,
        "fanout",
        "--subs",
        "20",
        "--servers",
        "phx,raw",
        "--lat-seconds",
        "1",
        "--sat-seconds",
        "1",
        "--warm-seconds",
        "0.3",
        "--drain-seconds",
        "15",
        "--concurrency",
        "4",
    )
    assert set(results) == {"phx", "raw"}
    for label, (result,) in results.items():
        assert "error" not in result, (label, result)
        assert result["open"]["opened"] == 20
        lat = result["latency"]
        assert lat["complete"] and lat["accepted"] > 0 and lat["ms"]["n"] > 0, (label, lat)
        sat = result["saturation"]
        assert sat["accepted"] > 0 and sat["complete"] and sat["missing"] == 0, (label, sat)
        assert result["closes"] == 0 and result["errors"] == 0, (label, result)


def test_pushreply_runs(tmp_path: Path) -> None:
    results = run(
        tmp_path, "pushreply", "--clients", "10", "--servers", "phx", "--seconds", "1", "--warm-seconds", "0.3"
    )
    (result,) = results["phx"]
    assert "error" not in result, result
    assert result["repliesPerSec"] > 0 and result["failures"] == 0 and result["closes"] == 0, result


def test_conns_measures_memory_per_connection(tmp_path: Path) -> None:
    results = run(tmp_path, "conns", "--conns", "50", "--servers", "phx,raw", "--settle-seconds", "0.3")
    for label, (result,) in results.items():
        assert "error" not in result, (label, result)
        assert result["open"]["opened"] == 50, (label, result)
        assert result["rssJoinedKb"] > 0 and "kbPerConnJoined" in result, (label, result)


def test_storm_runs_against_phx_and_the_node_ws_peer(tmp_path: Path) -> None:
    results = run(tmp_path, "storm", "--clients", "60", "--base", "10", "--hb-ms", "200", "--servers", "phx,node")
    for label, (result,) in results.items():
        assert "error" not in result, (label, result)
        assert result["joined"] == 60 and result["failed"] == 0, (label, result)
        assert result["joinMs"]["n"] == 60 and result["hbRttMs"]["n"] > 0, (label, result)


def test_longpoll_fanout_runs_and_every_accepted_broadcast_is_delivered(tmp_path: Path) -> None:
    results = run(
        tmp_path,
        "fanout",
        "--longpoll",
        "--subs",
        "10",
        "--servers",
        "phx",
        "--lat-seconds",
        "1",
        "--sat-seconds",
        "1",
        "--warm-seconds",
        "0.3",
        "--drain-seconds",
        "10",
        "--concurrency",
        "2",
    )
    (result,) = results["phx"]
    assert "error" not in result, result
    assert result["open"]["opened"] == 10 and result["closes"] == 0, result
    lat, sat = result["latency"], result["saturation"]
    assert lat["complete"] and lat["ms"]["n"] > 0, lat
    assert sat["accepted"] > 0 and sat["complete"] and sat["missing"] == 0, sat
