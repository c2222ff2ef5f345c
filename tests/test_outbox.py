"""The Redis adapter's outgoing queue, without Redis: bounds, expiry, requeue, history fallbacks."""

from __future__ import annotations

from phx_gevent.pubsub.outbox import HistoryCmd, Outbox

B = b"phx:b"  # the broadcast channel
D = b"phx:d:other-node"  # a direct message's channel


def make(max_pending=10, max_bytes=1000):
    return Outbox(max_pending, max_bytes, b"phx:d:")


def test_bounds_count_queued_and_in_flight_envelopes_and_bytes():
    out = make(max_pending=3, max_bytes=100)
    out.add((0.0, B, b"x" * 10))
    out.add((0.0, B, b"y" * 10))
    out.take(batch_size=1)
    assert len(out) == 2 and len(out.inflight) == 1 and out.pending_bytes == 20
    assert not out.full(10)
    out.add((0.0, B, b"z" * 10))
    assert out.full(1)  # three envelopes, in flight included
    assert make(max_bytes=100).full(101)


def test_making_room_drops_the_oldest_queued_never_what_is_in_flight():
    out = make(max_pending=3)
    for n in range(3):
        out.add((float(n), B, b"%d" % n))
    out.take(batch_size=1)  # envelope 0 is in flight
    fallen = []
    dropped, accepted = out.drop_oldest(1, fallen.append)
    assert (dropped, accepted) == (1, True)
    assert [item[2] for item in out.inflight] == [b"0"] and [item[2] for item in out.queue] == [b"2"]
    assert fallen == []  # only history appends go to the fallback
    # Nothing queued left to drop and still full: the new envelope is the one refused.
    out = make(max_pending=1)
    out.add((0.0, B, b"a"))
    out.take(batch_size=1)
    assert out.drop_oldest(1, fallen.append) == (0, False)


def test_dropped_history_appends_go_to_the_fallback():
    out = make(max_pending=1)
    cmd = HistoryCmd(("args",), "room:1", None)
    out.add((0.0, cmd, b"plain"))
    fallen = []
    assert out.drop_oldest(1, fallen.append) == (1, True)
    assert fallen == [(0.0, cmd, b"plain")] and out.pending_bytes == 0


def test_broadcasts_expire_after_the_replay_window_direct_messages_after_their_ttl():
    out = make()
    out.add((0.0, B, b"old broadcast"))
    out.add((5.0, B, b"young broadcast"))
    out.add((5.0, D, b"old direct"))
    out.add((9.5, D, b"young direct"))
    fallen = []
    expired = out.expire(now=10.0, replay_window=8.0, direct_ttl=2.0, fallback=fallen.append)
    assert expired == 2
    assert [item[2] for item in out.queue] == [b"young broadcast", b"young direct"]
    assert out.pending_bytes == len(b"young broadcast") + len(b"young direct")
    # The direct-message scan runs at most ten times a second.
    out.add((9.6, D, b"direct"))
    assert out.expire(now=10.05, replay_window=8.0, direct_ttl=0.1, fallback=fallen.append) == 0
    assert out.expire(now=10.2, replay_window=8.0, direct_ttl=0.1, fallback=fallen.append) == 2


def test_a_failed_write_puts_what_was_in_flight_back_at_the_head_in_order():
    out = make()
    for n in range(5):
        out.add((float(n), B, b"%d" % n))
    assert [item[2] for item in out.take(batch_size=3)] == [b"0", b"1", b"2"]
    assert out.take(batch_size=3) is out.inflight and len(out.inflight) == 3  # nothing new while in flight
    out.requeue()
    assert [item[2] for item in out.queue] == [b"0", b"1", b"2", b"3", b"4"] and not out.inflight
    assert out.pending_bytes == 5


def test_acknowledged_envelopes_are_forgotten_one_at_a_time():
    out = make()
    out.add((0.0, B, b"abc"))
    out.add((0.0, D, b"de"))
    out.take(batch_size=10)
    assert out.acknowledged()[2] == b"abc" and out.pending_bytes == 2
    assert out.acknowledged()[2] == b"de" and out.pending_bytes == 0 and not out


def test_take_respects_the_byte_budget():
    out = make(max_bytes=10_000)
    for _ in range(4):
        out.add((0.0, B, b"x" * 1000))
    assert len(out.take(batch_size=100, budget=1500)) == 2


def test_queued_history_appends_become_plain_broadcasts_when_redis_is_gone():
    out = make()
    cmd = HistoryCmd(("args",), "room:1", None)
    out.add((1.0, B, b"plain one"))
    out.add((2.0, cmd, b"history one"))
    out.convert_history(lambda item: (item[0], B, item[2]))
    assert list(out.queue) == [(1.0, B, b"plain one"), (2.0, B, b"history one")]


def test_clear_reports_what_was_lost():
    out = make()
    out.add((0.0, B, b"a"))
    out.add((0.0, B, b"b"))
    out.take(batch_size=1)
    assert out.clear() == 2 and not out and out.pending_bytes == 0
