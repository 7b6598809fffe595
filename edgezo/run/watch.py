"""The watch over a run that has gone wrong: non-finite losses in a row, weights that
became non-finite, or estimates that collapsed to exactly zero step after step.
"""

from __future__ import annotations

from edgezo.errors import TrainingError
from edgezo.run import folder as runs
from edgezo.run.session import Session
from edgezo.zo.result import StepResult

MAX_NONFINITE_IN_A_ROW = 5


MAX_ZERO_ESTIMATES_IN_A_ROW = 10


class Diverged(TrainingError):
    """The run stopped making sense; `good_step`: the last step count whose weights were
    still sound (the run goes back there when it can)."""

    def __init__(self, message: str, good_step: int):
        super().__init__(message)
        self.good_step = good_step


class DivergenceWatch:
    """Looks at each step for a run that has gone wrong: non-finite losses in a row,
    weights that became non-finite, or estimates that collapsed to exactly zero step
    after step (saturated weights: the loss no longer moves whatever the direction)."""

    def __init__(self, session: Session):
        self.session = session
        self.streak_start: int | None = None  # first step of the current suspicious run
        self.nonfinite = self.zeros = 0
        # only the cross-entropy's estimates must move: an accuracy objective is often
        # flat, and FO steps have no projected gradient
        self.zeros_matter = (session.config.estimator.objective == "ce"
                             and not session.custom_objective)

    def see(self, r: StepResult) -> None:
        zero = self.zeros_matter and r.all_zero
        if not (r.skipped or zero):
            self.streak_start, self.nonfinite, self.zeros = None, 0, 0
            return
        if self.streak_start is None:
            self.streak_start = r.step
        self.nonfinite = self.nonfinite + 1 if r.skipped else 0
        self.zeros = self.zeros + 1 if zero else 0
        good = max(0, self.streak_start - 1)  # before the update that led here
        lr = self.session.config.optimizer.lr
        if not runs.weights_finite(self.session):
            raise Diverged(f"the weights became non-finite (found at step {r.step + 1}); "
                           f"lower --lr (now {lr:g})", good)
        if self.nonfinite >= MAX_NONFINITE_IN_A_ROW:
            raise TrainingError(
                f"the loss was not finite for {self.nonfinite} steps in a row (last at step "
                f"{r.step + 1}); lower --lr or --eps, or use --dtype fp32")
        if self.zeros >= MAX_ZERO_ESTIMATES_IN_A_ROW:
            raise Diverged(
                f"the last {self.zeros} estimates were exactly 0 (L(θ+εz) = L(θ−εz), loss "
                f"{r.loss:.4f}): the weights saturated, or ε is below the loss's rounding. "
                f"Lower --lr (now {lr:g}); if the loss never moved, raise --eps or use "
                "--dtype fp32", good)
