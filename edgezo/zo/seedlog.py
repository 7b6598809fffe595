"""The steps an engine takes from its seed log or from feedback, not from a loss of its
own: replaying a logged step, averaging the last steps' weights (Polyak-Ruppert), and a
step along directions weighted by a ranking (ZO-RankSGD, `edgezo.zo.ranking`).

A mixin of `ZOEngine` (as transformers' GenerationMixin is of its models): these read
the engine's groups, masks and perturbation, and keep its one step counter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from edgezo.errors import ConfigError
from edgezo.zo import chunking
from edgezo.zo.deferred import PendingUpdate
from edgezo.zo.direction import Direction
from edgezo.zo.optimizers import SGD, ExactMove
from edgezo.zo.result import StepResult


class SeedLogSteps:
    """Replay, tail averaging and ranked steps of a ZOEngine."""

    @property
    def replayable(self) -> bool:
        """Whether the seed log alone describes every update (not with a backward)."""
        return not self.fo_indices

    @torch.no_grad()
    def replay(self, entry: dict) -> None:
        """Redo a logged step's update without any data: the same directions, regenerated
        from their seeds, scaled by the logged scalars, through the same update rule, so
        the weights come out bit-identical on the same kind of device."""
        if not self.replayable:
            hybrid = "" if self.optimizer.method.backprops else " with --fo-blocks"
            raise ConfigError(f"{self.optimizer.name}{hybrid} updates with backpropagated "
                              "gradients, which a seed log does not hold; resume from a "
                              "snapshot instead")
        t = entry["step"]
        if t != self.step_index:
            raise ConfigError(f"the seed log jumps from step {self.step_index} to {t}")
        self.perturbation.flush()
        if self.masks is not None and self.masks.due(t):
            self.masks.resample(t)
        for _, d, info, lr in self._logged_updates(entry):
            self.perturbation.set_pending(PendingUpdate(d, lr, t + 1, info))
            self.perturbation.flush()
        self.step_index = t + 1

    def _logged_updates(self, entry: dict) -> Iterator[tuple[int, Direction, dict | None,
                                                              float]]:
        """(group, direction, the rule's scalars, lr) of each update a seed-log step
        applied, rebuilt from its seeds."""
        t = entry["step"]
        if len(entry["groups"]) != len(self._active):
            raise ConfigError(f"seed log step {t} has {len(entry['groups'])} groups; this "
                              f"run has {len(self._active)} (different options?)")
        for gi, (active, group) in enumerate(zip(self._active, entry["groups"], strict=True)):
            if not group["applied"]:
                continue
            n = len(group["coefs"]) if "coefs" in group else self.q
            seeds = [chunking.step_seed(self.seed, t, gi * self.q + i) for i in range(n)]
            if entry.get("seeds") and entry["seeds"][gi * self.q:gi * self.q + n] != seeds:
                raise ConfigError(f"seed log step {t} was drawn with other seeds than this "
                                  "run's (a different --seed or --q?)")
            d, info = self._update_direction(group, seeds, active, t)
            yield gi, d, info, entry["lr"] * (group["move"] if group["move"] is not None
                                              else 1)

    # -- tail averaging -------------------------------------------------------------------
    def averaging_problem(self) -> str | None:
        """Why this run's last weights cannot be averaged from its seed log (None: they
        can). An update must be a fixed multiple of directions that depend on the step
        only through their seeds and bases."""
        rule = self.optimizer.rule
        if not self.replayable:
            return "its backpropagated updates are not in the seed log"
        # θ − η·d: SGD without weight decay, or the conservative move (m is in the logged lr)
        if not (isinstance(rule, ExactMove) or (isinstance(rule, SGD) and rule.linear_in_d())):
            why = "weight decay" if isinstance(rule, SGD) else "its state or sign"
            return (f"{self.optimizer.name}'s update is not a multiple of its direction "
                    f"({why}); averaging takes zo-sgd, zo-sgd-cons, fzoo, forward-grad or "
                    "rank steps")
        if self.masks is not None or self._coords is not None:
            return ("its directions depend on per-step masks or coordinates the seed log "
                    "does not hold (--sparsity, --directions coordinate)")
        return None

    @torch.no_grad()
    def average_tail(self, entries: list[dict]) -> None:
        """Move θ to the mean of the weights after each of `entries`, the seed-log lines
        of this run's last steps (Polyak-Ruppert tail averaging: the mean of weights that
        jitter around a point sits closer to it). The weights after
        step m are θ_T plus the undone updates of the steps after m, so the mean is θ_T
        plus each logged update undone in the share of the averaged weights it precedes:
        one update along the logged directions, summed in fp32 and rounded once, with no
        copy of θ kept. The seed log does not record it: the caller keeps the last
        weights recoverable (a snapshot) if the run is to go on."""
        problem = self.averaging_problem()
        if problem is not None:
            raise ConfigError(f"cannot average this run's last weights: {problem}")
        last, count = self.step_index, len(entries)
        if [e["step"] for e in entries] != list(range(last - count, last)):
            raise ConfigError(f"averaging needs the seed log of steps {last - count} to "
                              f"{last - 1}, in order")
        self.perturbation.flush()
        # one sum per group and basis: a direction shares its bases across its seeds
        sums: dict[tuple[int, int], tuple[list[int], list[float], int]] = {}
        for entry in entries:
            t = entry["step"]
            share = (t - last + count) / count  # of the averaged weights, those after t
            if share == 0:  # the first step's update is in every averaged weight
                continue
            for gi, d, _, lr in self._logged_updates(entry):
                key = (gi, t // self.basis_every if self.rank else 0)
                seeds, coefs, _ = sums.setdefault(key, ([], [], t))
                seeds += d.seeds
                coefs += [-share * lr * c for c in d.coefs]  # θ − 1·(−share·η·d)
        for (gi, _), (seeds, coefs, t) in sums.items():
            d = self._direction(tuple(seeds), tuple(coefs), self._active[gi], t)
            self.perturbation.set_pending(PendingUpdate(d, 1.0, last + 1))
            self.perturbation.flush()

    # -- steps from feedback other than a loss -------------------------------------------
    @contextmanager
    def perturbed_query(self, query: int, scale: float) -> Iterator[None]:
        """Inside, the model computes at θ + scale·z of query `query` of the next step
        (any forward: generation too)."""
        self._check_feedback()
        t = self.step_index
        d = self._direction((chunking.step_seed(self.seed, t, query),), (1.0,), None, t,
                            perturb=True)
        with self.perturbation.perturbed(d, scale, 1):
            yield

    def _check_feedback(self) -> None:
        if not self.zo_only or self._coords is not None or len(self.groups) != 1 \
                or self.masks is not None or self.optimizer.method.curvature:
            raise ConfigError("steps from rankings need a ZO-only run with random "
                              "directions in one group and no per-step state of their own: "
                              "no --fo-blocks, --block-wise, --sparsity, coordinate "
                              "directions or hizoo")

    def step_along(self, coefs: list[float], lr: float) -> StepResult:
        """A step θ ← rule(θ, η, Σ coefs_k·z_k) over the next step's first len(coefs)
        queries, logged so a replay redoes it (rank feedback: the coefficients come from
        an ordering, not from loss differences)."""
        self._check_feedback()
        t = self.step_index
        seeds = [chunking.step_seed(self.seed, t, i) for i in range(len(coefs))]
        self.perturbation.flush()
        record = {"grads": [], "coefs": list(coefs), "move": None, "applied": False}
        result = StepResult(t, math.nan, lr, 0.0, seeds=seeds, groups=[record])
        if any(coefs) and (lr != 0 or self.optimizer.rule.stateful):
            d, _ = self._update_direction(record, seeds, self._active[0], t)
            self.perturbation.set_pending(PendingUpdate(d, lr, t + 1))
            record["applied"] = True
        self.step_index += 1
        return result
