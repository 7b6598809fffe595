"""The ZO step: seed → L(θ+εz), L(θ−εz) → projected gradient g → deferred update.

    g = (L(θ + εz) − L(θ − εz)) / 2ε          (two-point SPSA / MeZO estimate)
    θ ← θ − η·u(g, z)                          (applied when each block is next visited)

z is never stored: it is regenerated from (seed, parameter, chunk) wherever it is needed.
In pair mode both evaluations are one forward over [x; x]; otherwise two forwards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edgezo.tasks.loss import double, example_losses, num_examples
from edgezo.zo import noise
from edgezo.zo.blocks import BlockMap, build_block_map
from edgezo.zo.perturb import PendingUpdate, Perturbation


@dataclass
class StepResult:
    """What one step did. `loss` is the mean of the + and − losses (an estimate of L(θ))."""

    step: int
    loss: float
    loss_plus: float
    loss_minus: float
    projected_grad: float
    seed: int
    lr: float
    time_s: float

    @property
    def skipped(self) -> bool:
        """True when the loss was not finite and the update was not applied."""
        return not math.isfinite(self.projected_grad)


class ZOEngine:
    """Runs ZO steps on a model in place. Forward-only: no autograd graph is ever built."""

    def __init__(self, model: nn.Module, optimizer, *, eps: float, seed: int, pair: bool = True,
                 loss_fn: Callable[[nn.Module, dict], torch.Tensor] = example_losses,
                 blocks: BlockMap | None = None):
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.model = model.eval()  # ZO needs the same function at θ±εz: no dropout
        self.optimizer = optimizer
        self.eps = eps
        self.seed = seed
        self.pair = pair
        self.loss_fn = loss_fn
        self.blocks: BlockMap = blocks if blocks is not None else build_block_map(model)
        self.perturbation = Perturbation(self.blocks, optimizer.update_chunk)
        self.perturbation.install()
        self.step_index = 0

    @property
    def forward_passes_per_step(self) -> int:
        return 1 if self.pair else 2

    def losses(self, batch: dict, seed: int) -> tuple[float, float]:
        """L(θ+εz) and L(θ−εz) for the direction of `seed` (applies any pending update)."""
        p = self.perturbation
        if self.pair:
            doubled = double(batch)
            n = num_examples(batch)
            with p.perturbed(seed, self.eps, None, pair_rows=doubled["input_ids"].shape[0]):
                per_example = self.loss_fn(self.model, doubled)
            # One host sync per step, here: g is needed as a Python scalar.
            plus, minus = per_example[:n].mean().item(), per_example[n:].mean().item()
        else:
            with p.perturbed(seed, self.eps, +1):
                plus = self.loss_fn(self.model, batch).mean().item()
            with p.perturbed(seed, self.eps, -1):
                minus = self.loss_fn(self.model, batch).mean().item()
        # Parameters no wrapper touched in this forward still owe the previous update.
        p.flush()
        return plus, minus

    def step(self, batch: dict, lr: float) -> StepResult:
        start = time.perf_counter()
        seed = noise.step_seed(self.seed, self.step_index)
        plus, minus = self.losses(batch, seed)
        g = (plus - minus) / (2 * self.eps)
        if math.isfinite(g):
            self.perturbation.set_pending(PendingUpdate(seed, g, lr))
        result = StepResult(self.step_index, (plus + minus) / 2, plus, minus, g, seed, lr,
                            time.perf_counter() - start)
        self.step_index += 1
        return result

    def flush(self) -> None:
        """Apply the pending update now, so the weights reflect every completed step."""
        self.perturbation.flush()

    def close(self) -> None:
        """Flush and remove the wrappers; the model is an ordinary HF model again."""
        self.flush()
        self.perturbation.remove()
