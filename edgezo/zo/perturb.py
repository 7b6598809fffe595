"""Forward passes at θ ± εz without ever writing θ ± εz into the master weights.

Each unit (a decoder layer, or a module outside the layers that owns trainable
parameters) gets a reversible forward wrapper. While a perturbed forward is active, the
wrapper computes its output with perturbed copies of its parameters:

- layers and small modules: a scratch copy θ_b ± εz_b filled chunk by chunk, passed to
  the module through `torch.func.functional_call` (transient: one block, or two in pair
  mode, plus one noise chunk);
- embeddings: only the rows the batch looks up, rows ± εz[rows] (no full-size scratch);
- linear heads: the output computed one row-chunk of the weight at a time.

Because the master weights are never perturbed in place, they come back bit-exactly
after any forward (MeZO's in-place θ+εz−2εz+εz does not, in fp16/bf16).

Pair mode: the batch is [x; x]; each wrapper applies +εz to the first half and −εz to the
second, so every block is visited once per step for both evaluations.

Deferred update: the update of step t (θ ← θ − η·u(g, z_t)) is applied to a parameter the
next time a wrapper touches it, right before it is perturbed with z_{t+1}; each
parameter's weights are then read and written once per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from edgezo.zo import noise
from edgezo.zo.blocks import BlockMap, Unit
from edgezo.zo.direction import Direction
from edgezo.zo.optimizers import Rule, work_dtype


@dataclass
class PendingUpdate:
    """The not-yet-applied update θ ← rule(θ, η, d) of step `t` (1-based, for Adam's bias
    correction); d is regenerated from its seeds, on the parameters it covers."""

    direction: Direction
    lr: float
    t: int


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(noise.num_rows(t.shape), -1)


def _perturbed_into(out: torch.Tensor, theta: torch.Tensor, z: torch.Tensor, scale: float
                    ) -> None:
    """out = round(θ + scale·z): summed in fp32, rounded once to out's dtype.

    Summing into a reusable fp32 buffer first avoids the temporary torch.add allocates
    when `out` has another dtype than the sum (the hot path allocates nothing).
    """
    if out.dtype in (torch.float32, torch.float64):
        torch.add(theta, z, alpha=scale, out=out)
        return
    acc = noise.thread_buffer("acc", z.numel(), torch.float32, z.device).view(z.shape)
    torch.add(theta, z, alpha=scale, out=acc)
    out.copy_(acc)


def _split(obj: Any, rows: int) -> tuple[Any, Any]:
    """Split every batch-shaped tensor (ndim >= 2, dim 0 == rows) into its two halves."""
    if isinstance(obj, torch.Tensor) and obj.dim() >= 2 and obj.shape[0] == rows:
        half = rows // 2
        return obj[:half], obj[half:]
    if isinstance(obj, (tuple, list)):
        pairs = [_split(o, rows) for o in obj]
        return type(obj)(p[0] for p in pairs), type(obj)(p[1] for p in pairs)
    if isinstance(obj, dict):
        pairs = {k: _split(v, rows) for k, v in obj.items()}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    return obj, obj


def _join(plus: Any, minus: Any, half: int) -> Any:
    """Inverse of _split on outputs; a broadcast (dim 0 == 1) output is expanded."""
    if isinstance(plus, torch.Tensor):
        if plus.dim() >= 1 and plus.shape[0] == 1 and half != 1:
            plus, minus = plus.expand(half, *plus.shape[1:]), minus.expand(half, *minus.shape[1:])
        return torch.cat([plus, minus], dim=0)
    if isinstance(plus, (tuple, list)):
        return type(plus)(_join(p, m, half) for p, m in zip(plus, minus, strict=True))
    return plus


class _RowPerturbedEmbedding(TorchFunctionMode):
    """Intercepts F.embedding on one weight and looks rows up from (W ± εz)[rows]."""

    def __init__(self, owner: Perturbation, weight: torch.Tensor, index: int):
        super().__init__()
        self.owner, self.weight, self.index = owner, weight, index

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.embedding or len(args) < 2 or args[1] is not self.weight:
            return func(*args, **kwargs)
        ids = args[0]
        owner = self.owner
        uniq, inverse = torch.unique(ids, return_inverse=True)  # sorted
        z = owner.direction.rows(self.weight.shape, self.index, uniq,
                                 work_dtype(self.weight.dtype))
        base = self.weight.detach()[uniq]
        signs = owner.signs
        # Each row is rounded exactly as a full scratch copy round(W ± εz) would be.
        tables = [torch.add(base, z, alpha=s * owner.eps).to(base.dtype) for s in signs]
        if len(signs) == 1:
            return F.embedding(inverse, tables[0])
        if ids.shape[0] == owner.pair_rows:
            half = owner.pair_rows // 2
            return torch.cat([F.embedding(inverse[:half], tables[0]),
                              F.embedding(inverse[half:], tables[1])])
        # A broadcast lookup (e.g. GPT-2 position ids of shape (1, T)).
        return _join(F.embedding(inverse, tables[0]), F.embedding(inverse, tables[1]),
                     owner.pair_rows // 2)


class Perturbation:
    """Owns the wrappers and the state of the current perturbed forward."""

    def __init__(self, block_map: BlockMap, rule: Rule):
        self.map = block_map
        self.params = block_map.params
        self.rule = rule
        self.active = False
        self.direction = Direction((0,), (1.0,))
        self.eps = 0.0
        self.signs: tuple[int, ...] = (1,)
        self.pair_rows = 0
        self.pending: PendingUpdate | None = None
        self._updated: set[int] = set()
        self._installed: dict[int, tuple[Unit, Any]] = {}
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._workspace_busy = False
        self.streamer = None  # a BlockStreamer when some layers live off the device
        for p, name in zip(self.params, block_map.names, strict=True):
            if not p.is_contiguous():
                raise ValueError(f"parameter {name} is not contiguous; edgezo needs contiguous "
                                 "parameters to regenerate z chunk by chunk")

    # -- installation ---------------------------------------------------------------
    def install(self) -> None:
        for unit in self.map.units:
            module = unit.module
            previous = module.__dict__.get("forward")  # an instance-level forward, if any
            original = module.forward

            def wrapped(*args, __unit=unit, __orig=original, **kwargs):
                return self._forward(__unit, __orig, args, kwargs)

            module.forward = wrapped
            self._installed[id(module)] = (unit, previous)

    def remove(self) -> None:
        for unit, previous in self._installed.values():
            if previous is None:
                del unit.module.forward
            else:
                unit.module.forward = previous
        self._installed.clear()

    # -- one perturbed forward ----------------------------------------------------------
    @contextmanager
    def perturbed(self, direction: Direction, eps: float, sign: int | None, pair_rows: int = 0
                  ) -> Iterator[None]:
        """Inside, every wrapped unit computes at θ + sign·ε·d (sign None: pair mode, the
        first half of the batch at θ + ε·d, the second at θ − ε·d)."""
        self.direction, self.eps = direction, eps
        self.signs = (1, -1) if sign is None else (sign,)
        self.pair_rows = pair_rows
        self.active = True
        try:
            with torch.no_grad():
                yield
        finally:
            self.active = False

    def _forward(self, unit: Unit, original, args, kwargs):
        if self.streamer is not None and self.streamer.streams(unit.module):
            with self.streamer.hold(unit.module):  # weights in, updated tensors back out
                return self._unit_forward(unit, original, args, kwargs)
        return self._unit_forward(unit, original, args, kwargs)

    def _unit_forward(self, unit: Unit, original, args, kwargs):
        if not self.active:
            return original(*args, **kwargs)
        self._apply_pending([i for _, i in unit.slots])
        covered = {local for local, i in unit.slots if self.direction.covers(i)}
        if not covered:  # block-wise or hybrid: this unit is not perturbed now
            return original(*args, **kwargs)
        if unit.kind == "embedding":
            (_, index), = unit.slots
            with _RowPerturbedEmbedding(self, self.params[index], index):
                return original(*args, **kwargs)
        if unit.kind == "linear" and "weight" in covered:
            return self._linear(unit, args, kwargs)
        return self._functional(unit, original, args, kwargs)

    def _fill(self, targets: list[tuple[int, list[torch.Tensor]]]) -> None:
        """For each (index, outs): outs[i] = round(θ_index + signs[i]·ε·z_index).

        All (parameter, chunk) pairs of the call are one pool of work, so the chunks of a
        layer's many small matrices are drawn in parallel too.
        """
        work = []
        for index, outs in targets:
            p = self.params[index].detach()
            flats = [_flat(o) for o in outs]
            work += [(p, index, k, lo, hi, flats)
                     for k, (lo, hi) in enumerate(noise.chunk_bounds(p.shape))]

        def fill(i: int) -> None:
            p, index, k, lo, hi, flats = work[i]
            z = _flat(self.direction.chunk(p.shape, index, k, p.device,
                                           dtype=work_dtype(p.dtype)))
            flat_p = _flat(p)
            for out, s in zip(flats, self.signs, strict=True):
                _perturbed_into(out[lo:hi], flat_p[lo:hi], z, s * self.eps)

        if work:
            noise.parallel_map(fill, range(len(work)), work[0][0].device)

    def _functional(self, unit: Unit, original, args, kwargs):
        params = [(local, i, self.params[i]) for local, i in unit.slots
                  if self.direction.covers(i)]
        fixed = {local: self.params[i].detach() for local, i in unit.slots
                 if not self.direction.covers(i)}
        numel = sum(p.numel() for _, _, p in params)
        dtype, device = params[0][2].dtype, params[0][2].device
        nested = self._workspace_busy  # a unit running inside another: use fresh memory
        self._workspace_busy = True
        try:
            buffers = [self._workspace(s, numel, dtype, device, fresh=nested)
                       for s in range(len(self.signs))]
            scratch: dict[str, list[torch.Tensor]] = {k: [v] * len(self.signs)
                                                      for k, v in fixed.items()}
            targets, offset = [], 0
            for local, i, p in params:
                views = [b[offset:offset + p.numel()].view(p.shape) for b in buffers]
                targets.append((i, views))
                scratch[local] = views
                offset += p.numel()
            self._fill(targets)
            module = unit.module
            if len(self.signs) == 1:
                return self._call(module, original, {k: v[0] for k, v in scratch.items()},
                                  args, kwargs)
            (a1, k1), (a2, k2) = _split((args, kwargs), self.pair_rows)
            plus = self._call(module, original, {k: v[0] for k, v in scratch.items()}, a1, k1)
            minus = self._call(module, original, {k: v[1] for k, v in scratch.items()}, a2, k2)
            return _join(plus, minus, self.pair_rows // 2)
        finally:
            self._workspace_busy = nested

    def _workspace(self, sign_slot: int, numel: int, dtype: torch.dtype, device: torch.device,
                   fresh: bool) -> torch.Tensor:
        """Scratch space for one sign's copy of a unit, reused by every unit of a step.

        Sized by the largest unit (a decoder layer): the planner's "perturbation scratch".
        """
        if fresh:
            return torch.empty(numel, dtype=dtype, device=device)
        key = (sign_slot, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def release_workspace(self) -> None:
        if self.active:
            raise RuntimeError("the workspace is in use by a perturbed forward")
        self._buffers.clear()

    def _call(self, module, original, tensors, args, kwargs):
        # functional_call goes through module.__call__ -> our wrapper; bypass it by
        # swapping the original forward in for the duration of the call.
        wrapper = module.forward
        module.forward = original
        try:
            # not strict: buffers and frozen parameters stay the module's own
            return functional_call(module, tensors, args, kwargs)
        finally:
            module.forward = wrapper

    def _linear(self, unit: Unit, args, kwargs):
        """y = x (W ± εz)ᵀ + (b ± εz_b), one row-chunk of W at a time (no full scratch)."""
        module: torch.nn.Linear = unit.module  # type: ignore[assignment]
        x = args[0] if args else kwargs["input"]
        slots = dict(unit.slots)
        weight = module.weight.detach()
        w_index = slots["weight"]
        if "bias" in slots and self.direction.covers(slots["bias"]):
            biases = [torch.empty_like(module.bias) for _ in self.signs]
            self._fill([(slots["bias"], biases)])
        else:
            biases = [None if module.bias is None else module.bias.detach()] * len(self.signs)
        if len(self.signs) == 1:
            inputs = [x]
        elif x.dim() >= 2 and x.shape[0] == self.pair_rows:
            inputs = list(_split(x, self.pair_rows))
        else:
            inputs = [x, x]
        outs = [torch.empty(*xi.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
                for xi in inputs]
        bounds = noise.chunk_bounds(weight.shape)

        def block(k: int) -> None:
            lo, hi = bounds[k]
            z = self.direction.chunk(weight.shape, w_index, k, weight.device,
                                     dtype=work_dtype(weight.dtype))
            w = noise.thread_buffer("w", z.numel(), weight.dtype, weight.device).view(z.shape)
            for xi, out, s, b in zip(inputs, outs, self.signs, biases, strict=True):
                _perturbed_into(w, weight[lo:hi], z, s * self.eps)
                out[..., lo:hi] = F.linear(xi, w, None if b is None else b[lo:hi])

        noise.parallel_map(block, range(len(bounds)), weight.device)
        return outs[0] if len(outs) == 1 else _join(outs[0], outs[1], self.pair_rows // 2)

    # -- deferred update ------------------------------------------------------------------
    def set_pending(self, update: PendingUpdate | None) -> None:
        """Queue a step's update; call flush() first so the previous one is applied."""
        if self.pending is not None:
            raise RuntimeError("set_pending() before the previous update was flushed")
        self.pending = update
        self._updated = set()
        if update is not None and update.lr == 0.0 and not self.rule.stateful:
            # Skipped, not applied as θ − 0·z, which can flip the sign of a −0.0 weight.
            self.pending = None

    def flush(self) -> None:
        """Apply the pending update to every parameter not yet visited."""
        if self.streamer is not None and self.pending is not None:
            for layer in self.streamer.layers:  # a streamed layer's update needs its weights
                slots = [i for _, i in layer.unit.slots if i not in self._updated]
                if any(self.pending.direction.covers(i) for i in slots):
                    with self.streamer.hold(layer.unit.module):
                        self._apply_pending(slots)
        self._apply_pending(range(len(self.params)))
        self.pending = None
        self._updated = set()

    def _update_target(self, index: int) -> torch.Tensor:
        """The tensor an update writes: a streamed parameter's fp32 master when it has one
        (the compute copy is re-rounded from it in mark_updated), else the parameter."""
        if self.streamer is not None:
            return self.streamer.master_view(self.params[index])
        return self.params[index].detach()

    @torch.no_grad()
    def _apply_pending(self, indices) -> None:
        """Apply the pending update to the given parameters not yet updated this step."""
        if self.pending is None:
            return
        pending = self.pending
        todo = [i for i in indices if i not in self._updated]
        self._updated.update(todo)
        todo = [i for i in todo if pending.direction.covers(i)]
        if not todo:
            return
        work = []
        for index in todo:
            p = self._update_target(index)
            work += [(index, p, k, lo, hi)
                     for k, (lo, hi) in enumerate(noise.chunk_bounds(p.shape))]
        d_of, rule = pending.direction, self.rule

        def update(i: int) -> None:
            index, p, k, lo, hi = work[i]
            d = _flat(d_of.chunk(p.shape, index, k, p.device, writable=True,
                                 dtype=work_dtype(p.dtype)))
            bits = (d_of.dither_bits(d.numel(), index, k, p.device)
                    if p.dtype == torch.bfloat16 else None)
            rule.update(_flat(p)[lo:hi], d, pending.lr, pending.t, index, lo, bits)

        noise.parallel_map(update, range(len(work)), work[0][1].device)
        if self.streamer is not None:
            for index in todo:
                self.streamer.mark_updated(self.params[index])
