"""The subscription bookkeeping of a pub/sub connection, without Redis: refcounts, linger, batches, resets."""

from __future__ import annotations

import pytest

from phx_gevent.pubsub.subscriptions import State, SubscriptionManager

A, B, C = b"phx:t:{a}", b"phx:t:{b}", b"phx:t:{c}"


def confirm_all(m: SubscriptionManager, commands) -> list:
    """What Redis answers to ``commands``, in order: the batches completed."""
    done = []
    for chs in commands.unsubscribe:
        for ch in chs:
            m.unsubscribed(ch)
    for chs in commands.subscribe:
        for ch in chs:
            batch = m.confirm(ch)
            if batch is not None:
                done.append(batch)
    check(m)
    return done


def check(m: SubscriptionManager) -> None:
    """The counted active channels are the channels in the ACTIVE state."""
    assert m.stats()["active"] == sum(1 for s in m._state.values() if s is State.ACTIVE)


def test_the_first_holder_subscribes_and_later_ones_share_it():
    m = SubscriptionManager()
    batch = m.acquire(A)
    assert batch is not None and m.acquire(A) is batch  # the second holder waits on the same round
    assert m.refs(A) == 2 and m.state(A) is State.PENDING
    cmds = m.take(0.0)
    assert cmds.subscribe == [[A]] and cmds.unsubscribe == [] and cmds.batch is batch
    assert m.state(A) is State.SUBSCRIBING and m.waiting(A) is batch
    assert confirm_all(m, cmds) == [batch] and batch.done and batch.ok
    assert m.is_active(A) and m.acquire(A) is None  # active: nothing to wait for
    assert m.take(1.0) == ([], [], None)


def test_pending_channels_of_a_storm_go_out_in_one_round_of_chunked_commands():
    m = SubscriptionManager(chunk=1000)
    channels = [b"phx:t:{user:%d}" % i for i in range(10_000)]
    batches = {id(m.acquire(ch)) for ch in channels}
    assert len(batches) == 1  # every join of the storm waits on one round
    cmds = m.take(0.0)
    assert len(cmds.subscribe) == 10 and sum(map(len, cmds.subscribe)) == 10_000
    assert m.counters["subscribe_commands"] == 10 and m.counters["rounds"] == 1
    assert confirm_all(m, cmds) == [cmds.batch]
    assert m.stats()["active"] == 10_000


def test_one_round_in_flight_what_comes_meanwhile_gathers_into_the_next():
    m = SubscriptionManager(max_inflight=1)
    first = m.acquire(A)
    m.take(0.0)
    second = m.acquire(B)
    assert m.acquire(C) is second and second is not first
    assert not m.has_work(0.0) and m.take(0.0) == ([], [], None)  # waits for the first round
    assert m.confirm(A) is first
    assert m.has_work(0.0)
    cmds = m.take(0.0)
    assert cmds.subscribe == [[B, C]] and cmds.batch is second


def test_the_last_holder_leaving_unsubscribes_after_the_linger():
    m = SubscriptionManager(linger=1.0)
    m.acquire(A)
    confirm_all(m, m.take(0.0))
    m.release(A, now=10.0)
    assert m.refs(A) == 0 and m.next_due() == 11.0
    assert not m.has_work(10.5) and m.take(10.5) == ([], [], None)
    cmds = m.take(11.0)
    assert cmds.unsubscribe == [[A]] and m.state(A) is State.UNSUBSCRIBING
    m.unsubscribed(A)
    check(m)
    assert m.state(A) is None and m.counters["unsubscribe_commands"] == 1


def test_a_holder_back_within_the_linger_costs_no_command():
    m = SubscriptionManager(linger=1.0)
    m.acquire(A)
    confirm_all(m, m.take(0.0))
    m.release(A, now=5.0)
    assert m.acquire(A) is None  # still subscribed: no wait
    assert m.take(100.0) == ([], [], None)
    assert m.counters["subscribe_commands"] == 1 and m.counters["unsubscribe_commands"] == 0


