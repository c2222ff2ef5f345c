"""Request/response between nodes (phx_gevent.pubsub.request) over the in-memory bus, without Redis."""

from __future__ import annotations

import gevent
from gevent.event import Event

from phx_gevent.pubsub import PubSub
from phx_gevent.pubsub.memory import MemoryBus
from phx_gevent.pubsub.request import Silence


def nodes(n=2):
    bus = MemoryBus()
    pubsubs = [PubSub(bus.adapter(f"node{i}")) for i in range(n)]
    for p in pubsubs:
        p.start()
    return pubsubs


def test_a_request_gets_its_answer_from_the_node_it_names():
    a, b = nodes()
    seen = []

    def serve(request, responder):
        seen.append((request["op"], responder.node))
        responder.answer({"echo": request["x"]})

    a_req = a.requests("echo", lambda r, resp: None, timeout=2.0)
    b.requests("echo", serve, timeout=2.0)
    answer = a_req.ask(b.node_name, {"op": "say", "x": 42}, work=1.0)
    assert answer["echo"] == 42 and answer["op"] == "res"
    assert seen == [("say", a.node_name)]


def test_an_acknowledged_request_may_take_its_work_time():
    a, b = nodes()
    go = Event()

    def serve(request, responder):
        responder.ack()

        def later():
            go.wait(5)
            responder.answer({"done": True})

        gevent.spawn(later)

    a_req = a.requests("slow", lambda r, resp: None, timeout=0.2)
    b.requests("slow", serve, timeout=0.2)
    gevent.spawn_later(0.5, go.set)  # longer than the timeout, within timeout + work
    assert a_req.ask(b.node_name, {"op": "work"}, work=5.0)["done"] is True


def test_silence_says_whether_nobody_answered_or_the_answer_was_lost():
    a, b = nodes()
    a_req = a.requests("q", lambda r, resp: None, timeout=0.2)
    b.requests("q", lambda request, responder: responder.ack(), timeout=0.2)  # acknowledges, never answers
    assert a_req.ask(b.node_name, {"op": "q"}, work=0.1) is Silence.LOST
    assert a_req.ask("no-such-node", {"op": "q"}, work=0.1) is Silence.NOBODY
    # One process (no adapter): there is nobody else to ask.
    alone = PubSub()
    assert alone.requests("q", lambda r, resp: None, timeout=0.2).ask("x", {"op": "q"}, 0.1) is Silence.NOBODY


def test_a_failing_server_callback_costs_only_its_request(caplog):
    a, b = nodes()
    calls = []

    def serve(request, responder):
        calls.append(request["n"])
        if request["n"] == 1:
            raise RuntimeError("boom")
        responder.answer({"n": request["n"]})

    a_req = a.requests("f", lambda r, resp: None, timeout=0.2)
    b.requests("f", serve, timeout=0.2)
    assert a_req.ask(b.node_name, {"op": "f", "n": 1}, work=0.1) is Silence.NOBODY
    assert a_req.ask(b.node_name, {"op": "f", "n": 2}, work=0.1)["n"] == 2
    assert calls == [1, 2]
