"""The optimisation step, for every estimator: seeds → losses → scalars → deferred update.

A ZO query with seed s evaluates the loss along its direction z_s and keeps one scalar:

    two-sided   g = (L(θ + εz) − L(θ − εz)) / 2ε     (one doubled forward in pair mode)
    one-sided   g = (L(θ + εz) − L(θ)) / ε           (L(θ) once per step)

and q queries give the estimate d = (1/q)·Σ g_s·z_s, stored as q seeds and q scalars.
Forward-gradient queries get g = ∇L·v exactly by forward-mode AD instead. The update
θ ← rule(θ, η, d) is deferred: each parameter gets it when a wrapper next touches it.

Options, all combinable:
- block-wise: each parameter group (a layer, or half a layer) is estimated and updated
  in turn, with its own seeds, before the next group is estimated;
- sparsity: d is masked to exactly a fraction 1 − S of each parameter;
- hybrid ZO/FO: some blocks take the exact backpropagated gradient of L(θ) (one extra
  forward + backward through those blocks only) while the rest take ZO estimates;
- conservative (zo-sgd-cons): after the estimate, keep the lowest loss of θ, θ − η·d,
  θ + η·d, as an exact move.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from edgezo.errors import ConfigError
from edgezo.zo import bases, chunking, coordinates, gradients, state
from edgezo.zo.attachments import Attachments
from edgezo.zo.batch import batch_rows, double, global_means
from edgezo.zo.blocks import BlockMap, build_block_map, estimation_groups, resolve_fo_blocks
from edgezo.zo.deferred import PendingUpdate
from edgezo.zo.direction import Direction
from edgezo.zo.gradients import LossFn
from edgezo.zo.methods import Estimate
from edgezo.zo.optimizers import Optimizer
from edgezo.zo.perturb import Perturbation
from edgezo.zo.result import StepResult
from edgezo.zo.seedlog import SeedLogSteps
from edgezo.zo.sparsity import SparseMasks
from edgezo.zo.stream import BlockStreamer

if TYPE_CHECKING:
    from edgezo.zo.graphs import StepGraphs

_BASIS_SALT = 0xBA515  # the seed of structured directions' bases: mix(seed, epoch, salt)


class ZOEngine(SeedLogSteps, Attachments):
    """Runs optimisation steps on a model in place."""

    def __init__(self, model: nn.Module, optimizer: Optimizer, estimate: Estimate, *,
                 loss_fn: LossFn, seed: int = 0, pair: bool = True,
                 blocks: BlockMap | None = None):
        """`estimate`: q, one- or two-sided, directions, block-wise, sparsity, hybrid FO
        blocks and ε, every value decided (edgezo.config.rules.estimate_of). `pair`:
        evaluate L(θ ± εz) as one doubled forward (ZO only)."""
        est = estimate
        self.model = model.eval()  # the same function at every query: no dropout
        self.optimizer, self.seed, self.loss_fn = optimizer, seed, loss_fn
        self.eps, self.q, self.one_sided = est.eps, est.q, est.one_sided
        self.directions, self.noise, self.g_clip = est.directions, est.noise, est.g_clip
        self.rank, self.basis_every, self.chunked = est.rank, est.basis_every, est.chunked_z
        self.pair = pair and optimizer.method.pairs(self.one_sided)
        self.blocks: BlockMap = blocks if blocks is not None else build_block_map(model)
        params = self.blocks.params
        self._split_groups(est)
        self.masks = (SparseMasks(list(params), est.sparsity, est.sparsity_mask,
                                  est.sparsity_every, seed) if est.sparsity > 0 else None)
        if self.directions == "coordinate":
            self.q = coordinates.resolve_q(est.q, self.groups, params)
        self._coords = coordinates.Sampler(params, self.groups, seed) \
            if self.directions == "coordinate" else None
        optimizer.rule.init_state([p.detach() for p in params])
        self.perturbation = Perturbation(self.blocks, optimizer.rule)
        self.perturbation.install()
        self.step_index = 0
        # forward, backward, and forwards over the batch alone (a doubled forward counts
        # two: the compute it costs) in the current step
        self._passes = [0, 0, 0]
        self.streamer: BlockStreamer | None = None
        self.world = 1  # data-parallel ranks (set by data_parallel())
        self.qat = None  # edgezo.zo.qat.QAT when forwards see quantized weights
        self.graphs: StepGraphs | None = None  # graphs.attach()
        if self._coords is not None and self.forward_passes_per_step > est.max_forwards:
            self.perturbation.remove()
            raise ConfigError(coordinates.too_many(self.forward_passes_per_step,
                                                   est.max_forwards, self.q))
        self.bytes_communicated = 0
        # the basis seed whose factors were last built in one block (structured directions):
        # every query and update of its steps asks again, and need not walk the parameters
        self._bases_built: int | None = None

    def _split_groups(self, est: Estimate) -> None:
        """Which parameters take backpropagated gradients (FO), and the groups the rest
        are estimated in: one, or one per block with --block-wise."""
        params = self.blocks.params
        everything = set(range(len(params)))
        fo_only = self.optimizer.method.backprops
        self.fo_indices = (everything if fo_only
                           else resolve_fo_blocks(self.blocks, list(est.fo_blocks)))
        self.zo_indices = everything - self.fo_indices
        if not fo_only and not self.zo_indices:
            raise ConfigError("--fo-blocks covers every trainable parameter: nothing is left "
                              "for ZO; use fo-sgd or fo-adam for a first-order run")
        groups = (estimation_groups(self.model, self.blocks, est.granularity)
                  if est.block_wise else [sorted(everything)])
        self.groups = [frozenset(i for i in g if i in self.zo_indices) for g in groups]
        self.groups = [g for g in self.groups if g]
        # A group of every parameter is "all": d needs no per-parameter lookups then.
        self._active = [None if len(g) == len(params) else g for g in self.groups]

    def _direction(self, seeds: tuple[int, ...], coefs: tuple[float, ...],
                   active: frozenset[int] | None, t: int, perturb: bool = False) -> Direction:
        """d = Σ coefs·z(seeds) of step t with this run's directions, noise source and
        masks; `perturb`: a perturbation, scaled by the rule's preconditioner (HiZOO)."""
        scale = (self.optimizer.rule.preconditioner
                 if perturb and self.optimizer.method.curvature else None)
        basis = chunking.mix(self.seed, t // self.basis_every, _BASIS_SALT) if self.rank else 0
        if self.rank and self.streamer is None and basis != self._bases_built:
            bases.prepare_matrices(self.directions, basis, self.blocks.params,
                                   self.zo_indices, self.rank, not self.chunked)
            self._bases_built = basis
        if self._coords is not None:  # CGE: each seed's unit vector, on its parameter only
            coords = self._coords.of(seeds, t, self.q)
            return Direction(seeds, coefs, "coordinate", None,
                             self._coords.owners(coords), coords=coords,
                             starts=self._coords.starts)
        return Direction(seeds, coefs, self.directions, self.masks, active, self.noise,
                         self.rank, basis, scale, chunked=self.chunked)

    @property
    def zo_only(self) -> bool:
        """Every update comes from forward values alone: the run can stream its layers,
        shard its batch over ranks (one scalar per query to reduce) and replay its log."""
        return self.optimizer.method.perturbs and not self.fo_indices

    # -- counting what a step costs -----------------------------------------------------
    @property
    def forward_passes_per_step(self) -> int:
        """Forward passes one step makes (each over the batch, or the doubled batch)."""
        if self.optimizer.method.backprops:
            return 1 if self.fo_indices else 0
        return self.optimizer.method.forwards_per_step(
            q=self.q, one_sided=self.one_sided, pair=self.pair, groups=len(self.groups),
            fo=bool(self.fo_indices))

    def _count_forward(self, doubled: bool = False) -> None:
        self._passes[0] += 1
        self._passes[2] += 2 if doubled else 1

    # -- the loss at one point ------------------------------------------------------------
    def _mean(self, batch: dict, direction: Direction | None = None, sign: int = 1,
              scale: float | None = None) -> float:
        """The mean loss at θ, or with `direction` at θ + sign·a·d (a: `scale`, or ε)."""
        self._count_forward()
        return self._global_means(self._losses_at(batch, direction, scale, sign), 1)[0]

    def _losses_at(self, batch: dict, direction: Direction | None, scale: float | None,
                   sign: int | None) -> torch.Tensor:
        """Per-example losses of one forward (`_forward_at`), through the CUDA graphs where
        the engine has them (zo/graphs.py)."""
        if self.graphs is not None:  # (an eager one computes as a graph's would)
            return self.graphs.losses(batch, direction, self.eps if scale is None else scale,
                                      sign)
        return self._forward_at(batch, direction, scale, sign)

    def _forward_at(self, batch: dict, direction: Direction | None, scale: float | None,
                    sign: int | None) -> torch.Tensor:
        """Per-example losses at θ (no direction), at θ + sign·a·d, or in pair mode (sign
        None) of [x; x] at θ + a·d (first half) and θ − a·d (a: `scale`, or ε)."""
        if direction is None:
            with torch.no_grad():
                return self.loss_fn(self.model, batch)
        scale = self.eps if scale is None else scale
        p = self.perturbation
        if sign is not None:
            with p.perturbed(direction, scale, sign):
                return self.loss_fn(self.model, batch)
        doubled = double(batch)
        with p.perturbed(direction, scale, None, pair_rows=batch_rows(doubled)):
            return self.loss_fn(self.model, doubled)

    def _global_means(self, per_example: torch.Tensor, parts: int) -> list[float]:
        """Means of the `parts` equal slices of the per-example losses, over every rank."""
        means, sent = global_means(per_example.detach(), parts, self.world)
        self.bytes_communicated += sent
        return means

    def loss(self, batch: dict) -> float:
        """L(θ) at the current weights (applies any pending update first)."""
        self.perturbation.flush()
        return self._mean(batch)

    def losses(self, batch: dict, direction: Direction | int, scale: float | None = None
               ) -> tuple[float, float]:
        """L(θ + a·d) and L(θ − a·d), a = `scale` (default ε). An int is a query seed."""
        if isinstance(direction, int):
            direction = self._direction((direction,), (1.0,), None, self.step_index,
                                        perturb=True)
        scale = self.eps if scale is None else scale
        p = self.perturbation
        if self.pair:
            per_example = self._losses_at(batch, direction, scale, None)
            self._count_forward(doubled=True)
            # One host sync per query, here: g is needed as a Python scalar.
            plus, minus = self._global_means(per_example, 2)
        else:
            plus = self._mean(batch, direction, +1, scale)
            minus = self._mean(batch, direction, -1, scale)
        p.flush()  # parameters no wrapper touched still owe the previous update
        return plus, minus

    def _loss_plus(self, batch: dict, direction: Direction) -> float:
        plus = self._mean(batch, direction, +1)
        self.perturbation.flush()
        return plus

    # -- the other gradient sources --------------------------------------------------
    def _forward_gradient(self, batch: dict, direction: Direction) -> tuple[float, float]:
        self.perturbation.flush()
        self._count_forward()
        return gradients.forward_gradient(self.model, self.loss_fn, self.blocks, batch,
                                          direction)

    def _fo_backward(self, batch: dict) -> float:
        self.perturbation.flush()
        loss, ran = gradients.backward(self.model, self.loss_fn, self.blocks.params,
                                       self.fo_indices, batch)
        self._count_forward()
        self._passes[1] += ran
        return loss

    # -- the step -------------------------------------------------------------------------
    def step(self, batch: dict, lr: float) -> StepResult:
        start = time.perf_counter()
        t = self.step_index
        self._passes = [0, 0, 0]
        result = StepResult(t, math.nan, lr, 0.0)
        if self.masks is not None and self.masks.due(t):
            self.perturbation.flush()  # the pending update belongs to the old masks
            self.masks.resample(t)
        fo_loss = self._fo_backward(batch) if self.fo_indices else None
        for gi, active in enumerate(self._active):
            # Only the first group can reuse L(θ) from the FO pass: later groups see the
            # weights their predecessors moved.
            self._zo_group(batch, lr, t, gi, active, result,
                           fo_loss if gi == 0 else None)
        if fo_loss is not None:
            if math.isnan(result.loss):
                result.loss = fo_loss
            if not math.isfinite(fo_loss):
                result.skipped = True
            elif lr != 0 or self.optimizer.rule.stateful:
                gradients.apply_gradients(self.blocks.params, self.fo_indices,
                                          self.optimizer.rule, lr, t + 1, self.seed)
            for p in self.blocks.params:
                p.grad = None
        result.forward_passes, result.backward_passes, result.batch_forwards = self._passes
        result.time_s = time.perf_counter() - start
        self.step_index += 1
        return result

    def _zo_group(self, batch: dict, lr: float, t: int, gi: int, group: frozenset[int] | None,
                  result: StepResult, base: float | None) -> None:
        """Estimate and queue the update of one parameter group (base: L(θ) if known)."""
        opt = self.optimizer
        if base is None and (self.one_sided or opt.conservative or opt.method.curvature):
            base = self.loss(batch)
        seeds = [chunking.step_seed(self.seed, t, gi * self.q + i) for i in range(self.q)]
        grads = []
        for i, s in enumerate(seeds):
            plus, minus, g = self._query(batch, self._direction((s,), (1.0,), group, t,
                                                                 perturb=True), base)
            # QZO's clipping; a non-finite g stays so, and skips the step as usual
            if self.g_clip is not None and math.isfinite(g) and abs(g) > self.g_clip:
                g = math.copysign(self.g_clip, g)
                result.clipped += 1
            grads.append(g)
            if gi == 0 and i == 0:
                result.loss_plus, result.loss_minus = plus, minus
                result.loss = base if base is not None else (plus + minus) / 2
        result.seeds += seeds
        result.projected_grads += grads
        record = {"grads": grads, "move": None, "applied": False}
        result.groups.append(record)
        if not all(math.isfinite(g) for g in grads):
            result.skipped = True
            return
        if opt.method.curvature:  # HiZOO: the curvature along the perturbation
            record["curvature"] = abs(plus + minus - 2 * base) / (2 * self.eps ** 2)
        if opt.method.normalized:  # FZOO: the step divided by the queries' spread
            spread = statistics.pstdev(grads)
            if not spread > 0:  # every query agreed (or collapsed): no direction to take
                return
            record["scale"] = 1.0 / spread
        self._queue_update(batch, record, seeds, group, lr, t, base, result)

    def _query(self, batch: dict, z: Direction, base: float | None
               ) -> tuple[float, float, float]:
        """(L₊, L₋ (or L(θ)), g) of one query along z."""
        if self.optimizer.method.forward_gradient:
            value, g = self._forward_gradient(batch, z)
            return value, value, g
        if self.one_sided:
            plus = self._loss_plus(batch, z)
            return plus, base, (plus - base) / self.eps
        plus, minus = self.losses(batch, z)
        return plus, minus, (plus - minus) / (2 * self.eps)

    def _update_direction(self, record: dict, seeds: list[int], group, t: int
                          ) -> tuple[Direction, dict | None]:
        """The logged group's update as a direction and the rule's scalars: the same
        arithmetic for the live step and its replay."""
        if "coefs" in record:  # given as they are (rank feedback, Session.rank_step)
            return self._direction(tuple(seeds), tuple(record["coefs"]), group, t), None
        if "curvature" in record:  # the rule scales z itself (HiZOO)
            info = {"g": record["grads"][0], "curvature": record["curvature"]}
            return self._direction(tuple(seeds), (1.0,), group, t), info
        scale = record.get("scale", 1.0)
        # an average over q random directions; coordinate estimates are each value's own
        # partial derivative (the q coordinates together are CGE's gradient)
        per = 1 if self._coords is not None else self.q
        coefs = tuple(g * scale / per for g in record["grads"])
        return self._direction(tuple(seeds), coefs, group, t), None

    def _queue_update(self, batch: dict, record: dict, seeds: list[int], group, lr: float,
                      t: int, base: float | None, result: StepResult) -> None:
        opt = self.optimizer
        d, info = self._update_direction(record, seeds, group, t)
        step_lr = lr
        if opt.conservative:
            plus, minus = self.losses(batch, d, scale=lr) if lr > 0 else (base, base)
            # (loss, m) for θ ← θ − m·η·d; the lowest finite loss wins, ties keep θ.
            options = [(base, 0), (minus, 1), (plus, -1)]
            finite = [(v, k) for k, (v, _) in enumerate(options) if math.isfinite(v)]
            move = options[min(finite)[1]][1] if finite else 0
            result.move.append(move)
            record["move"] = move
            step_lr = move * lr
        if step_lr != 0 or opt.rule.stateful:
            self.perturbation.set_pending(PendingUpdate(d, step_lr, t + 1, info))
            record["applied"] = True

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizer state, sparsity masks and QAT masters, by name (for a snapshot)."""
        self.flush()
        out = state.tensors(self.optimizer.rule, self.masks)
        return out | (self.qat.state_tensors() if self.qat is not None else {})

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step: int,
                           mask_epoch: int | None) -> None:
        state.load(self.optimizer.rule, self.masks, tensors, mask_epoch)
        if self.qat is not None:
            self.qat.load_state_tensors(tensors)
        self.step_index = step

    def flush(self) -> None:
        """Apply the pending update now, so the weights reflect every completed step."""
        self.perturbation.flush()

    def release_scratch(self) -> None:
        """Free the perturbation workspace (a copy of the largest unit per sign), which
        the next step allocates again. Evaluation calls this: it perturbs nothing, and the
        workspace can be the size of its activations (the planner prices eval without it)."""
        self.perturbation.release_workspace()
        if self.graphs is not None:  # their kernels write the workspace that just went
            self.graphs.reset()

    def close(self) -> None:
        """Flush and remove the wrappers; the model is an ordinary HF model again (its
        streamed layers, if any, come back as CPU tensors)."""
        self.flush()
        self.graphs = None
        self.perturbation.remove()
        if self.qat is not None:
            self.qat.remove()
        if self.streamer is not None:
            self.streamer.restore("cpu")
            self.streamer.close()
            self.perturbation.streamer = self.streamer = None
