"""SWIM-style membership: who is alive, suspect, dead or left, decided from heartbeats and gossip.

A pure state machine: no sockets, no threads; time comes from the `now` the caller passes. The
gossip actor feeds it what it hears and publishes what it says (`view()`), so the same rules run
in tests with a fake clock and in the mesh.

Rules (as in SWIM and memberlist), for a member known at incarnation `k`:
- alive(i) from the member itself or from gossip wins if i > k (or the member was unknown);
- suspect(i) wins over alive(k) if i >= k, over suspect(k) if i > k;
- dead(i) and left(i) win over alive/suspect(k) if i >= k, and only alive(i > k) revives the
  member — so a dead or departed node never comes back from stale gossip;
- a member hearing itself suspected or declared dead at its incarnation refutes it by raising
  its incarnation, which its next heartbeat carries;
- silence: alive becomes suspect after `suspect_after_s`, suspect becomes dead after
  `dead_after_s` more. A slow node has that long to be heard or to refute.

Beyond SWIM, for a LAN where not every host is a friend: only a node raises its own incarnation,
so a rumour about us at a higher incarnation than ours is forged and ignored (refuting it would
let a forger push our incarnation past what the wire can carry); no rumour makes a member we hear
directly suspect, dead or left; a member's own heartbeat outranks a rumour's higher incarnation
that was never heard from the member itself; and the table holds at most `max_peers` members
(the oldest tombstones make room; past that, newcomers are refused and counted).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from actors import NodeConfig

State = Literal["alive", "suspect", "dead", "left"]
_FINAL: tuple[State, ...] = ("dead", "left")


@dataclass(frozen=True, slots=True)
class Member:
    node_id: str
    state: State
    incarnation: int
    since: float  # when it entered this state
    last_heard: float  # last direct heartbeat
    direct_incarnation: int = -1  # the highest incarnation heard from the member itself


@dataclass(frozen=True, slots=True)
class Change:
    """A member's state changed (old is None for a newcomer)."""

    node_id: str
    old: State | None
    new: State
    incarnation: int


class Membership:
    """This node's picture of the mesh. Not thread-safe: one actor owns it."""

    def __init__(self, me: str, *, incarnation: int, now: float, config: NodeConfig | None = None) -> None:
        self.me = me
        self.incarnation = incarnation
        self.config = config or NodeConfig()
        self.left = False
        self.refutations = 0
        self.ignored_rumors = 0  # rumours against members we hear directly, or forged about us
        self.refused_members = 0  # newcomers refused because the table was full
        self._members: dict[str, Member] = {}
        self._created = now

    # -- what we hear ---------------------------------------------------------------------------

    def heard(self, node_id: str, incarnation: int, now: float) -> list[Change]:
        """A heartbeat straight from `node_id`: it is alive at `incarnation`."""
        if node_id == self.me:
            return []
        known = self._members.get(node_id)
        if known is not None and known.incarnation > incarnation >= known.direct_incarnation:
            # The higher incarnation only ever came from gossip: the member itself outranks it.
            self._members[node_id] = replace(known, incarnation=incarnation - 1)
        changes = self._apply(node_id, "alive", incarnation, now)
        member = self._members.get(node_id)
        if member is not None and member.incarnation == incarnation and member.state in ("alive", "suspect"):
            self._members[node_id] = replace(
                member, last_heard=now, direct_incarnation=max(member.direct_incarnation, incarnation)
            )
        return changes

    def rumor(
        self, node_id: str, state: State, incarnation: int, now: float, *, own_word: bool = False
    ) -> list[Change]:
        """Gossip about `node_id`: from a third party, or (`own_word`) the row a member's own
        heartbeat carries about itself, which may say it is leaving."""
        if node_id == self.me:
            self._hear_about_me(state, incarnation)
            return []
        known = self._members.get(node_id)
        if (
            not own_word
            and state != "alive"
            and known is not None
            and known.direct_incarnation >= 0
            and now - known.last_heard < self.config.suspect_after_s
        ):
            self.ignored_rumors += 1  # we hear it ourselves: only its own word can change that
            return []
        return self._apply(node_id, state, incarnation, now)

    def _hear_about_me(self, state: State, incarnation: int) -> None:
        if incarnation > self.incarnation:
            self.ignored_rumors += 1  # only we raise our incarnation: this is forged
            return
        if self.left or state == "alive" or incarnation < self.incarnation:
            return
        self.incarnation = incarnation + 1  # refute: our next heartbeat says we are alive
        self.refutations += 1

    def _apply(self, node_id: str, state: State, incarnation: int, now: float) -> list[Change]:
        known = self._members.get(node_id)
        if known is None:
            if not self._make_room():
                self.refused_members += 1
                return []
            self._members[node_id] = Member(node_id, state, incarnation, now, now)
            if state in _FINAL:  # remember the tombstone, but it is news to nobody
                return []
            return [Change(node_id, None, state, incarnation)]
        if not _wins(state, incarnation, known.state, known.incarnation):
            return []
        self._members[node_id] = replace(
            known,
            state=state,
            incarnation=incarnation,
            since=now,
            last_heard=now if state == "alive" else known.last_heard,
        )
        if state == known.state:
            return []
        return [Change(node_id, known.state, state, incarnation)]

    def _make_room(self) -> bool:
        """Whether one more member fits, dropping the oldest tombstone if the table is full."""
        if len(self._members) < self.config.max_peers:
            return True
        tombstones = [m for m in self._members.values() if m.state in _FINAL]
        if not tombstones:
            return False
        del self._members[min(tombstones, key=lambda m: m.since).node_id]
        return True

    # -- time -----------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Change]:
        """Apply timeouts: silent members become suspect, then dead; old tombstones go."""
        changes: list[Change] = []
        cfg = self.config
        for node_id, m in list(self._members.items()):
            if m.state == "alive" and now - m.last_heard >= cfg.suspect_after_s:
                self._members[node_id] = replace(m, state="suspect", since=now)
                changes.append(Change(node_id, "alive", "suspect", m.incarnation))
            elif m.state == "suspect" and now - m.since >= cfg.dead_after_s:
                self._members[node_id] = replace(m, state="dead", since=now)
                changes.append(Change(node_id, "suspect", "dead", m.incarnation))
            elif m.state in _FINAL and now - m.since >= cfg.tombstone_s:
                del self._members[node_id]
        return changes

    def leave(self) -> None:
        """We are shutting down: `view()` now says so, and nothing we hear changes it."""
        self.left = True

    # -- what we say ----------------------------------------------------------------------------

    def view(self) -> list[tuple[str, State, int]]:
        """(node, state, incarnation) of everyone we know, ourselves first: what we gossip."""
        mine: State = "left" if self.left else "alive"
        return [(self.me, mine, self.incarnation)] + [
            (m.node_id, m.state, m.incarnation) for m in self._members.values()
        ]

    def members(self) -> dict[str, Member]:
        """A copy of the table (for views and status); `state_of` looks one member up."""
        return dict(self._members)

    def state_of(self, node_id: str) -> State | None:
        member = self._members.get(node_id)
        return member.state if member is not None else None


_RANK: dict[State, int] = {"alive": 0, "suspect": 1, "dead": 2, "left": 2}


def _wins(new: State, new_inc: int, old: State, old_inc: int) -> bool:
    """Whether news `new@new_inc` overrides what we know, `old@old_inc`."""
    if new == "alive":
        return new_inc > old_inc
    if old in _FINAL:
        return False  # only a newer alive revives the dead or departed
    if new_inc != old_inc:
        return new_inc > old_inc
    return _RANK[new] > _RANK[old]
