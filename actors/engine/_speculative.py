"""Speculative decoding policy, shared by every drafter: prompt lookup (`NgramIndex`), the draft
length of one sequence (`DraftLength`) and whether drafting pays at all (`Governor`).

Drafting runs only for greedy requests (temperature 0): the target accepts a drafted token when
it is the target's own argmax, so the output is exactly what plain decoding gives. Sampled
requests decode plainly. Everything here runs inside the engine child process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_NGRAM = 3  # prompt lookup matches the longest suffix of up to this many tokens


class NgramIndex:
    """Prompt-lookup drafting: propose what followed the last occurrence of the text's suffix."""

    def __init__(self, tokens: list[int] | None = None) -> None:
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest continuation starts
        for token in tokens or ():
            self.add(token)

    def add(self, token: int) -> None:
        """Append one token (O(MAX_NGRAM))."""
        self.tokens.append(token)
        end = len(self.tokens) - 1  # the n-grams that end just before `token` continue with it
        for n in range(1, MAX_NGRAM + 1):
            if end - n >= 0:
                self._next[tuple(self.tokens[end - n : end])] = end

    def propose(self, k: int) -> list[int]:
        """Up to `k` tokens that followed the longest earlier match of the current suffix."""
        for n in range(min(MAX_NGRAM, len(self.tokens)), 0, -1):
            start = self._next.get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start : start + k]
        return []


@dataclass(slots=True)
class DraftLength:
    """How many tokens to draft for one sequence: grows while all are accepted, shrinks after
    early rejections."""

    k: int = 4
    k_max: int = 10

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:
            self.k = min(self.k + 1, self.k_max)
        else:
            self.k = max(1, (self.k + accepted + 1) // 2)


@dataclass(slots=True)
class _Window:
    tokens: float = 0.0
    seconds: float = 0.0

    def rate(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None


@dataclass(slots=True)
class Governor:
    """Whether to draft: measures decode speed (tokens per second per sequence) with and without
    drafting and keeps the faster. It holds the faster mode for `hold_steps`, then measures the
    other for `probe_steps`; the hold doubles (up to `max_hold_steps`) while the choice stands,
    so a drafter that does not pay is turned down and costs only its brief re-measurements."""

    probe_steps: int = 8
    hold_steps: int = 64
    max_hold_steps: int = 1024
    mode: str = "spec"  # "spec" (drafting) or "plain"
    fixed: bool = False  # keep `mode` whatever the measurements say (tests, benchmarks)
    held: str | None = None  # the mode the last comparison chose
    rates: dict[str, float | None] = field(default_factory=lambda: {"spec": None, "plain": None})
    switches: int = 0  # how often the choice changed
    _probing: bool = True
    _left: int = 0
    _hold: int = 0
    _window: _Window = field(default_factory=_Window)

    def __post_init__(self) -> None:
        self._left, self._hold = self.probe_steps, self.hold_steps

    @property
    def drafting(self) -> bool:
        return self.mode == "spec"

    def record(self, tokens: int, seconds: float, sequences: int) -> None:
        """One decode step of `sequences` eligible sequences that emitted `tokens` in `seconds`."""
        if self.fixed:
            return
        self._window.tokens += tokens / max(sequences, 1)
        self._window.seconds += seconds
        self._left -= 1
        if self._left > 0:
            return
        self.rates[self.mode] = self._window.rate()
        self._window = _Window()
        other = "plain" if self.mode == "spec" else "spec"
        if not self._probing:  # a hold ended: measure the other mode again, briefly
            self.mode, self._probing, self._left = other, True, self.probe_steps
        elif self.rates[other] is None:  # the first measurement of each mode
            self.mode, self._left = other, self.probe_steps
        else:
            best = max(("spec", "plain"), key=lambda m: self.rates[m] or 0.0)
            if best == self.held:
                self._hold = min(2 * self._hold, self.max_hold_steps)
            else:
                self.switches += self.held is not None
                self._hold = self.hold_steps
            self.held = self.mode = best
            self._probing, self._left = False, self._hold

    def snapshot(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "tok_s_per_seq": {m: round(r, 1) if r else None for m, r in self.rates.items()},
            "switches": self.switches,
        }
