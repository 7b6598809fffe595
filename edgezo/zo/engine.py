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
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from edgezo.errors import ConfigError, unknown_choice
from edgezo.memory.measure import release_freed_memory
from edgezo.tasks.loss import batch_rows, double, example_losses
from edgezo.zo import noise
from edgezo.zo.blocks import BlockMap, build_block_map, estimation_groups, resolve_fo_blocks
from edgezo.zo.direction import Direction
from edgezo.zo.optimizers import Optimizer, work_dtype
from edgezo.zo.perturb import PendingUpdate, Perturbation, _flat
from edgezo.zo.sparsity import SparseMasks
from edgezo.zo.stream import BlockStreamer

ESTIMATES = ("two-sided", "one-sided")
_FO_SALT = 1 << 40  # query index of the FO part's rounding seed (never a ZO query's)

LossFn = Callable[[nn.Module, dict], torch.Tensor]


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
    # zo-sgd-cons, per group: m of the move θ ← θ − m·η·d kept (1: the usual step,
    # 0: stay, −1: the opposite step)
    move: list[int] = field(default_factory=list)
    skipped: bool = False  # a non-finite loss: (part of) the update was not applied
    # per ZO group, what its update was: {"grads": [q scalars], "move": m or None,
    # "applied": bool} (the seed log's record; see ZOEngine.replay)
    groups: list[dict] = field(default_factory=list)

    def log_entry(self) -> dict:
        """This step as one seed-log line: enough to redo its update without data."""
        return {"step": self.step, "lr": self.lr, "seeds": self.seeds,
                "groups": self.groups, "skipped": self.skipped}

    @property
    def seed(self) -> int | None:
        return self.seeds[0] if self.seeds else None

    @property
    def projected_grad(self) -> float:
        """The mean projected gradient of the step's queries (nan for FO-only steps)."""
        g = self.projected_grads
        return sum(g) / len(g) if g else math.nan


