"""The SWIM-style membership state machine, driven by hand with a fake clock."""

from __future__ import annotations

import random

from actors import NodeConfig
from discovery._membership import Change, Membership

CFG = NodeConfig(suspect_after_s=1.0, dead_after_s=2.0, tombstone_s=100.0)


def fresh(me: str = "a", incarnation: int = 1) -> Membership:
    return Membership(me, incarnation=incarnation, now=0.0, config=CFG)


def test_a_heartbeat_from_a_newcomer_makes_it_alive() -> None:
    m = fresh()
    assert m.heard("b", 5, now=0.1) == [Change("b", None, "alive", 5)]
    assert m.heard("b", 5, now=0.2) == []
    assert m.state_of("b") == "alive"


def test_a_silent_member_is_suspected_then_declared_dead() -> None:
    m = fresh()
    m.heard("b", 1, now=0.0)
    assert m.tick(0.9) == []
    assert m.tick(1.0) == [Change("b", "alive", "suspect", 1)]
    assert m.tick(2.9) == []
    assert m.tick(3.0) == [Change("b", "suspect", "dead", 1)]


def test_heartbeats_keep_a_member_alive_however_long() -> None:
    m = fresh()
    for step in range(100):
        m.heard("b", 1, now=step * 0.5)
        assert m.tick(step * 0.5 + 0.4) == []


def test_a_suspected_node_refutes_by_raising_its_incarnation_and_is_alive_again() -> None:
    a, b = fresh("a"), fresh("b", incarnation=7)
    a.heard("b", 7, now=0.0)
    a.tick(1.0)
    assert a.state_of("b") == "suspect"
    for node, state, inc in a.view():  # b hears a's gossip
        b.rumor(node, state, inc, now=1.1)
    assert b.incarnation == 8 and b.refutations == 1
    assert a.heard("b", b.incarnation, now=1.2) == [Change("b", "suspect", "alive", 8)]
    a.heard("b", 8, now=2.0)
    a.heard("b", 8, now=2.9)
    assert a.tick(3.0) == [] and a.state_of("b") == "alive", "the refuted suspicion never turns into a death"


def test_a_node_stopped_for_a_while_shorter_than_the_timeouts_is_never_declared_dead() -> None:
    a, b = fresh("a"), fresh("b")
    now, deaths = 0.0, 0
    while now < 60:
        stopped = (now % 4.0) < 2.0  # SIGSTOP 2 s, run 2 s, repeatedly
        if not stopped:
            for node, state, inc in a.view():
                b.rumor(node, state, inc, now)
            a.heard("b", b.incarnation, now)
        deaths += sum(c.new == "dead" for c in a.tick(now))
        now += 0.25
    assert deaths == 0


def test_stale_gossip_never_revives_a_dead_or_departed_node() -> None:
    m = fresh()
    m.heard("b", 3, now=0.0)
    m.rumor("b", "left", 3, now=2.0)  # no longer heard directly: the rumour counts
    assert m.state_of("b") == "left"
    assert m.rumor("b", "alive", 3, now=2.2) == [] and m.heard("b", 3, now=2.3) == []
    assert m.rumor("b", "suspect", 3, now=2.4) == []
    assert m.state_of("b") == "left"
    assert m.heard("b", 4, now=2.5) == [Change("b", "left", "alive", 4)], (
        "a restart (higher incarnation) revives"
    )


def test_gossip_about_an_unknown_dead_node_is_remembered_so_it_cannot_come_back() -> None:
    m = fresh()
    assert m.rumor("ghost", "dead", 9, now=0.0) == []
    assert m.rumor("ghost", "alive", 9, now=0.1) == []
    assert m.state_of("ghost") == "dead"
    m.tick(CFG.tombstone_s + 1)
    assert m.state_of("ghost") is None, "tombstones expire"


def test_suspicion_and_death_need_at_least_the_known_incarnation() -> None:
    m = fresh()
    m.heard("b", 5, now=0.0)
    later = 2.0  # b no longer heard directly: rumours about it count
    assert m.rumor("b", "suspect", 4, now=later) == []
    assert m.rumor("b", "dead", 4, now=later) == []
    assert m.rumor("b", "suspect", 5, now=later) == [Change("b", "alive", "suspect", 5)]
    assert m.rumor("b", "dead", 5, now=later) == [Change("b", "suspect", "dead", 5)]


def test_a_leaving_node_says_so_and_does_not_refute() -> None:
    m = fresh()
    m.leave()
    m.rumor("a", "dead", 1, now=0.0)
    assert m.incarnation == 1
    assert m.view()[0] == ("a", "left", 1)


def test_any_order_of_the_same_news_ends_in_the_same_state() -> None:
    news = [
        ("b", "alive", 1),
        ("b", "suspect", 1),
        ("b", "alive", 2),
        ("b", "dead", 2),
        ("b", "suspect", 2),
        ("b", "alive", 1),
    ]
    finals = set()
    rng = random.Random(3)
    for _ in range(200):
        rng.shuffle(news)
        m = fresh()
        for node, state, inc in news:
            m.rumor(node, state, inc, now=0.0)  # type: ignore[arg-type]
        finals.add((m.state_of("b"), m.members()["b"].incarnation))
    assert finals == {("dead", 2)}


def test_no_rumour_evicts_a_member_heard_directly_and_its_own_word_outranks_a_forged_incarnation() -> None:
    m = fresh()
    m.heard("b", 3, now=0.0)
    for state in ("suspect", "dead", "left"):
        assert m.rumor("b", state, 2**63 - 1, now=0.5) == []  # type: ignore[arg-type]
    assert m.state_of("b") == "alive" and m.ignored_rumors == 3
    m.rumor("b", "dead", 2**63 - 1, now=3.0)  # silent long enough: the rumour is believed...
    assert m.state_of("b") == "dead"
    assert m.heard("b", 3, now=3.1) == [Change("b", "dead", "alive", 3)], "...until b itself speaks"


def test_a_rumour_about_us_past_our_incarnation_is_forged_and_not_refuted() -> None:
    m = fresh()
    m.rumor("a", "dead", 2**63 - 1, now=0.0)
    assert m.incarnation == 1 and m.refutations == 0 and m.ignored_rumors == 1
    m.rumor("a", "suspect", 1, now=0.1)
    assert m.incarnation == 2, "a real suspicion at our incarnation is refuted"


def test_the_table_is_bounded_and_tombstones_make_room_first() -> None:
    m = Membership("a", incarnation=1, now=0.0, config=NodeConfig(max_peers=3))
    m.rumor("t", "dead", 1, now=0.0)
    m.heard("b", 1, now=0.0)
    m.heard("c", 1, now=0.0)
    assert m.heard("d", 1, now=0.1) == [Change("d", None, "alive", 1)], "the tombstone made room"
    assert m.heard("e", 1, now=0.2) == [] and m.refused_members == 1
    assert set(m.members()) == {"b", "c", "d"}


def test_a_member_s_own_word_that_it_leaves_is_taken_at_once() -> None:
    m = fresh()
    m.heard("b", 3, now=0.0)
    assert m.rumor("b", "left", 3, now=0.1, own_word=True) == [Change("b", "alive", "left", 3)]
