"""The example page in a real browser (headless Chromium): phoenix.js from npm, same-origin check, chat."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

import pytest

from tests.conftest import CI

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render(url: str) -> str:
    """Load ``url`` headless, let its scripts run, return the DOM."""
    if CHROMIUM is None:
        if CI:
            pytest.fail("chromium is required under CI (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", url],
            capture_output=True, text=True, timeout=60,
        )
    return out.stdout


def chat_log(dom: str) -> list[str]:
    match = re.search(r'<div id="log">(.*?)</div>', dom, re.S)
    assert match, dom[-2000:]
    return re.findall(r"<p[^>]*>(.*?)</p>", match.group(1))


def test_the_example_page_joins_sends_and_shows_messages(example):
    lines = chat_log(render(example.http + "/?user=alice&room=lobby&send=hello"))
    assert lines[0] == "joined room:lobby"
    assert lines[1] == f"welcome alice (served by {example.endpoint.node_name})"
    assert "alice: hello" in lines


def test_a_refused_join_is_shown(example):
    lines = chat_log(render(example.http + "/?user=alice&room=secret"))
    assert "join refused: unauthorized" in lines
