"""The standby-promotion policy and the demand meter, as pure functions of what they are told."""

from __future__ import annotations

import dataclasses

from actors import NodeConfig
from actors.routing._demand import DemandMeter
from discovery._elastic import Elastic, Standby, rank

CONFIG = dataclasses.replace(
    NodeConfig(), promote_after_s=1.0, demand_tau_s=1.0, step_back_after_s=10.0, min_serving_s=5.0
)


def standby(node_id: str, *, claims: tuple[str, ...] = (), role: str = "standby") -> Standby:
    return Standby(node_id=node_id, role=role, standby_for=("m",), claims=claims)


def run(
    policy: Elastic, demand: float, start: float, end: float, others: list[Standby], serving: set[str]
) -> list:
    actions = []
    t = start
    while t <= end:
        actions += [
            (round(t, 2), *a) for a in policy.step(t, {"m": demand} if demand else {}, serving, others)
        ]
        t += 0.25
    return actions


def test_demand_must_persist_and_only_the_first_in_line_promotes() -> None:
    names = ["a", "b", "c"]
    first = min(names, key=lambda n: rank(n, "m"))
    policies = {n: Elastic(n, ["m"], CONFIG) for n in names}
    for n, policy in policies.items():
        others = [standby(o) for o in names if o != n]
        assert run(policy, 5.0, 0.0, 0.75, others, set()) == []  # not yet: it must last 1 s
        acted = run(policy, 5.0, 1.0, 2.0, others, set())
        assert acted == ([(1.0, "promote", "m")] if n == first else []), (n, acted)
    # A blip shorter than the wait promotes nobody.
    policy = Elastic("x", ["m"], CONFIG)
    assert run(policy, 5.0, 0.0, 0.5, [], set()) + run(policy, 0.0, 0.75, 1.0, [], set()) == []
    assert run(policy, 5.0, 1.25, 2.0, [], set()) == []  # the wait starts again


def test_a_claim_elsewhere_holds_everyone_back_until_it_has_settled() -> None:
    policy = Elastic("z", ["m"], CONFIG)
    claimer = standby("a", claims=("m",))
    assert run(policy, 5.0, 0.0, 5.0, [claimer], set()) == []
    served = standby("a", role="serving")  # its promotion is done: the demand average settles first
    assert run(policy, 5.0, 5.25, 7.75, [served], set()) == []  # 3 tau after the claim, then 1 s
    assert run(policy, 5.0, 8.0, 9.5, [served], set())[0][1:] == ("promote", "m")


def test_a_promoted_node_steps_back_after_the_cool_down_and_not_before_its_minimum() -> None:
    policy = Elastic("a", ["m"], CONFIG)
    assert run(policy, 5.0, 0.0, 1.0, [], set())[0][1:] == ("promote", "m")
    assert run(policy, 5.0, 1.25, 2.0, [], {"m"}) == []  # serving now: the claim turns into `promoted`
    assert policy.promoted == {"m": 1.25} and not policy.claims
    assert run(policy, 0.0, 2.25, 12.0, [], {"m"}) == []  # quiet 9.75 s: < 10
    assert run(policy, 0.0, 12.25, 12.5, [], {"m"}) == [(12.25, "step_back", "m")]
    # With demand coming back within the cool-down, it stays.
    policy = Elastic("a", ["m"], CONFIG)
    run(policy, 5.0, 0.0, 1.0, [], set())
    run(policy, 5.0, 1.25, 2.0, [], {"m"})
    assert run(policy, 0.0, 2.25, 9.0, [], {"m"}) + run(policy, 5.0, 9.25, 9.5, [], {"m"}) == []
    assert run(policy, 0.0, 9.75, 19.5, [], {"m"}) == []


def test_a_claim_that_never_serves_is_given_up() -> None:
    policy = Elastic("a", ["m"], dataclasses.replace(CONFIG, claim_timeout_s=30.0))
    run(policy, 5.0, 0.0, 1.0, [], set())
    assert policy.claims
    run(policy, 5.0, 1.25, 31.5, [], set())
    assert not policy.claims or min(policy.claims.values()) > 1.0  # given up (and maybe claimed anew)


def test_the_meter_averages_waiting_requests_and_counts_its_429s() -> None:
    meter = DemandMeter(tau_s=1.0, window_s=10.0)
    for i in range(31):  # two requests wait for 3 s
        meter.sample(i * 0.1, {"m": 2})
    assert 1.85 < meter.report(3.0)["m"].waiting <= 2.0
    for i in range(31, 200):  # then none
        meter.sample(i * 0.1, {})
    assert "m" not in meter.report(20.0)
    for t in (20.0, 20.5, 21.0):
        meter.refused(t, "m")
    assert meter.report(21.0)["m"].rejected_per_s == 0.3
    assert "m" not in meter.report(31.5)  # out of the window