class _Bound:
    """Calls `model` with some parameters replaced (torch.func's functional_call), so a
    loss function written for a model can run under jvp."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        self.model, self.params = model, params

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, self.params, args, kwargs)


class ZOEngine:
    """Runs optimisation steps on a model in place."""

    def __init__(self, model: nn.Module, optimizer: Optimizer, *, eps: float = 1e-3,
                 seed: int = 0, pair: bool = True, loss_fn: LossFn = example_losses,
                 blocks: BlockMap | None = None, q: int = 1, estimate: str = "two-sided",
                 directions: str = "gaussian", block_wise: bool = False,
                 granularity: str = "layer", sparsity: float = 0.0,
                 sparsity_mask: str = "random", sparsity_every: int = 0,
                 fo_blocks: list[str | int] | None = None):
        if eps <= 0:
            raise ConfigError(f"eps must be > 0, got {eps}")
        if q < 1:
            raise ConfigError(f"q must be >= 1, got {q}")
        if estimate not in ESTIMATES:
            raise unknown_choice("estimate", estimate, ESTIMATES)
        if directions not in noise.DIRECTIONS:
            raise unknown_choice("directions", directions, noise.DIRECTIONS)
        kind = optimizer.estimator
        self._check_options(optimizer, q, estimate, directions, block_wise, sparsity, fo_blocks)
        if granularity != "layer" and not block_wise:
            raise ConfigError("granularity chooses the groups of block-wise ZO; add "
                              "--block-wise (block_wise=True) or drop it")
        if sparsity == 0 and (sparsity_mask != "random" or sparsity_every != 0):
            raise ConfigError("sparsity_mask and sparsity_every shape sparse perturbations; "
                              "set --sparsity S (0 < S < 1) or drop them")
        self.model = model.eval()  # the same function at every query: no dropout
        self.optimizer, self.eps, self.seed, self.loss_fn = optimizer, eps, seed, loss_fn
        self.q, self.one_sided, self.directions = q, estimate == "one-sided", directions
        self.pair = pair and kind == "zo"
        self.blocks: BlockMap = blocks if blocks is not None else build_block_map(model)
        params = self.blocks.params
        everything = set(range(len(params)))
        if kind == "fo":
            self.fo_indices = everything
        else:
            self.fo_indices = resolve_fo_blocks(self.blocks, fo_blocks or [])
        self.zo_indices = everything - self.fo_indices
        if kind != "fo" and not self.zo_indices:
            raise ConfigError("--fo-blocks covers every trainable parameter: nothing is left "
                              "for ZO; use fo-sgd or fo-adam for a first-order run")
        groups = (estimation_groups(model, self.blocks, granularity) if block_wise
                  else [sorted(everything)])
        self.groups = [frozenset(i for i in g if i in self.zo_indices) for g in groups]
        self.groups = [g for g in self.groups if g]
        # A group of every parameter is "all": d needs no per-parameter lookups then.
        self._active = [None if len(g) == len(params) else g for g in self.groups]
        self.masks = (SparseMasks([params[i] for i in range(len(params))], sparsity,
                                  sparsity_mask, sparsity_every, seed)
                      if sparsity > 0 else None)
        optimizer.rule.init_state([p.detach() for p in params])
        self.perturbation = Perturbation(self.blocks, optimizer.rule)
        self.perturbation.install()
        self.step_index = 0
        self._passes = [0, 0]  # forward, backward in the current step
        self._sparsity_mask = sparsity_mask
        self.streamer: BlockStreamer | None = None
        self.world = 1  # data-parallel ranks (set by data_parallel())
        self.bytes_communicated = 0

    def data_parallel(self) -> int:
        """Join the initialised torch.distributed group: every rank keeps a full replica,
        draws the same directions (same seed) and evaluates its shard of each batch; the
        per-example losses are gathered per query, so every rank computes the same g and
        applies the same update. ZO estimators only (a backward or a jvp would need its
        gradients reduced, which is DDP's job, not this)."""
        import torch.distributed as dist

        self._require_zo("data-parallel training", "run it on one process")
        self.world = dist.get_world_size()
        return self.world

    def _require_zo(self, feature: str, fix: str) -> None:
        """Streaming and data parallelism see the loss only through forward values; a
        backward (fo-*, --fo-blocks) or a jvp (forward-grad) needs every weight at once
        and its gradients reduced."""
        if self.optimizer.estimator != "zo" or self.fo_indices:
            hybrid = " with --fo-blocks" if self.fo_indices and \
                self.optimizer.estimator != "fo" else ""
            raise ConfigError(f"{feature} runs ZO estimates only; {self.optimizer.name}"
                              f"{hybrid} differentiates the loss: {fix}")

    def stream(self, layers: list[int], device: torch.device | str, tier: str = "disk",
               folder: str | None = None, buffers: int | None = None,
               master_dtype: torch.dtype | None = None) -> BlockStreamer:
        """Move the given decoder layers (indices into the layer list) off the device;
        `master_dtype=torch.float32` keeps their trainable half-precision tensors' master
        copies in fp32 (see BlockStreamer).

        Only the ZO estimator streams: a backward (fo-*, --fo-blocks) or a forward-mode
        gradient needs every weight it differentiates resident at once, and magnitude
        masks read every weight when they are drawn.
        """
        self._require_zo("streaming", "pick a ZO optimizer, or a bigger profile")
        if self.masks is not None and self._sparsity_mask == "magnitude":
            raise ConfigError("magnitude sparsity masks read every weight when drawn; with "
                              "streaming use --sparsity-mask random")
        if self.streamer is not None:
            raise RuntimeError("the engine already streams")
        units = [u for u in self.blocks.units if u.kind == "layer"]
        bad = [i for i in layers if not 0 <= i < len(units)]
        if bad:
            raise ConfigError(f"layers {bad} do not exist; the model has {len(units)} layers")
        self.perturbation.flush()
        trainable = {id(p) for p in self.blocks.params}
        self.streamer = BlockStreamer([units[i] for i in sorted(set(layers))], trainable,
                                      device, tier, folder, buffers, master_dtype)
        self.perturbation.streamer = self.streamer
        return self.streamer

    @staticmethod
    def _check_options(optimizer: Optimizer, q, estimate, directions, block_wise, sparsity,
                       fo_blocks) -> None:
        """Refuse options that would do nothing for this optimizer."""
        kind, name = optimizer.estimator, optimizer.name
        unused = []
        if kind == "fo":
            unused = [opt for opt, on in (("q", q != 1), ("estimate", estimate != "two-sided"),
                                          ("directions", directions != "gaussian"),
                                          ("block_wise", block_wise), ("sparsity", sparsity),
                                          ("fo_blocks", bool(fo_blocks))) if on]
        elif kind == "forward-grad" and estimate != "two-sided":
            unused = ["estimate"]
        if unused:
            raise ConfigError(f"{', '.join(unused)} does not apply to {name} "
                              f"({optimizer.description}); drop it or pick a ZO optimizer")

    # -- counting what a step costs -----------------------------------------------------
    @property
    def forward_passes_per_step(self) -> int:
        """Forward passes one step makes (each over the batch, or the doubled batch)."""
        kind = self.optimizer.estimator
        fo = 1 if self.fo_indices else 0
        if kind == "fo":
            return fo
        per_query = 1 if (self.pair or self.one_sided or kind == "forward-grad") else 2
        per_group = self.q * per_query
        if kind == "zo" and (self.one_sided or self.optimizer.conservative):
            per_group += 1  # L(θ)
        if self.optimizer.conservative:
            per_group += 1 if self.pair else 2  # L(θ ± η·d)
        shared = 1 if fo and (self.one_sided or self.optimizer.conservative) else 0
        return len(self.groups) * per_group + fo - shared

    # -- the loss at one point ------------------------------------------------------------
    def _mean(self, batch: dict) -> float:
        self._passes[0] += 1
        return self._global_means(self.loss_fn(self.model, batch), 1)[0]

    def _global_means(self, per_example: torch.Tensor, parts: int) -> list[float]:
        """Means of the `parts` equal slices of the per-example losses, over every rank.

        Data-parallel: each rank holds a contiguous shard of the examples, so gathering
        the per-example values in rank order rebuilds the single-process vector exactly,
        and its mean is the single-process mean bit for bit. One collective per query:
        parts x examples x 4 bytes (fp32 losses) from each rank.
        """
        values = per_example.detach()
        if self.world > 1:
            import torch.distributed as dist

            gathered = [torch.empty_like(values) for _ in range(self.world)]
            dist.all_gather(gathered, values.contiguous())
            self.bytes_communicated += values.numel() * values.element_size() * self.world
            n = values.numel() // parts
            values = torch.cat([torch.cat([g[k * n:(k + 1) * n] for g in gathered])
                                for k in range(parts)])
        return [v.mean().item() for v in values.chunk(parts)]

    def loss(self, batch: dict) -> float:
        """L(θ) at the current weights (applies any pending update first)."""
        self.perturbation.flush()
        with torch.no_grad():
            return self._mean(batch)

    def losses(self, batch: dict, direction: Direction | int, scale: float | None = None
               ) -> tuple[float, float]:
        """L(θ + a·d) and L(θ − a·d), a = `scale` (default ε). An int is a query seed."""
        if isinstance(direction, int):
            direction = Direction((direction,), (1.0,), self.directions, self.masks)
        scale = self.eps if scale is None else scale
        p = self.perturbation
        if self.pair:
            doubled = double(batch)
            with p.perturbed(direction, scale, None, pair_rows=batch_rows(doubled)):
                per_example = self.loss_fn(self.model, doubled)
                self._passes[0] += 1
            # One host sync per query, here: g is needed as a Python scalar.
            plus, minus = self._global_means(per_example, 2)
        else:
            with p.perturbed(direction, scale, +1):
                plus = self._mean(batch)
            with p.perturbed(direction, scale, -1):
                minus = self._mean(batch)
        p.flush()  # parameters no wrapper touched still owe the previous update
        return plus, minus

    def _loss_plus(self, batch: dict, direction: Direction) -> float:
        with self.perturbation.perturbed(direction, self.eps, +1):
            plus = self._mean(batch)
        self.perturbation.flush()
        return plus

    # -- estimators ---------------------------------------------------------------------
    def _forward_gradient(self, batch: dict, direction: Direction) -> tuple[float, float]:
        """(L(θ), ∇L·v) by forward-mode AD along v = d; v is materialised in the model
        dtype for the parameters d covers (the update regenerates it in fp32)."""
        self.perturbation.flush()
        primals, tangents = {}, {}
        for i, p in enumerate(self.blocks.params):
            if direction.covers(i):
                name = self.blocks.names[i]
                primals[name] = p.detach()
                tangents[name] = direction.full(p.shape, i, p.device, work_dtype(p.dtype)
                                                ).to(p.dtype)

        def loss(params):
            return self.loss_fn(_Bound(self.model, params), batch).mean()

        # Fused attention kernels have no forward-mode derivative; the math one does.
        # no_grad: forward-mode AD needs no backward graph, which would keep every
        # activation alive.
        with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            value, derivative = jvp(loss, (primals,), (tangents,))
        self._passes[0] += 1
        result = value.item(), derivative.item()
        del tangents, value, derivative
        if self.blocks.params[0].device.type == "cpu":
            # The dual forward's many short-lived buffers otherwise stay in the heap,
            # and resident memory creeps up step after step.
            release_freed_memory()
        return result

    def _fo_backward(self, batch: dict) -> float:
        """L(θ) with the exact gradient of the FO parameters in their .grad: autograd
        records only what depends on them (the ZO parameters are constants here)."""
        self.perturbation.flush()
        params = self.blocks.params
        flags = [p.requires_grad for p in params]
        for i, p in enumerate(params):
            p.requires_grad_(i in self.fo_indices)
            p.grad = None
        try:
            with torch.enable_grad():
                loss = self.loss_fn(self.model, batch).mean()
                self._passes[0] += 1
                if torch.isfinite(loss):
                    loss.backward()
                    self._passes[1] += 1
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
        return loss.item()

    @torch.no_grad()
    def _fo_update(self, lr: float, t: int) -> None:
        """Apply the rule to the FO parameters, d = their gradient, chunk by chunk."""
        rule, seed = self.optimizer.rule, noise.step_seed(self.seed, t - 1, _FO_SALT)
        work = []
        for index in sorted(self.fo_indices):
            p = self.blocks.params[index]
            grad = p.grad
            p.grad = None
            if grad is None:
                grad = torch.zeros_like(p)
            work += [(index, p.detach(), grad, k, lo, hi)
                     for k, (lo, hi) in enumerate(noise.chunk_bounds(p.shape))]

        def update(i: int) -> None:
            index, p, grad, k, lo, hi = work[i]
            g = _flat(grad)[lo:hi]
            d = noise.thread_buffer("dir", g.numel(), work_dtype(g.dtype), g.device)
            d = d.view(g.shape)
            d.copy_(g)
            bits = (noise.random_bits(d.numel(), noise.param_seed(seed, index), k, p.device)
                    if p.dtype == torch.bfloat16 else None)
            rule.update(_flat(p)[lo:hi], d, lr, t, index, lo, bits)

        if work:
            noise.parallel_map(update, range(len(work)), work[0][1].device)

    # -- the step -------------------------------------------------------------------------
    def step(self, batch: dict, lr: float) -> StepResult:
        start = time.perf_counter()
        t = self.step_index
        self._passes = [0, 0]
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
                self._fo_update(lr, t + 1)
            for p in self.blocks.params:
                p.grad = None
        result.forward_passes, result.backward_passes = self._passes
        result.time_s = time.perf_counter() - start
        self.step_index += 1
        return result

    def _zo_group(self, batch: dict, lr: float, t: int, gi: int, group: frozenset[int] | None,
                  result: StepResult, base: float | None) -> None:
        """Estimate and queue the update of one parameter group (base: L(θ) if known)."""
        opt = self.optimizer
        fg = opt.estimator == "forward-grad"
        if base is None and (self.one_sided or opt.conservative):
            base = self.loss(batch)
        seeds = [noise.step_seed(self.seed, t, gi * self.q + i) for i in range(self.q)]
        grads = []
        for i, s in enumerate(seeds):
            z = Direction((s,), (1.0,), self.directions, self.masks, group)
            if fg:
                value, g = self._forward_gradient(batch, z)
                plus = minus = value
            elif self.one_sided:
                plus, minus = self._loss_plus(batch, z), base
                g = (plus - base) / self.eps
            else:
                plus, minus = self.losses(batch, z)
                g = (plus - minus) / (2 * self.eps)
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
        d = Direction(tuple(seeds), tuple(g / self.q for g in grads), self.directions,
                      self.masks, group)
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
            self.perturbation.set_pending(PendingUpdate(d, step_lr, t + 1))
            record["applied"] = True

    # -- replay and state -----------------------------------------------------------------
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
            hybrid = " with --fo-blocks" if self.optimizer.estimator != "fo" else ""
            raise ConfigError(f"{self.optimizer.name}{hybrid} updates with backpropagated "
                              "gradients, which a seed log does not hold; resume from a "
                              "snapshot instead")
        t = entry["step"]
        if t != self.step_index:
            raise ConfigError(f"the seed log jumps from step {self.step_index} to {t}")
        self.perturbation.flush()
        if self.masks is not None and self.masks.due(t):
            self.masks.resample(t)
        if len(entry["groups"]) != len(self._active):
            raise ConfigError(f"seed log step {t} has {len(entry['groups'])} groups; this "
                              f"run has {len(self._active)} (different options?)")
        for gi, (active, group) in enumerate(zip(self._active, entry["groups"], strict=True)):
            if not group["applied"]:
                continue
            seeds = [noise.step_seed(self.seed, t, gi * self.q + i) for i in range(self.q)]
            if entry.get("seeds") and entry["seeds"][gi * self.q:(gi + 1) * self.q] != seeds:
                raise ConfigError(f"seed log step {t} was drawn with other seeds than this "
                                  "run's (a different --seed or --q?)")
            d = Direction(tuple(seeds), tuple(g / self.q for g in group["grads"]),
                          self.directions, self.masks, active)
            lr = entry["lr"] * (group["move"] if group["move"] is not None else 1)
            self.perturbation.set_pending(PendingUpdate(d, lr, t + 1))
            self.perturbation.flush()
        self.step_index = t + 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizer state and sparsity masks, by name (for a snapshot)."""
        self.flush()
        out = {}
        for key, tensors in getattr(self.optimizer.rule, "state", {}).items():
            for i, t in enumerate(tensors):
                out[f"rule.{key}.{i}"] = t
        if self.masks is not None and self.masks.epoch is not None:
            for i, m in enumerate(self.masks.masks):
                out[f"mask.{i}"] = m.to(torch.uint8)
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step: int,
                           mask_epoch: int | None) -> None:
        for key, stored in getattr(self.optimizer.rule, "state", {}).items():
            for i, t in enumerate(stored):
                t.copy_(tensors[f"rule.{key}.{i}"])
        if self.masks is not None and mask_epoch is not None:
            for i, m in enumerate(self.masks.masks):
                m.copy_(tensors[f"mask.{i}"].bool())
            self.masks.epoch = mask_epoch
        self.step_index = step

    def flush(self) -> None:
        """Apply the pending update now, so the weights reflect every completed step."""
        self.perturbation.flush()

    def release_scratch(self) -> None:
        """Free the perturbation workspace (a copy of the largest unit per sign), which
        the next step allocates again. Evaluation calls this: it perturbs nothing, and the
        workspace can be the size of its activations (the planner prices eval without it)."""
        self.perturbation.release_workspace()

    def close(self) -> None:
        """Flush and remove the wrappers; the model is an ordinary HF model again (its
        streamed layers, if any, come back as CPU tensors)."""
        self.flush()
        self.perturbation.remove()
        if self.streamer is not None:
            self.streamer.restore("cpu")
            self.streamer.close()
            self.perturbation.streamer = self.streamer = None
