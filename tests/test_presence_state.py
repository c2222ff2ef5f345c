"""Presence state without greenlets or a bus: entries, replicas' state transfers, diffs."""

from __future__ import annotations

from phx_gevent.presence.state import Entries, PresenceCount, Replica


def meta(ref, **extra):
    return {"phx_ref": ref, **extra}


def test_entries_put_pop_and_clean_up_empty_keys_and_topics():
    e = Entries()
    e.put("room:1", "alice", meta("a1"))
    e.put("room:1", "alice", meta("a2"))
    e.put("room:2", "bob", meta("b1"))
    assert e.count() == 3 and e.get("room:1", "alice", "a2") == meta("a2")
    assert sorted(map(tuple, ([t, k, m["phx_ref"]] for t, k, m in e.rows()))) == [
        ("room:1", "alice", "a1"),
        ("room:1", "alice", "a2"),
        ("room:2", "bob", "b1"),
    ]
    assert e.counts() == {"room:1": PresenceCount(keys=1, metas=2), "room:2": PresenceCount(keys=1, metas=1)}
    assert e.topic_keys() == {"room:1": {"alice"}, "room:2": {"bob"}}
    assert e.pop("room:2", "bob", "b1") == meta("b1")
    assert "room:2" not in e.by_topic  # no empty leftovers
    assert e.pop("room:2", "bob", "b1") is None and e.pop("nowhere", "x", "y") is None
    e.pop("room:1", "alice", "a1")
    e.pop("room:1", "alice", "a2")
    assert not e and e.count() == 0


def test_a_state_transfer_diff_has_exactly_what_left_and_what_joined():
    old, new = Entries(), Entries()
    old.put("room:1", "alice", meta("a1"))
    old.put("room:1", "bob", meta("b1"))
    new.put("room:1", "bob", meta("b1"))
    new.put("room:1", "carol", meta("c1"))
    diff = old.changes_to(new)
    joins, leaves = diff.topics["room:1"]
    assert joins == {"carol": [meta("c1")]} and leaves == {"alice": [meta("a1")]}


def test_a_node_going_down_makes_all_its_presences_leave():
    replica = Replica(last_seen=0.0)
    assert replica.version == -1 and not replica.entries
    replica.entries.put("room:1", "alice", meta("a1"))
    replica.entries.put("room:2", "alice", meta("a2"))
    diff = replica.entries.all_leave()
    assert diff.topics["room:1"][1] == {"alice": [meta("a1")]}
    assert diff.topics["room:2"][1] == {"alice": [meta("a2")]}
    assert not diff.topics["room:1"][0]