def test_a_join_that_waits_then_subscribes_keeps_the_channel_without_churn():
    # The join path: wait_routed holds the channel while it waits, releases it, and the
    # local subscription takes it at once: nothing is unsubscribed in between.
    m = SubscriptionManager(linger=0.0)
    batch = m.acquire(A)
    confirm_all(m, m.take(0.0))
    assert batch is not None and batch.ok
    m.release(A, now=1.0)
    m.acquire(A)
    assert m.take(2.0) == ([], [], None)


def test_released_before_it_was_sent_it_is_never_sent():
    m = SubscriptionManager()
    batch = m.acquire(A)
    m.acquire(B)
    m.release(A, now=0.0)
    cmds = m.take(0.0)
    assert cmds.subscribe == [[B]] and cmds.batch is batch and batch.remaining == {B}
    assert m.state(A) is None


def test_a_channel_is_not_unsubscribed_while_its_subscribe_is_unconfirmed():
    m = SubscriptionManager(linger=0.0)
    batch = m.acquire(A)
    m.take(0.0)
    m.release(A, now=0.0)
    assert m.take(5.0).unsubscribe == []  # one command in flight per channel
    assert m.confirm(A) is batch
    assert m.take(5.0).unsubscribe == [[A]]


def test_a_channel_held_again_while_its_unsubscribe_is_in_flight_is_subscribed_after_it():
    m = SubscriptionManager(linger=0.0)
    m.acquire(A)
    confirm_all(m, m.take(0.0))
    m.release(A, now=0.0)
    assert m.take(0.0).unsubscribe == [[A]]
    batch = m.acquire(A)
    assert batch is not None and m.state(A) is State.PENDING
    cmds = m.take(0.0)
    assert cmds.subscribe == [[A]]
    m.unsubscribed(A)  # the old UNSUBSCRIBE's answer comes first: ignored
    assert m.state(A) is State.SUBSCRIBING
    assert m.confirm(A) is batch and m.is_active(A)


def test_a_lost_connection_abandons_waiters_and_restores_every_held_channel_in_one_round():
    m = SubscriptionManager(linger=10.0)
    m.acquire(A)
    confirm_all(m, m.take(0.0))
    m.acquire(B)
    inflight = m.take(0.0).batch
    waiting = m.acquire(C)
    m.release(A, now=0.0)  # lingering: Redis forgets it with the connection anyway
    m.acquire(A)
    m.release(A, now=0.0)
    restore, abandoned = m.reset()
    assert {id(b) for b in abandoned} == {id(inflight), id(waiting)}
    assert all(b.done and not b.ok for b in abandoned)
    check(m)
    assert restore.remaining == {B, C} and m.next_due() is None
    cmds = m.take(0.0)
    assert cmds.batch is restore and sorted(cmds.subscribe[0]) == [B, C]
    assert confirm_all(m, cmds) == [restore] and restore.ok
    assert m.counters["resets"] == 1


def test_the_tail_channel_goes_last_in_a_restore_round():
    m = SubscriptionManager()
    m.tail = b"phx:n"
    for ch in (b"phx:n", b"phx:d:me", A, B):
        m.acquire(ch)
    m.reset()
    assert m.take(0.0).subscribe == [[b"phx:d:me", A, B, b"phx:n"]]


def test_a_refused_round_gives_up_without_retrying():
    m = SubscriptionManager()
    batch = m.acquire(A)
    m.take(0.0)
    assert m.refused() == [batch] and batch.done and not batch.ok
    check(m)
    assert m.acquire(A) is None and m.take(0.0) == ([], [], None)  # not sent again on this connection
    assert m.counters["refused"] == 1


def test_unknown_replies_and_extra_releases_are_ignored():
    m = SubscriptionManager()
    assert m.confirm(A) is None
    m.unsubscribed(A)
    m.release(A, now=0.0)
    assert m.refs(A) == 0 and m.stats()["channels"] == 0


def test_bad_settings_are_refused():
    for kwargs in ({"linger": -1}, {"chunk": 0}, {"max_inflight": 0}):
        with pytest.raises(ValueError):
            SubscriptionManager(**kwargs)
