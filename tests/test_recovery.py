"""Recovery on rejoin, end to end in one process, with the real phoenix.js client and the example app.

The example's ``room:*`` keeps its last 100 ``new_msg`` for 300 s
(docs/recovery.md). The contract checked here: a join without ``since`` is
answered and served exactly as before; ``since`` (null or an offset) gives
``recovered`` in the reply, offsets in the ref of ``new_msg`` frames, and
the missed messages in order, each once, before newer ones.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import gevent
import pytest

from phx_gevent.pubsub.history import parse_offset
from tests import httpclient as http
from tests.test_browser import browser  # noqa: F401

_users = itertools.count(1)
DECIMAL = re.compile(r"^-?\d+$")


def user() -> str:
    return f"rec{next(_users)}"


def post(server: Any, topic: str, body: str, event: str = "new_msg") -> None:
    status = http.post(
        server.http + "/broadcast", {"topic": topic, "event": event, "payload": {"user": "http", "body": body}}
    ).status
    assert status == 204


def join(js: Any, url: str, topic: str, params: dict[str, Any] | None = None, track: str | None = None, **opts: Any):
    """Open a socket and join; returns (sid, cid, reply, index of the reply event)."""
    sid = js.open_socket(url + "/socket", {"user": opts.pop("name", None) or user()}, **opts)
    cid = js.channel(sid, topic, params, track=track)
    reply = js.join(cid)
    return sid, cid, reply


def msgs(js: Any, cid: str, since: int = 0) -> list[dict[str, Any]]:
    return js.find(since, ev="chan", channel=cid, event="new_msg")


def test_plain_join_unchanged_and_since_null(example, js):
    topic = "room:rec-plain"
    _, plain, reply = join(js, example.ws, topic)
    assert reply["status"] == "ok" and set(reply["response"]) == {"user"}
    _, opted, reply = join(js, example.ws, topic, {"since": None})
    assert reply["status"] == "ok"
    assert reply["response"]["recovered"] is True and set(reply["response"]) == {"user", "recovered"}
    _, both, reply = join(js, example.ws, topic, {"since": None, "presence": True})
    assert reply["response"]["recovered"] is True
    js.wait(ev="chan", channel=both, event="presence_state")
    mark = js.mark()
    for i in range(3):
        post(example, topic, f"m{i}")
    post(example, topic, "not kept", event="announce")
    for cid in (plain, opted, both):
        js.wait(ev="chan", channel=cid, event="new_msg", since=mark, pred=lambda e: e["payload"]["body"] == "m2")
    assert [e["ref"] for e in msgs(js, plain, mark)] == [None, None, None]
    refs = [e["ref"] for e in msgs(js, opted, mark)]
    assert refs == [e["ref"] for e in msgs(js, both, mark)]
    for ref in refs:
        assert isinstance(ref, str) and ref and not DECIMAL.match(ref)
    seqs = [parse_offset(r)[1] for r in refs]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3 and seqs[2] - seqs[0] == 2
    # The plain client's raw frames are exactly as before: ref null.
    frames = js.find(mark, ev="frame", pred=None)
    assert any(f["msg"]["ref"] is None for f in frames if f["msg"]["event"] == "new_msg")
    # No replay for any of them at join: nothing before the mark.
    assert not js.find(0, ev="chan", channel=plain, event="new_msg")[:0]


def test_recover_missed_messages_exactly_once(example, js):
    topic = "room:rec-missed"
    _, cid, reply = join(js, example.ws, topic, {"since": None})
    assert reply["response"]["recovered"] is True
    mark = js.mark()
    post(example, topic, "a")
    first = js.wait(ev="chan", channel=cid, event="new_msg", since=mark)
    offset = first["ref"]
    for body in ("b", "c", "d"):
        post(example, topic, body)
    # A new client with the offset of "a": b, c, d in order, with their offsets, then live ones.
    mark = js.mark()
    _, again, reply = join(js, example.ws, topic, {"since": offset})
    assert reply["status"] == "ok" and reply["response"] == {"user": reply["response"]["user"], "recovered": True}
    post(example, topic, "e")
    js.wait(ev="chan", channel=again, event="new_msg", since=mark, pred=lambda e: e["payload"]["body"] == "e")
    got = msgs(js, again, mark)
    assert [e["payload"]["body"] for e in got] == ["b", "c", "d", "e"]
    seqs = [parse_offset(e["ref"])[1] for e in got]
    assert seqs == list(range(seqs[0], seqs[0] + 4)) and seqs[0] == parse_offset(offset)[1] + 1
    # The replayed offsets are the ones live clients saw.
    live = {e["payload"]["body"]: e["ref"] for e in msgs(js, cid)}
    assert all(live[e["payload"]["body"]] == e["ref"] for e in got)
    # The latest offset: recovered, nothing replayed.
    mark = js.mark()
    _, latest, reply = join(js, example.ws, topic, {"since": got[-1]["ref"], "presence": True})
    assert reply["response"]["recovered"] is True
    js.wait(ev="chan", channel=latest, event="welcome", since=mark)
    js.wait(ev="chan", channel=latest, event="presence_state", since=mark)
    assert msgs(js, latest, mark) == []


@pytest.mark.parametrize(
    "since",
    ["zzzzzzzz-1", "17", 17, "", "abc", {"x": 1}, ["a"], "kqzrbmaa-0", "kqzrbmaa-99999999999999999999"],
)
def test_unknown_or_malformed_offsets_answer_recovered_false(example, js, since):
    topic = "room:rec-bad"
    post(example, topic, "x")
    mark = js.mark()
    _, cid, reply = join(js, example.ws, topic, {"since": since})
    assert reply["status"] == "ok" and reply["response"]["recovered"] is False
    js.wait(ev="chan", channel=cid, event="welcome", since=mark)
    assert msgs(js, cid, mark) == []


def test_other_topic_and_too_old_offsets(example, js):
    _, other, _ = join(js, example.ws, "room:rec-other", {"since": None})
    mark = js.mark()
    post(example, "room:rec-other", "o")
    foreign = js.wait(ev="chan", channel=other, event="new_msg", since=mark)["ref"]
    topic = "room:rec-old"
    _, cid, _ = join(js, example.ws, topic, {"since": None})
    mark = js.mark()
    post(example, topic, "first")
    old = js.wait(ev="chan", channel=cid, event="new_msg", since=mark)["ref"]
    _, _, reply = join(js, example.ws, topic, {"since": foreign})
    assert reply["response"]["recovered"] is False
    # 100 more: "first" and the one after it are kept no more (size 100).
    for i in range(101):
        example.endpoint.broadcast(topic, "new_msg", {"user": "srv", "body": str(i)})
    mark = js.mark()
    _, late, reply = join(js, example.ws, topic, {"since": old})
    assert reply["response"]["recovered"] is False
    js.wait(ev="chan", channel=late, event="welcome", since=mark)
    assert msgs(js, late, mark) == []
    # One message back is still there: recovered, with exactly the last 100.
    hist = example.endpoint.history(topic, limit=100)
    assert len(hist) == 100 and hist[-1].payload["body"] == "100"
    mark = js.mark()
    _, ok_cid, reply = join(js, example.ws, topic, {"since": hist[0].offset})
    assert reply["response"]["recovered"] is True
    js.wait(ev="chan", channel=ok_cid, event="welcome", since=mark)
    assert [e["payload"]["body"] for e in msgs(js, ok_cid, mark)] == [str(i) for i in range(2, 101)]
    # The server-side API agrees.
    assert example.endpoint.history(topic, since=old) is None
    assert [e.payload["body"] for e in example.endpoint.history(topic, since=hist[-3].offset)] == ["99", "100"]


def test_last_backlog_on_plain_join(example, js):
    topic = "room:rec-last"
    for i in range(120):
        example.endpoint.broadcast(topic, "new_msg", {"user": "srv", "body": str(i)})
    mark = js.mark()
    _, cid, reply = join(js, example.ws, topic, {"last": 5})
    assert set(reply["response"]) == {"user"}
    js.wait(ev="chan", channel=cid, event="welcome", since=mark)
    got = msgs(js, cid, mark)
    assert [e["payload"]["body"] for e in got] == ["115", "116", "117", "118", "119"]
    assert {e["ref"] for e in got} == {None}
    mark = js.mark()
    _, cid, reply = join(js, example.ws, topic, {"last": 1000, "since": None})
    assert reply["response"]["recovered"] is True
    js.wait(ev="chan", channel=cid, event="welcome", since=mark)
    got = msgs(js, cid, mark)
    assert len(got) == 100 and got[-1]["payload"]["body"] == "119"
    assert all(parse_offset(e["ref"]) for e in got)


@pytest.mark.parametrize("transport", ["websocket", "longpoll"])
def test_reconnect_recovers_everything_sent_meanwhile(example, js, transport):
    """Cut off by the server (disconnect by id) while messages keep coming: each arrives once, in order."""
    topic = f"room:rec-cut-{transport}"
    name = user()
    opts: dict[str, Any] = {"reconnectAfterMs": 600, "rejoinAfterMs": 50, "name": name}
    if transport == "longpoll":
        opts["longpoll"] = True
    sid, cid, reply = join(js, example.ws if transport == "websocket" else example.http, topic, {"since": None},
                           track="new_msg", **opts)  # fmt: skip
    assert reply["response"]["recovered"] is True
    sent: list[str] = []
    stop = gevent.event.Event()

    def sender() -> None:
        i = 0
        while not stop.is_set():
            body = f"n{i}"
            example.endpoint.broadcast(topic, "new_msg", {"user": "srv", "body": body})
            sent.append(body)
            i += 1
            gevent.sleep(0.01)

    g = gevent.spawn(sender)
    try:
        js.wait(ev="chan", channel=cid, event="new_msg", pred=lambda e: e["payload"]["body"] == "n10")
        mark = js.mark()
        assert http.post(example.http + "/disconnect", {"user": name}).status == 204
        js.wait(ev="close", socket=sid, since=mark) if transport == "websocket" else None
        replies = js.wait(
            ev="frame",
            since=mark,
            timeout=20,
            pred=lambda e: e["msg"]["event"] == "phx_reply" and e["msg"]["topic"] == topic,
        )
        assert replies["msg"]["payload"]["response"]["recovered"] is True
        n = len(sent)
        js.wait(ev="chan", channel=cid, event="new_msg", since=mark, pred=lambda e: e["payload"]["body"] == f"n{n + 5}")
    finally:
        stop.set()
        g.join(timeout=5)
    last = sent[-1]
    js.wait(ev="chan", channel=cid, event="new_msg", pred=lambda e: e["payload"]["body"] == last)
    got = msgs(js, cid)
    assert [e["payload"]["body"] for e in got] == sent
    seqs = [parse_offset(e["ref"])[1] for e in got]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_the_example_page_shows_the_backlog_and_recovers_after_a_reconnect(example, browser):  # noqa: F811
    topic = "room:pagerec"
    for body in ("old1", "old2"):
        example.endpoint.broadcast(topic, "new_msg", {"user": "bob", "body": body})
    browser.goto(example.http + "/?user=carol&room=pagerec")
    text = browser.wait_text("#log", lambda t: "welcome carol" in t)
    assert "bob: old1" in text and "bob: old2" in text  # the backlog (last: 50) on the first join
    # Cut carol off; what is broadcast meanwhile comes back when the page rejoins with `since`.
    example.endpoint.broadcast("user_socket:carol", "disconnect", {})
    for i in range(3):
        example.endpoint.broadcast(topic, "new_msg", {"user": "bob", "body": f"missed{i}"})
    text = browser.wait_text("#log", lambda t: t.count("welcome carol") == 2 and "bob: missed2" in t)
    lines = [line for line in text.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("bob: ")] == [
        "bob: old1", "bob: old2", "bob: missed0", "bob: missed1", "bob: missed2"
    ]  # fmt: skip
    recovered = [line for line in lines if line.startswith("recovered ")]
    assert len(recovered) == 1 and re.fullmatch(r"recovered [0-3] messages", recovered[0]), lines
    assert "could not be recovered" not in text
