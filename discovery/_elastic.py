"""Standby promotion, the pure policy (DESIGN §2.10): when a standby node promotes itself into
serving a model, and when a promoted node steps back.

Every node sees the same picture through gossip: each node's unmet demand per model (its own
measurement only, so the mesh's demand is a sum with nothing counted twice), which nodes stand by
for which models, and which have claimed a promotion. From it each standby decides alone:

- Demand for a model it holds (at least `demand_threshold`) must persist for `promote_after_s`
  before anyone promotes.
- Then the standbys for that model are ranked the same way on every node (a hash of node id and
  model); only the first promotes, and says so with a claim in its heartbeat. While any claim for
  the model stands (until that node serves, or `claim_timeout_s`) and for three time constants of
  the demand average after, nobody else promotes for it; then the wait for persisting demand starts
  again: one node per unit of demand that outlasts the last promotion, never a stampede.
- A node that promoted itself steps back after the model's demand has been gone for
  `step_back_after_s`, and not before it has served `min_serving_s` (no flapping under on/off
  load).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from actors._config import NodeConfig


@dataclass(frozen=True, slots=True)
class Standby:
    """Another node as the policy needs it."""

    node_id: str
    role: str
    standby_for: tuple[str, ...]
    claims: tuple[str, ...]


def rank(node_id: str, model: str) -> bytes:
    """A standby's place in line for `model`: the same on every node, different per model."""
    return hashlib.blake2b(f"{model}\0{node_id}".encode(), digest_size=8).digest()


class Elastic:
    def __init__(self, node_id: str, standby_for: Iterable[str], config: NodeConfig) -> None:
        self.node_id = node_id
        self.standby_for = set(standby_for)  # models this node holds and may load
        self.config = config
        self.claims: dict[str, float] = {}  # model -> when we claimed its promotion
        self.promoted: dict[str, float] = {}  # model -> when we began serving it after a claim
        self._since: dict[str, float] = {}  # model -> since when its demand has lasted
        self._quiet: dict[str, float] = {}  # promoted model -> since when it has had no demand
        self._settled: dict[str, float] = {}  # model -> no promotion before (the last one settles)

    def step(
        self, now: float, demand: Mapping[str, float], serving: set[str], others: Iterable[Standby]
    ) -> list[tuple[str, str]]:
        """("promote" | "step_back", model) to do now. `demand`: the mesh's unmet demand per
        model; `serving`: the models this node serves now; `others`: the other live nodes."""
        others = list(others)
        actions: list[tuple[str, str]] = []
        for model, claimed in list(self.claims.items()):
            if model in serving:  # the promotion is done: the model serves here
                del self.claims[model]
                self.promoted[model] = now
            elif now - claimed > self.config.claim_timeout_s:
                del self.claims[model]  # it never came to serve: give the claim up
        claiming = {m for o in others for m in o.claims} | set(self.claims)
        settle = max(self.config.promote_after_s, 3 * self.config.demand_tau_s)
        for model in claiming:  # demand must outlast the new server's effect on the average
            self._settled[model] = now + settle
        for model in sorted(self.standby_for):
            if model in serving or model in self.claims:
                self._since.pop(model, None)
                continue
            if demand.get(model, 0.0) < self.config.demand_threshold or now < self._settled.get(model, 0.0):
                self._since.pop(model, None)  # no demand, or a promotion is settling: wait anew
                continue
            since = self._since.setdefault(model, now)
            if now - since < self.config.promote_after_s:
                continue
            line = [self.node_id] + [
                o.node_id
                for o in others
                if model in o.standby_for and o.role == "standby" and model not in o.claims
            ]
            if min(line, key=lambda n: rank(n, model)) == self.node_id:
                self.claims[model] = now
                self._since.pop(model, None)
                actions.append(("promote", model))
        for model, began in list(self.promoted.items()):
            if model not in serving:  # stepped back (or the operator took it away)
                del self.promoted[model]
                self._quiet.pop(model, None)
                continue
            if demand.get(model, 0.0) >= self.config.demand_threshold:
                self._quiet.pop(model, None)
                continue
            quiet = self._quiet.setdefault(model, now)
            long_enough = now - began >= self.config.min_serving_s
            if long_enough and now - quiet >= self.config.step_back_after_s:
                del self.promoted[model]
                self._quiet.pop(model, None)
                actions.append(("step_back", model))
        return actions
