"""The README and docs/ say what the code does: the quickstart shown is the file that runs, links resolve.

The quickstart file itself is run by tests/test_first_hour.py and installed
from scratch by tests/test_install.py; here we check that the README shows
exactly that file, and that the documented test example passes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.servers import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")

#: Pages other issues' work adds to docs/ (linked from the README before they land).
PENDING = {
    "docs/background-jobs.md",
    "docs/python-client.md",
    "docs/redis-envelope.md",
    "docs/phoenix-parity.md",
    "docs/reliability.md",
    "docs/recovery.md",
    "docs/observability.md",
}


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_the_readme_is_a_front_door():
    assert len(README.encode()) <= 15_500, "README.md is the front door: move reference material to docs/"
    for section in (
        "## Quickstart",
        "## The two commands",
        "## The API in brief",
        "## Deployment in short",
        "## How it compares",
        "## The example app",
        "## Documentation",
    ):
        assert f"\n{section}\n" in README, section
    assert "pip install '.[redis,gunicorn]'" in README
    assert "make example" in README and "make test" in README


def test_the_readme_shows_the_quickstart_and_the_node_client_as_they_are():
    source = (ROOT / "examples" / "quickstart.py").read_text(encoding="utf-8")
    code = source[source.index("from gevent import monkey") :]
    assert code in blocks(README, "python"), "README's quickstart differs from examples/quickstart.py"
    client = (ROOT / "examples" / "client.mjs").read_text(encoding="utf-8")
    assert client in blocks(README, "js"), "README's Node client differs from examples/client.mjs"


def _links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [m for m in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in m and not m.startswith("#")]


@pytest.mark.parametrize(
    "page", ["README.md", "CONTRIBUTING.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))]
)
def test_relative_links_resolve(page):
    path = ROOT / page if (ROOT / page).exists() else ROOT / "docs" / page
    for link in _links(path):
        target = (path.parent / link.split("#", 1)[0]).resolve()
        relative = target.relative_to(ROOT).as_posix()
        assert target.exists() or relative in PENDING, f"{page}: broken link {link}"


def test_the_testing_guide_example_passes():
    # docs/testing.md's example, against the example app instead of "your" app.
    import app_example

    code = blocks((ROOT / "docs" / "testing.md").read_text(encoding="utf-8"), "python")[0]
    code = code.replace("from app import endpoint  # your Endpoint, with its sockets mounted", "")
    namespace = {"endpoint": app_example.create_app()[1]}
    exec(compile(code, "docs/testing.md", "exec"), namespace)
    namespace["test_room"]()
    namespace["test_refusals"]()
