"""How to split a step's generating sequences into decodes: by what each size of decode costs here,
measured.

On a CPU the cost of one llama.cpp decode is not a smooth function of how many sequences it
carries: ggml picks a matrix kernel by batch width. Measured on 2 cores (300M Q8_0, one token per
sequence): 1 token 11 ms, 2 tokens 32, 3 tokens 40, 4 tokens 33, 8 tokens 39. So two sequences
decode faster one after the other (22 ms) than together, while four go best together; an f16 model
on the same machine (6, 9, 11, 12 ms) is best batched at every size. Which holds depends on the
model, its quantization and the machine, so `DecodePlanner` measures it as it serves: the cost of
every decode it runs, by size, and the cheapest way to cover `n` sequences with the sizes it has
measured. It re-measures the road not taken now and then, so a choice made when the machine was
busy, or the contexts short, does not stand forever.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Weight of a new measurement in the running cost of a size (contexts grow, machines drift).
SMOOTHING = 0.25


@dataclass
class DecodePlanner:
    """Splits `n` one-token sequences into decode sizes, by measured cost per decode."""

    probe_every: int = 256  # steps between re-measurements of the other way (a 0.1-0.5 % cost)
    costs: dict[int, float] = field(default_factory=dict)  # decode size -> seconds, smoothed
    _steps: int = 0

    def plan(self, n: int) -> list[int]:
        """The sizes of the decodes that cover `n` sequences, in order."""
        if n <= 1:
            return [n] if n else []
        if n not in self.costs:
            return [n]  # first measure them together (what a batch does by default)
        if 1 not in self.costs:
            return [1] * n  # then one by one
        best = self._cheapest(n)
        self._steps += 1
        if self._steps % self.probe_every == 0:  # re-measure the other extreme
            return [1] * n if best == [n] else [n]
        return best

    def record(self, size: int, seconds: float) -> None:
        """One decode of `size` one-token sequences took `seconds`."""
        if size < 1 or seconds <= 0:
            return
        old = self.costs.get(size)
        self.costs[size] = seconds if old is None else old + SMOOTHING * (seconds - old)

    def _cheapest(self, n: int) -> list[int]:
        """The cheapest sizes summing to `n` among those measured (1 always is)."""
        best: list[tuple[float, list[int]]] = [(0.0, [])]
        for total in range(1, n + 1):
            options = [
                (best[total - k][0] + cost, best[total - k][1] + [k])
                for k, cost in self.costs.items()
                if k <= total
            ]
            best.append(min(options, key=lambda o: (o[0], len(o[1]))))
        return sorted(best[n][1], reverse=True)
