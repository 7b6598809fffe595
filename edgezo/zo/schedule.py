"""Learning-rate schedules: the lr of step t as a pure function of t (so resume and replay
need only the step number)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """`kind` decays lr to 0 at `total_steps` (linear, cosine) after `warmup_steps` of
    linear warm-up from lr/warmup_steps; "constant" keeps lr after the warm-up. Built
    from a validated RunConfig (its choices and ranges are checked there)."""

    lr: float
    kind: str = "constant"
    total_steps: int | None = None
    warmup_steps: int = 0

    def __call__(self, step: int) -> float:
        """The lr of step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "linear":
            return self.lr * (1.0 - progress)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
