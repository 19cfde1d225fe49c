"""The decode planner: how generating sequences split into decodes, by measured cost."""

from __future__ import annotations

from actors.engine._batching import DecodePlanner


def measured(costs: dict[int, float], probe_every: int = 1000) -> DecodePlanner:
    planner = DecodePlanner(probe_every=probe_every)
    for size, seconds in costs.items():
        planner.record(size, seconds)
    return planner


def test_it_first_measures_a_size_together_then_one_by_one() -> None:
    planner = DecodePlanner()
    assert planner.plan(0) == [] and planner.plan(1) == [1]
    assert planner.plan(3) == [3]
    planner.record(3, 0.040)
    assert planner.plan(3) == [1, 1, 1]


def test_it_takes_the_cheapest_cover_of_the_measured_sizes() -> None:
    # 300M Q8_0 on 2 cores: two decode faster apart, four together, three apart.
    planner = measured({1: 0.011, 2: 0.032, 3: 0.040, 4: 0.033})
    assert planner.plan(2) == [1, 1]
    assert planner.plan(3) == [1, 1, 1]
    assert planner.plan(4) == [4]
    # f16 on the same machine: together at every size.
    assert measured({1: 0.006, 2: 0.009, 3: 0.011}).plan(3) == [3]
    # Covers mix sizes, widest first; sizes never measured (two, three) are not guessed at.
    assert measured({1: 0.011, 4: 0.033, 5: 0.060}).plan(5) == [4, 1]


def test_equal_costs_take_fewer_decodes() -> None:
    assert measured({1: 0.010, 2: 0.020}).plan(2) == [2]


def test_it_re_measures_the_road_not_taken_now_and_then() -> None:
    planner = measured({1: 0.011, 2: 0.032}, probe_every=4)
    plans = [planner.plan(2) for _ in range(8)]
    assert plans.count([2]) == 2 and plans.count([1, 1]) == 6
    # A re-measurement that finds the machine changed turns the choice (smoothed: a few of them).
    for _ in range(8):
        planner.record(2, 0.012)
    assert planner.plan(2) == [2]


def test_nonsense_measurements_are_ignored() -> None:
    planner = measured({1: 0.011, 2: 0.032})
    planner.record(0, 1.0)
    planner.record(2, -1.0)
    planner.record(2, 0.0)
    assert planner.costs == {1: 0.011, 2: 0.032}
