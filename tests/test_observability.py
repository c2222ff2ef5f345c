"""Metrics, health and the dashboard: in-process, then under ``gunicorn -w 2`` with Redis and phoenix.js clients.

The dashboard test drives headless Chromium (tests/test_browser.py) against
the example app and compares what the page shows with the clients the test
opened on each worker. It takes screenshots into the test's temporary
directory, or into ``$PHX_SCREENSHOTS`` when set (``PHX_SCREENSHOTS=docs/img``
refreshes the ones docs/observability.md shows).
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import gevent
import pytest
from flask import Flask

from phx_gevent import Endpoint
from tests import httpclient as http
from tests.rawws import RawWS
from tests.servers import ROOT, Gunicorn, RedisServer, gunicorn, redis_server, wait_until  # noqa: F401
from tests.test_browser import Browser, browser  # noqa: F401
from tests.test_gunicorn import ACCESS, FAST, pid_of, spread
from tests.test_telemetry import UserSocket

TOKEN = "s3cret-token"

prom_parser = pytest.importorskip("prometheus_client.parser")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of one scrape."""
    resp = http.get(url)
    assert resp.status == 200, resp
    out = {}
    for family in prom_parser.text_string_to_metric_families(resp.body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# -- in-process ------------------------------------------------------------------------------


def test_health_and_readiness_follow_draining_and_redis(live_server, redis_server):  # noqa: F811
    app = Flask(__name__)
    endpoint = Endpoint(app, pubsub=redis_server.url, pubsub_prefix="ready")
    endpoint.socket("/socket", UserSocket, log=False)
    endpoint.health()
    srv = live_server(app)
    try:
        assert http.get(srv.http + "/phx/health").json() == {"status": "ok", "node": endpoint.node_name}
        wait_until(lambda: http.get(srv.http + "/phx/ready").status == 200, 10, "ready")
        assert http.get(srv.http + "/phx/ready").json()["pubsub"] is True
        redis_server.kill()
        wait_until(lambda: http.get(srv.http + "/phx/ready").status == 503, 15, "not ready without Redis")
        assert http.get(srv.http + "/phx/ready").json()["pubsub"] is False
        assert http.get(srv.http + "/phx/health").status == 200  # alive all the same
        redis_server.start()
        wait_until(lambda: http.get(srv.http + "/phx/ready").status == 200, 20, "ready again")
        endpoint.draining = True
        body = http.get(srv.http + "/phx/ready")
        assert body.status == 503 and body.json()["draining"] is True
    finally:
        endpoint.pubsub.stop()


def test_metrics_auth_and_figures_in_one_process(live_server):
    app = Flask(__name__)
    endpoint = Endpoint(app)
    endpoint.socket("/socket", UserSocket, log=False)
    endpoint.metrics("/metrics", auth=lambda req: req.args.get("token") == TOKEN)
    srv = live_server(app)
    assert http.get(srv.http + "/metrics").status == 403
    ws = RawWS(srv.port, "/socket/websocket?vsn=2.0.0&user=m1")
    ws.send_json(["1", "1", "room:m", "phx_join", {}])
    ws.recv_until(lambda m: m[1] == "1")
    samples = scrape(srv.http + f"/metrics?token={TOKEN}")
    assert value(samples, "phx_connections", mount="/socket", transport="websocket") == 1
    assert value(samples, "phx_channels", route="room:*") == 1
    assert value(samples, "phx_pubsub_connected") == 1
    ws.close()


def test_the_snapshot_lists_the_connections_with_most_channels(monkeypatch):
    """Of the first 4 x MAX_CONNECTIONS connections, the MAX_CONNECTIONS with most channels (ties: the first seen)."""
    from phx_gevent import observe
    from phx_gevent.testing import ChannelTest

    monkeypatch.setattr(observe, "MAX_CONNECTIONS", 3)
    app = Flask(__name__)
    endpoint = Endpoint(app)
    mount = endpoint.socket("/socket", UserSocket, log=False)
    endpoint.dashboard("/phx/dashboard", auth=lambda req: "test")  # its list is what gossip sends
    channel_test = ChannelTest(endpoint, "/socket")
    with app.test_request_context("/"):
        for i, n in enumerate([1, 0, 2, 2, 1, 3, 0, 2, 1, 1, 2, 2, 3, 3]):
            client = channel_test.connect({"user": f"u{i}"})
            for k in range(n):
                assert client.join(f"room:{k}").joined
    snapshot = endpoint.observer.snapshot()

    seen = list(mount.connections)[:12]  # the order the sampler walks them in
    ranked = sorted(range(len(seen)), key=lambda i: -len(seen[i].channels))[:3]  # sorted() is stable
    expected = [
        {
            "key": f"{id(seen[i]):x}",
            "id": seen[i].socket.id,
            "mount": "/socket",
            "transport": "memory",  # ChannelTest's in-memory transport
            "topics": list(seen[i].channels),
            "queued": 0,
        }
        for i in ranked
    ]
    assert snapshot["conns"] == expected
    assert snapshot["connections"] == 14
    assert snapshot["channels"] == {"room:*": 23}


def test_the_dashboard_refuses_without_auth(live_server):
    app = Flask(__name__)
    endpoint = Endpoint(app)
    endpoint.dashboard("/phx/dashboard", auth=None)
    srv = live_server(app)
    assert http.get(srv.http + "/phx/dashboard").status == 403
    assert http.get(srv.http + "/phx/dashboard/data.json").status == 403
    assert RawWS(srv.port, "/phx/dashboard/socket/websocket?vsn=2.0.0").status == 403
    assert http.get(srv.http + "/phx/dashboard/socket/longpoll?vsn=2.0.0").json()["status"] == 403


# -- under gunicorn ----------------------------------------------------------------------------


def start(gunicorn: Any, redis: RedisServer, tmp_path: Path) -> Gunicorn:  # noqa: F811
    prom = tmp_path / "prom"
    prom.mkdir()
    env = {"REDIS_URL": redis.url, "PROMETHEUS_MULTIPROC_DIR": str(prom), "DASHBOARD_TOKEN": TOKEN}
    return gunicorn(workers=2, env=env, args=ACCESS)


def test_metrics_add_up_every_worker_under_gunicorn(gunicorn, redis_server, js, tmp_path):  # noqa: F811
    server = start(gunicorn, redis_server, tmp_path)
    assert http.get(server.http + "/metrics").status == 403
    clients = spread(js, server, "room:metrics")
    n = len(clients)
    for c in clients:
        assert js.push(c.cid, "ping", {"x": 1})["status"] == "ok"
    url = server.http + f"/metrics?token={TOKEN}"

    def complete() -> dict[Any, float] | None:
        s = scrape(url)
        ok = (
            value(s, "phx_connections", mount="/socket", transport="websocket") == n
            and value(s, "phx_channels", route="room:*") == n
            and value(s, "phx_pubsub_connected") == 1
        )
        return s if ok else None

    samples = wait_until(complete, 15, f"gauges summed over both workers ({n} clients)")
    assert value(samples, "phx_socket_connects_total", transport="websocket", result="ok") == n
    assert value(samples, "phx_channel_joins_total", route="room:*", result="ok") == n
    assert value(samples, "phx_channel_handle_in_seconds_count", channel="RoomChannel") == n
    before = value(samples, "phx_deliveries_total")
    status = http.post(server.http + "/broadcast", {"topic": "room:metrics", "event": "new_msg", "payload": {}}).status
    assert status == 204
    for c in clients:
        c.wait("new_msg", 0)
    # A worker counts its deliveries just after writing them: a client can read
    # the frame a moment before its worker's counter moves, so wait for the sum.
    wait_until(
        lambda: value(scrape(url), "phx_deliveries_total") - before == n, 10, "the deliveries counted on both workers"
    )
    # Each worker counted the deliveries to its own clients; a scrape on either adds them up.
    served: set[int] = set()
    deadline = time.monotonic() + 20
    while served != {c.pid for c in clients} and time.monotonic() < deadline:
        # A few at a time, so that the requests race for both workers' accept().
        mark = server.log.mark()
        jobs = [gevent.spawn(scrape, url) for _ in range(4)]
        gevent.joinall(jobs, timeout=10, raise_error=True)
        for job in jobs:
            assert value(job.value, "phx_deliveries_total") - before == n
        wait_until(lambda m=mark: len(server.log.find(r'"GET /metrics', m)) >= 4, 5, "the access log lines")
        served |= log_pids(server, "/metrics", mark)
    assert served == {c.pid for c in clients}, "both workers answered a scrape"
    assert http.get(server.http + "/phx/ready").status == 200


def log_pids(server: Gunicorn, path: str, since: int = 0) -> set[int]:
    """Pids of the workers whose access log shows a GET of ``path`` from line ``since``."""
    assert server.log is not None
    return {int(m.group(1)) for m in server.log.find(rf'<(\d+)> "GET {path}\S* ', since)}


def element_text(b: Browser, js_expr: str) -> Any:
    return b.call("Runtime.evaluate", expression=js_expr, returnByValue=True)["result"].get("value")


def node_figures(b: Browser) -> dict[int, dict[str, Any]]:
    """Per worker pid, what the page shows: connections of /socket, room:dash subscribers."""
    expr = """JSON.stringify([...document.querySelectorAll('section.node')].map((s) => ({
        node: s.dataset.node,
        ws: (s.querySelector('tr[data-mount="/socket"] [data-field="websocket"]') || {}).textContent,
        topic: (s.querySelector('tr[data-topic="room:dash"] td.n') || {}).textContent,
        pubsub: (s.querySelector('[data-field="pubsub"]') || {}).textContent,
    })))"""
    out = {}
    for item in json.loads(element_text(b, expr) or "[]"):
        out[pid_of(item["node"])] = item
    return out


def presence_shown(b: Browser) -> str | None:
    return element_text(
        b, "(document.querySelector('#presence tr[data-topic=\"room:dash\"] [data-field=present]') || {}).textContent"
    )


def screenshot(b: Browser, directory: Path, name: str) -> Path:
    target = Path(os.environ.get("PHX_SCREENSHOTS") or directory)
    target = target if target.is_absolute() else ROOT / target
    target.mkdir(parents=True, exist_ok=True)
    data = b.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
    path = target / name
    path.write_bytes(base64.b64decode(data))
    return path


def test_the_dashboard_shows_both_workers_live_and_disconnects(gunicorn, redis_server, js, browser, tmp_path):  # noqa: F811
    server = start(gunicorn, redis_server, tmp_path)
    # Refused without the token: the page, its data, and its socket on both transports.
    assert http.get(server.http + "/phx/dashboard").status == 403
    assert http.get(server.http + "/phx/dashboard/data.json?token=wrong").status == 403
    assert RawWS(server.port, "/phx/dashboard/socket/websocket?vsn=2.0.0").status == 403
    assert http.get(server.http + "/phx/dashboard/socket/longpoll?vsn=2.0.0").json()["status"] == 403

    clients = spread(js, server, "room:dash", presence=True)
    per_pid = {pid: sum(1 for c in clients if c.pid == pid) for pid in {c.pid for c in clients}}
    assert len(per_pid) == 2
    browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
    browser.goto(server.http + f"/phx/dashboard?token={TOKEN}")

    def shows(expected: dict[int, int], present: int) -> bool:
        figures = node_figures(browser)
        return (
            set(figures) == set(expected)
            and all(figures[p]["ws"] == str(k) and figures[p]["topic"] == str(k) for p, k in expected.items())
            and all("connected" in (figures[p]["pubsub"] or "") for p in expected)
            and presence_shown(browser) == str(present)
        )

    wait_until(lambda: shows(per_pid, len(clients)), 20, f"the page to show {per_pid} and {len(clients)} present")
    assert browser.text("#status") == "live"
    # Live: one more client appears on its worker's card and in presence, without reloading.
    since = js.mark()
    sid = js.socket(server.ws + "/socket", {"user": "late-user"}, **FAST)
    cid = js.channel(sid, "room:dash", {"presence": True})
    assert js.join(cid)["status"] == "ok"
    late_pid = pid_of(js.wait(ev="chan", channel=cid, event="welcome", since=since)["payload"]["node"])
    per_pid[late_pid] += 1
    wait_until(lambda: shows(per_pid, len(clients) + 1), 20, "the late client to show up")

    # Broadcasts make the rates move, and the charts draw them: a few seconds of traffic.
    def traffic() -> None:
        for i in range(10_000):
            http.post(server.http + "/broadcast", {"topic": "room:dash", "event": "new_msg", "payload": {"i": i}})
            gevent.sleep(0.02)

    sender = gevent.spawn(traffic)
    try:
        points = "Object.values((window.phxDashboard || {}).history || {}).map((h) => h.filter((p) => p.d > 0).length)"
        try:
            wait_until(lambda: (element_text(browser, f"Math.min(...{points})") or 0) >= 6, 30, "6 s of rates")
        except AssertionError:
            raise AssertionError(element_text(browser, "JSON.stringify(window.phxDashboard.history)")) from None
        total = element_text(browser, "document.querySelector('[data-total=delivery-rate]').textContent")
        assert float(total.rstrip("k")) > 0
        screenshot(browser, tmp_path, "dashboard.png")
    finally:
        sender.kill()

    # Search narrows the connection list.
    browser.call(
        "Runtime.evaluate",
        expression="const s = document.querySelector('#search'); s.value = 'late-user'; "
        "s.dispatchEvent(new Event('input'))",
    )
    rows = element_text(browser, "document.querySelectorAll('#connections tbody tr').length")
    assert rows == 1
    screenshot(browser, tmp_path, "dashboard-search.png")

    # Disconnect: the client's socket closes (it reconnects by itself), and both nodes audit it.
    mark, since = server.log.mark(), js.mark()
    clicked = element_text(
        browser,
        "(() => { const b = document.querySelector('tr[data-id=\"user_socket:late-user\"] button.disconnect');"
        " if (!b) return false; b.click(); return true; })()",
    )
    assert clicked is True
    close = js.wait(ev="close", socket=sid, since=since, timeout=15)
    assert close["code"] == 1001
    server.log.wait(r"dashboard: .+ asked to disconnect connection", since=mark, timeout=10)
    server.log.wait(r"dashboard: disconnecting <Connection id='user_socket:late-user'", since=mark, timeout=10)
    browser.wait_text("#audit", lambda t: "requested" in t)


def test_unflushed_connects_and_joins_are_written_before_the_worker_marks_itself_dead(monkeypatch):
    # Connects and joins reach their Prometheus counters with each sample; a worker that exits in
    # between must not lose them (in multiprocess mode its counter files outlive it).
    from prometheus_client import multiprocess

    from phx_gevent import metrics as metrics_module

    m = metrics_module.metrics()
    monkeypatch.setattr(metrics_module, "multiprocess_mode", lambda: True)
    marked: list[int] = []
    monkeypatch.setattr(multiprocess, "mark_process_dead", marked.append)
    counter = m._child(m.connects, "websocket", "ok")
    before = counter._value.get()
    for _ in range(3):
        m._on_connected(None, {}, {"transport": "websocket", "result": "ok"})
    assert counter._value.get() == before  # counted, not yet flushed
    metrics_module.mark_process_dead()
    assert counter._value.get() == before + 3
    assert marked == [os.getpid()]
