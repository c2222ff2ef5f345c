"""Smoke test of benchmarks/scale.py (issue 13's many-node benchmark): tiny sizes, nothing timed.

It runs the real script end to end so it does not rot, and checks what the
benchmark exists to show: with the single broadcast channel every node
receives every broadcast of the cluster; with per-topic routing a node
receives exactly the broadcasts of the topics it has subscribers for; in
both, every subscriber got every broadcast of its topics; on a 3-shard Redis
Cluster, every shard carries its share. Needs
redis-server (skips without it, fails under CI) and, for the join
latency, Node (the ``ws`` package of the project's node_modules).
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
from tests.servers import require_redis

ROOT = Path(__file__).resolve().parent.parent
SCALE = ROOT / "benchmarks" / "scale.py"


def run(tmp_path: Path, *args: str) -> Any:
    """Run ``benchmarks/scale.py`` with ``args``; the results it saved (raw JSON)."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(SCALE), *args, "--reps", "1", "--max-wait", "0", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((out / "raw").glob("*.json"))
    assert len(files) == 1, proc.stderr[-3000:]
    assert list(out.glob("*.md")), "the Markdown summary was not written"
    return json.loads(files[0].read_text())["results"]


def test_nodes_receive_what_their_routing_promises(tmp_path: Path) -> None:
    require_redis()
    variants = ["--variant", "broadcast=broadcast@single", "--variant", "topic=topic@single"]
    variants += ["--variant", "cluster=topic@cluster3"]
    args = ["--nodes", "3", "--users", "60", "--shared", "1", "--rate", "150", "--seconds", "1", "--drain", "20"]
    args += ["--idle", "0.5"]
    results = run(tmp_path, "nodes", *args, *variants)
    assert set(results) == {"broadcast", "topic", "cluster"}
    for label, (result,) in results.items():
        assert "error" not in result, (label, result)
        published = result["published"]
        assert published == 150, result
        for node in result["nodes"]:
            # Every broadcast of a node's topics reached its subscriber, once.
            assert node["useful"] == node["expected"] > 0, (label, node)
            assert node["frames"] == node["expected"], (label, node)
            assert node["dropped"] == 0, (label, node)
            if label == "broadcast":
                assert node["received"] == published, (label, node)
            else:
                assert node["received"] == node["expected"] < published, (label, node)
        if label == "cluster":
            # Three shards, each carrying its topics' broadcasts: what the nodes read from each adds up.
            assert len(result["shards"]) == 3
            per_shard = [
                sum(n["per_shard"].get(f"127.0.0.1:{s['port']}", 0) for n in result["nodes"]) for s in result["shards"]
            ]
            assert sum(per_shard) == sum(n["received"] for n in result["nodes"]), per_shard
            assert all(count > 0 for count in per_shard), per_shard
            assert sum(s["commands"].get("spublish", 0) for s in result["shards"]) == published


def test_joins_measures_join_latency_on_gunicorn_and_redis(tmp_path: Path) -> None:
    require_redis()
    reason = node_available()
    if reason is not None:
        if CI:
            pytest.fail(f"the scale smoke test cannot run under CI: {reason}")
        pytest.skip(reason)
    results = run(tmp_path, "joins", "--routings", "broadcast,topic", "--clients", "40", "--trickle", "10")
    assert set(results) == {"broadcast", "topic"}
    for routing, (result,) in results.items():
        assert "error" not in result, (routing, result)
        for phase, n in (("storm", 40), ("trickle", 10)):
            assert result[phase]["joined"] == n and result[phase]["failed"] == 0, (routing, phase, result[phase])
            assert result[phase]["joinOnlyMs"]["n"] == n, (routing, phase, result[phase])
