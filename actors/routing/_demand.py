"""Unmet demand, as one router measures it (DESIGN §2.10): how many requests wait here on
average (queued for our workers, or held while every node serving their model is busy), and how
many we refuse with a 429 per second. Each router counts only what waits or is refused at it, so
the mesh's demand is the sum of every node's figure, with nothing counted twice."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

from actors.wire._messages import Demand


class DemandMeter:
    def __init__(self, tau_s: float, window_s: float) -> None:
        """`tau_s`: the time constant of the average of requests waiting; `window_s`: 429s are
        counted per second over this long."""
        self.tau_s = tau_s
        self.window_s = window_s
        self._waiting: dict[str, float] = {}  # model -> the average of requests waiting
        self._at: float | None = None
        self._refused: deque[tuple[float, str]] = deque(maxlen=100_000)

    def sample(self, now: float, waiting: Mapping[str, int]) -> None:
        """Take in how many requests of each model wait now (call it often: every router tick)."""
        weight = 1.0 if self._at is None else 1 - math.exp(-max(0.0, now - self._at) / self.tau_s)
        self._at = now
        for model in set(self._waiting) | set(waiting):
            average = self._waiting.get(model, 0.0)
            average += weight * (waiting.get(model, 0) - average)
            if average < 0.005 and not waiting.get(model):
                self._waiting.pop(model, None)  # gone quiet: the table stays small
            else:
                self._waiting[model] = average

    def settled(self) -> bool:
        """Nothing waits and nothing did lately: the average needs no more samples for now."""
        return not self._waiting

    def refused(self, now: float, model: str) -> None:
        self._refused.append((now, model))

    def report(self, now: float) -> dict[str, Demand]:
        while self._refused and self._refused[0][0] < now - self.window_s:
            self._refused.popleft()
        refused: dict[str, int] = {}
        for _, model in self._refused:
            refused[model] = refused.get(model, 0) + 1
        models = {m for m, w in self._waiting.items() if w >= 0.01} | set(refused)
        return {
            m: Demand(
                waiting=round(self._waiting.get(m, 0.0), 2),
                rejected_per_s=round(refused.get(m, 0) / self.window_s, 3),
            )
            for m in sorted(models)
        }
