"""What one optimisation step did: its losses, and the seeds and scalars that redo it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class StepResult:
    """What one step did, enough to replay it: the seeds and scalars of every query."""

    step: int
    loss: float  # an estimate of L(θ) before the step
    lr: float
    time_s: float
    seeds: list[int] = field(default_factory=list)
    projected_grads: list[float] = field(default_factory=list)  # one per seed
    loss_plus: float = math.nan  # the first query's losses (two-sided)
    loss_minus: float = math.nan
    forward_passes: int = 0
    backward_passes: int = 0
    # forward passes over the batch alone: pair mode's doubled forward counts two, so
    # methods that query differently (FZOO's one-sided queries, HiZOO's L(θ)) compare
    # by the compute their forwards cost
    batch_forwards: int = 0
    # zo-sgd-cons, per group: m of the move θ ← θ − m·η·d kept (1: the usual step,
    # 0: stay, −1: the opposite step)
    move: list[int] = field(default_factory=list)
    clipped: int = 0  # queries whose g was clipped to ±g_clip (logged clipped)
    skipped: bool = False  # a non-finite loss: (part of) the update was not applied
    # per ZO group, what its update was: {"grads": [q scalars], "move": m or None,
    # "applied": bool} (the seed log's record; see ZOEngine.replay)
    groups: list[dict] = field(default_factory=list)

    def log_entry(self) -> dict:
        """This step as one seed-log line: enough to redo its update without data."""
        return {"step": self.step, "lr": self.lr, "seeds": self.seeds,
                "groups": self.groups, "skipped": self.skipped}

    @property
    def zero_estimates(self) -> int:
        """Queries whose two losses were bit-identical (g = 0): a pair of forwards that
        told nothing, because ε was below the loss's rounding or the weights saturated."""
        return sum(g == 0.0 for g in self.projected_grads)

    @property
    def all_zero(self) -> bool:
        return bool(self.projected_grads) and self.zero_estimates == len(self.projected_grads)

    @property
    def seed(self) -> int | None:
        return self.seeds[0] if self.seeds else None

    @property
    def projected_grad(self) -> float:
        """The mean projected gradient of the step's queries (nan for FO-only steps)."""
        g = self.projected_grads
        return sum(g) / len(g) if g else math.nan
