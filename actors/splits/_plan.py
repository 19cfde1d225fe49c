"""Planning a dense layer split: a pure function of the model's layer sizes and who offers room.

The members of a split are its head (the node serving the model: it keeps the token embeddings,
runs the sampler and, where it fits, the output layer, so that logits never cross the network)
and its stages (peers holding the same GGUF, each serving a contiguous range of layers over
llama.cpp's RPC). Layers go to members in proportion to their room; as few stages as fit are
recruited, largest room first, nearest first among equals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actors.gguf._layout import Layout

GIB = 1024**3
OVERHEAD_BYTES = 64 * 1024 * 1024  # compute buffers and the like, per member


@dataclass(frozen=True, slots=True)
class Candidate:
    node_id: str
    free_bytes: int  # what it offers for weights and KV cache now
    rtt_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Member:
    """One member of a plan: a node and the layers first..last it holds (`first > last`: none)."""

    node_id: str
    first: int
    last: int
    output: bool = False  # holds the output layer (then it is the last member)

    @property
    def n_layers(self) -> int:
        return max(0, self.last - self.first + 1)


@dataclass(frozen=True, slots=True)
class Plan:
    members: tuple[Member, ...]  # in layer order; the head is one of them
    head: str

    @property
    def stages(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.node_id != self.head)

    def tensor_split(self) -> list[int]:
        """llama.cpp's `tensor_split` for these members in this order: layer counts, with the
        output layer counted on the member that holds it."""
        return [m.n_layers + (1 if m.output else 0) for m in self.members]


@dataclass(frozen=True, slots=True)
class NoFit:
    reason: str


@dataclass(frozen=True, slots=True)
class Need:
    """What a model needs, in bytes, at a context size."""

    layers: tuple[int, ...]  # each repeating layer: weights and its KV cache
    input: int
    output: int

    @property
    def total(self) -> int:
        return sum(self.layers) + self.input + self.output + OVERHEAD_BYTES


def need_of(layout: Layout, tokens: int) -> Need:
    """What `layout`'s model needs with a KV cache of `tokens` tokens (context times slots)."""
    kv = layout.kv_bytes_per_token * tokens
    return Need(
        layers=tuple(b + kv for b in layout.layer_bytes), input=layout.input_bytes, output=layout.output_bytes
    )


def plan_split(
    need: Need, head: Candidate, peers: list[Candidate], *, force: bool = False
) -> Plan | NoFit | None:
    """Who holds which layers. None when the head holds the whole model alone (and no split is
    forced); NoFit (with the reason, in words for the operator) when the mesh cannot hold it.

    `peers` are the candidates for stages: alive, near, holding the same file."""
    if not force and need.total <= head.free_bytes:
        return None
    if head.free_bytes < need.input + OVERHEAD_BYTES:
        return NoFit(
            f"the head offers {_gib(head.free_bytes)} but needs {_gib(need.input + OVERHEAD_BYTES)} "
            f"for the token embeddings alone"
        )
    ranked = sorted(peers, key=lambda c: (-c.free_bytes, c.rtt_ms, c.node_id))
    ranked = [c for c in ranked if c.free_bytes > OVERHEAD_BYTES]
    for k in range(1, len(ranked) + 1):
        plan = _assign(need, head, ranked[:k])
        if plan is not None:
            return plan
    offered = head.free_bytes + sum(c.free_bytes for c in ranked)
    if force and not ranked:
        return NoFit("--split asks for stages, and no peer holding the same file offers room now")
    if not peers:
        where = "no peer holding the same file offers room (start one with --model or --models-dir)"
    else:
        where = f"{len(ranked)} peer(s) holding the same file offer {_gib(offered - head.free_bytes)}"
    return NoFit(
        f"the model needs {_gib(need.total + OVERHEAD_BYTES * len(ranked))} with this context; "
        f"this node offers {_gib(head.free_bytes)} and {where}"
    )


def _assign(need: Need, head: Candidate, stages: list[Candidate]) -> Plan | None:
    """Layers for the head and these stages in proportion to their room, or None if they cannot
    hold them all. The output layer stays on the head if its room allows, else on the last stage."""
    head_room = head.free_bytes - need.input - OVERHEAD_BYTES
    output_on_head = head_room >= need.output
    if output_on_head:
        order = [*stages, head]  # the head last: the output layer follows its layers
        rooms = [c.free_bytes - OVERHEAD_BYTES for c in stages] + [head_room - need.output]
    else:
        order = [head, *stages]
        rooms = [head_room] + [c.free_bytes - OVERHEAD_BYTES for c in stages]
        rooms[-1] -= need.output
    if min(rooms) < 0 or sum(rooms) < sum(need.layers):
        return None
    counts = _fill(list(need.layers), rooms)
    if counts is None:
        return None
    members, first = [], 0
    for i, (node, n) in enumerate(zip(order, counts, strict=True)):
        members.append(Member(node.node_id, first, first + n - 1, output=i == len(order) - 1))
        first += n
    return Plan(members=tuple(members), head=head.node_id)


def _fill(layers: list[int], rooms: list[int]) -> list[int] | None:
    """Contiguous layer counts per member, each member's share of the bytes near its share of the
    room and never over its room; None if the layers cannot be placed."""
    total_room = sum(rooms)
    total = sum(layers)
    counts, i, placed = [], 0, 0
    for j, room in enumerate(rooms):
        target = total * sum(rooms[: j + 1]) / total_room  # cumulative bytes after member j
        taken = 0
        n = 0
        last_member = j == len(rooms) - 1
        while i < len(layers):
            size = layers[i]
            if taken + size > room:
                break
            must = total - placed > sum(rooms[j + 1 :])  # the others cannot hold the rest
            if not last_member and not must and placed + size / 2 > target:
                break  # the layer sits mostly past this member's share
            taken += size
            placed += size
            i += 1
            n += 1
        counts.append(n)
    return counts if i == len(layers) else None


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"
