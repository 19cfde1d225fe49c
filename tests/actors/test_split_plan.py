"""The dense split planner: a pure function, checked with tables."""

from __future__ import annotations

import pytest

from actors.splits._plan import OVERHEAD_BYTES, Candidate, Member, Need, NoFit, Plan, plan_split

MB = 1024 * 1024
OVERHEAD = OVERHEAD_BYTES


def need(layers: int, layer_mb: int, *, input_mb: int = 10, output_mb: int = 10) -> Need:
    return Need(layers=(layer_mb * MB,) * layers, input=input_mb * MB, output=output_mb * MB)


def room(mb: float) -> int:
    """Free bytes that leave `mb` for layers after a member's overhead."""
    return int(mb * MB) + OVERHEAD


def ranges(plan: Plan | NoFit | None) -> list[tuple[str, int, int, bool]]:
    assert isinstance(plan, Plan), plan
    return [(m.node_id, m.first, m.last, m.output) for m in plan.members]


@pytest.mark.parametrize(
    ("head_mb", "peers", "force", "expected"),
    [
        # Fits on the head: no split.
        (1000, [("a", 1000)], False, None),
        # Forced: one stage, layers in proportion to room (head room net of input and output).
        (120, [("a", 100)], True, [("a", 0, 4, False), ("h", 5, 9, True)]),
        # The head's room after embeddings and output is small: most layers go to the stage.
        (60, [("a", 200)], False, [("a", 0, 7, False), ("h", 8, 9, True)]),
        # As few stages as fit, the largest first: "b" alone takes the rest.
        (60, [("a", 50), ("b", 200), ("c", 80)], False, [("b", 0, 7, False), ("h", 8, 9, True)]),
        # Needs two stages: proportional shares, contiguous, in room order.
        (40, [("a", 60), ("b", 40)], False, [("a", 0, 4, False), ("b", 5, 7, False), ("h", 8, 9, True)]),
        # Room for the output layer but no layer: the head keeps the output (logits stay local).
        (15, [("a", 200)], False, [("a", 0, 9, False), ("h", 10, 9, True)]),
        # The head cannot hold the output layer: it goes last, on the last stage.
        (5, [("a", 200)], False, [("h", 0, -1, False), ("a", 0, 9, True)]),
    ],
)
def test_plans(head_mb: float, peers: list[tuple[str, float]], force: bool, expected: list | None) -> None:
    model = need(10, 10)
    head = Candidate("h", room(head_mb) + model.input)
    result = plan_split(model, head, [Candidate(n, room(mb), rtt_ms=1.0) for n, mb in peers], force=force)
    if expected is None:
        assert result is None
    else:
        assert ranges(result) == expected


def test_layers_cover_the_model_once_and_respect_every_members_room() -> None:
    model = Need(layers=tuple(MB * (5 + i % 7) for i in range(40)), input=20 * MB, output=20 * MB)
    head = Candidate("h", room(60) + model.input)
    peers = [Candidate(f"p{i}", room(mb), rtt_ms=float(i)) for i, mb in enumerate([190, 70, 50, 30])]
    plan = plan_split(model, head, peers)
    assert isinstance(plan, Plan)
    covered = [i for m in plan.members for i in range(m.first, m.last + 1)]
    assert covered == list(range(40))
    rooms = {c.node_id: c.free_bytes - OVERHEAD for c in peers}
    rooms["h"] = head.free_bytes - OVERHEAD - model.input
    assert [s.node_id for s in plan.stages] == ["p0", "p1", "p2"]  # as few as fit, largest first
    for m in plan.members:
        used = sum(model.layers[m.first : m.last + 1]) + (model.output if m.output else 0)
        assert used <= rooms[m.node_id], m
    assert plan.members[-1] == Member("h", plan.members[-1].first, 39, output=True)
    assert plan.tensor_split() == [m.n_layers for m in plan.members[:-1]] + [plan.members[-1].n_layers + 1]


def test_nearer_peer_wins_between_equals() -> None:
    model = need(10, 10)
    head = Candidate("h", room(40) + model.input)
    plan = plan_split(model, head, [Candidate("far", room(200), 20.0), Candidate("near", room(200), 2.0)])
    assert isinstance(plan, Plan) and [s.node_id for s in plan.stages] == ["near"]


@pytest.mark.parametrize(
    ("head_mb", "peers", "force", "words"),
    [
        (40, [], False, "no peer holding the same file"),
        (40, [("a", 20)], False, "needs"),
        (1000, [], True, "--split asks for stages"),
        (-60, [("a", 1000)], False, "token embeddings alone"),
    ],
)
def test_no_fit_says_why(head_mb: float, peers: list[tuple[str, float]], force: bool, words: str) -> None:
    model = need(10, 10)
    head = Candidate("h", room(head_mb) + model.input)
    result = plan_split(model, head, [Candidate(n, room(mb)) for n, mb in peers], force=force)
    assert isinstance(result, NoFit) and words in result.reason, result
