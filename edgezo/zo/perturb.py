"""Forward passes at θ ± εz without ever writing θ ± εz into the master weights.

Each unit (a decoder layer, or a module outside the layers that owns trainable
parameters) gets a reversible forward wrapper. While a perturbed forward is active, the
wrapper computes its output with perturbed copies of its parameters:

- layers and small modules: a scratch copy θ_b ± εz_b filled chunk by chunk (on CUDA:
  a piece of parameters at a time, fused.py; span by span otherwise,
  chunking.spans), passed to the module through `torch.func.functional_call`
  (transient: one block, or two in pair mode, plus one noise chunk); on the CPU, with z
  cheap to read, the unit's linear maps compute from z instead (intercept.PerturbedLinears)
  and only its other parameters are copied;
- embeddings: only the rows the batch looks up, rows ± εz[rows] (no full-size scratch);
- linear heads: the output computed one row-chunk (span, on CUDA) of the weight at a
  time.

Because the master weights are never perturbed in place, they come back bit-exactly
after any forward (MeZO's in-place θ+εz−2εz+εz does not, in fp16/bf16).

Pair mode: the batch is [x; x]; each wrapper applies +εz to the first half and −εz to the
second, so every block is visited once per step for both evaluations.

The update of a step is deferred to the next forward that touches each parameter
(edgezo.zo.deferred).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch.func import functional_call

from edgezo.zo import chunking, fused, noise_table, workers
from edgezo.zo.batch import join_pair, split_pair
from edgezo.zo.blocks import BlockMap, Unit
from edgezo.zo.deferred import DeferredUpdate, PendingUpdate
from edgezo.zo.direction import Direction
from edgezo.zo.head import PerturbedHead
from edgezo.zo.intercept import (
    PerturbedLinears,
    RowPerturbedEmbedding,
    flat,
    linear_slots,
    perturbed_into,
)
from edgezo.zo.methods import STRUCTURED
from edgezo.zo.optimizers import Rule, work_dtype

# Where a unit's linear maps compute from z span by span (intercept.PerturbedLinears)
# instead of from a perturbed scratch copy of the unit. On the CPU that saves the copy's
# memory for little time. On CUDA the torch-function mode it needs runs Python for every
# operation of the unit, which bounds a small model's step (BENCHMARKS.md, "On a GPU"):
# there units take scratch copies, filled and updated a piece at a time (fused.py).
CHUNKED_LINEAR_DEVICES = ("cpu",)


class Perturbation(DeferredUpdate, PerturbedHead):
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
        self._views: dict[tuple, tuple] = {}  # _scratch's views of the workspace
        self._linears: dict[int, dict[int, tuple[int, int | None]]] = {}
        self._workspace_busy = False
        self.streamer = None  # a BlockStreamer when some layers live off the device
        # called with the indices of the parameters an update just wrote (QAT)
        self.after_update = None
        # While a CUDA graph's step is recorded or captured (edgezo.zo.graphs): the
        # update's rate as a device scalar (staging.static() says when a forward takes
        # no shape the data decides).
        self.rate: torch.Tensor | None = None
        self.fused = fused.Fused(self.params)
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
            if unit.kind == "linear":  # a token-level loss asks the head for log p (loss.py)
                module.label_logprob_sums = functools.partial(self.label_logprob_sums, module)
            self._installed[id(module)] = (unit, previous)

    def remove(self) -> None:
        self.fused = fused.Fused(self.params)  # its views would keep the weights alive
        self._views.clear()
        for unit, previous in self._installed.values():
            if previous is None:
                del unit.module.forward
            else:
                unit.module.forward = previous
            unit.module.__dict__.pop("label_logprob_sums", None)
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
            with RowPerturbedEmbedding(self, self.params[index], index):
                return original(*args, **kwargs)
        if unit.kind == "linear" and "weight" in covered:
            return self._linear(unit, args, kwargs)
        return self._functional(unit, original, args, kwargs)

    def _fill(self, targets: list[tuple[int, list[torch.Tensor]]],
              signs: tuple[int, ...] | None = None) -> None:
        """For each (index, outs): outs[i] = round(θ_index + signs[i]·ε·z_index) (signs:
        the forward's, by default).

        All (parameter, chunk) pairs of the call are one pool of work, so the chunks of a
        layer's many small matrices are drawn in parallel too.
        """
        signs = self.signs if signs is None else signs
        work = []
        for index, outs in targets:
            p = self.params[index].detach()
            flats = [flat(o) for o in outs]
            work += [(p, index, k, end, lo, hi, flats)
                     for k, end, lo, hi in chunking.spans(p.shape, p.device)]

        def fill(i: int) -> None:
            p, index, k, end, lo, hi, flats = work[i]
            z = flat(self.direction.perturbation_chunk(p.shape, index, k, p.device,
                                                       p.dtype, end))
            flat_p = flat(p)
            for out, s in zip(flats, signs, strict=True):
                perturbed_into(out[lo:hi], flat_p[lo:hi], z, s * self.eps)

        if work:
            workers.parallel_map(fill, range(len(work)), work[0][0].device,
                               self.direction.draws())

    def _fuses(self, device: torch.device, direction: Direction) -> bool:
        """Whether parameters on `device` take the fused path (fused.py) for this
        direction: resident weights, and z with values (a coordinate direction's has
        none: its few entries go straight into the span path's copies)."""
        return (device.type in fused.FUSED_DEVICES and self.streamer is None
                and direction.kind != "coordinate")

    def _fill_fused(self, targets: list[tuple[int, list[torch.Tensor]]],
                    buffers: list[torch.Tensor], keep: bool = True
                    ) -> list[tuple[int, list[torch.Tensor]]]:
        """Fill the scratch copies of the fused pieces among `targets` (laid end to end
        in `buffers`, one per sign); returns the targets left to `_fill`. `keep`: the
        buffers are the reused workspace, whose slices are kept (not a nested unit's
        fresh ones, which must go when it ends)."""
        if not targets or not self.direction._plain():
            return targets
        first = self.params[targets[0][0]]
        if not self._fuses(first.device, self.direction):
            return targets
        where, offset = {}, 0
        for i, _ in targets:
            where[i] = offset
            offset += self.params[i].numel()
        pieces, rest = self.fused.pieces([i for i, _ in targets])
        left = set(rest)
        direction = self.direction
        for piece in pieces:
            p = self.params[piece.indices[0]]
            # as perturbation_chunk: bf16 weights on the CPU (where only tests fuse) read
            # the table's bf16 twin where z is Gaussian
            twin = (p.dtype == torch.bfloat16 and p.device.type == "cpu"
                    and direction.kind == "gaussian" and direction.source == "table")
            if p.dtype != buffers[0].dtype:  # a copy in another dtype: rounded once, by _fill
                left.update(piece.indices)
                continue
            z = workers.thread_buffer("fused_z16" if twin else "fused_z", piece.numel,
                                    torch.bfloat16 if twin else work_dtype(p.dtype), p.device)
            self.fused.z(piece, direction, direction.seeds[0], z,
                         noise_table.table_bf16 if twin else noise_table.table)
            first, row, _ = piece.segments[0]  # where the piece starts in the copies
            lo = where[first] + row * chunking.row_width(self.params[first].shape)
            outs = [self.fused.window(b, lo, piece.numel, s) if keep
                    else b[lo:lo + piece.numel] for s, b in enumerate(buffers)]
            self.fused.perturb(piece, outs, z, [s * self.eps for s in self.signs])
        return [t for t in targets if t[0] in left]

    def _cheap_z(self, device: torch.device) -> bool:
        """z that costs a memory read to regenerate (the table, structured directions),
        on a device where computing with it beats a scratch copy (CHUNKED_LINEAR_DEVICES):
        pair mode then fills one scratch copy per half instead of holding both."""
        return device.type in CHUNKED_LINEAR_DEVICES and (
            self.direction.source == "table" or self.direction.kind in STRUCTURED)

    def _functional(self, unit: Unit, original, args, kwargs):
        """The unit at θ ± εz. Its nn.Linear maps compute span by span when z is cheap
        to read (intercept.PerturbedLinears); the other covered parameters (or all, with
        the generator) go to the module as perturbed scratch copies (functional_call)."""
        cheap = self._cheap_z(self.params[unit.slots[0][1]].device)
        linears = self._linear_slots(unit) if cheap else {}
        in_linears = {i for w, b in linears.values() for i in (w, b) if i is not None}
        params = [(local, i, self.params[i]) for local, i in unit.slots
                  if self.direction.covers(i) and i not in in_linears]
        fixed = {local: self.params[i].detach() for local, i in unit.slots
                 if not self.direction.covers(i) and i not in in_linears}
        slots = 1 if cheap else len(self.signs)
        nested = self._workspace_busy  # a unit running inside another: use fresh memory
        self._workspace_busy = True
        try:
            scratch, targets, buffers = self._scratch(params, fixed, slots, nested)
            if slots == len(self.signs):  # each sign its own copy, all filled at once
                targets = self._fill_fused(targets, buffers, keep=not nested)
            halves = ([(args, kwargs)] if len(self.signs) == 1
                      else list(split_pair((args, kwargs), self.pair_rows)))
            outs = []
            for h, ((a, k), sign) in enumerate(zip(halves, self.signs, strict=True)):
                slot = 0 if slots == 1 else h
                if targets and slots == 1:
                    self._fill(targets, (sign,))
                elif targets and h == 0:
                    self._fill(targets)  # both signs from one draw of z
                tensors = {n: v[slot] for n, v in scratch.items()}
                with PerturbedLinears(self, linears, sign) if linears else nullcontext():
                    outs.append(self._call(unit.module, original, tensors, a, k))
            return outs[0] if len(outs) == 1 else join_pair(outs[0], outs[1], self.pair_rows // 2)
        finally:
            self._workspace_busy = nested

    def _linear_slots(self, unit: Unit) -> dict[int, tuple[int, int | None]]:
        key = id(unit.module)
        if key not in self._linears:
            self._linears[key] = linear_slots(unit)
        return self._linears[key]

    def _scratch(self, params, fixed, slots: int, nested: bool):
        """Scratch copies (one per slot) of the covered parameters, as views of the
        reusable workspace (laid end to end in the order of `params`), the fill targets
        and the workspace buffers. The views are kept while the workspace and the
        parameters are the same: a unit makes none after its first step."""
        if not params:
            return {k: [v] * slots for k, v in fixed.items()}, [], []
        numel = sum(p.numel() for _, _, p in params)
        dtype, device = params[0][2].dtype, params[0][2].device
        buffers = [self._workspace(s, numel, dtype, device, fresh=nested) for s in range(slots)]
        key = (tuple((local, i) for local, i, _ in params), tuple(fixed), slots)
        memory = (tuple(b.data_ptr() for b in buffers),
                  tuple(v.data_ptr() for v in fixed.values()))
        found = None if nested else self._views.get(key)
        if found is not None and found[2] == memory:
            return found[0], found[1], buffers
        scratch: dict[str, list[torch.Tensor]] = {k: [v] * slots for k, v in fixed.items()}
        targets, offset = [], 0
        for local, i, p in params:
            views = [b[offset:offset + p.numel()].view(p.shape) for b in buffers]
            targets.append((i, views))
            scratch[local] = views
            offset += p.numel()
        if not nested:  # a kept view holds its memory: an equal pointer is the same buffer
            self._views[key] = (scratch, targets, memory)
        return scratch, targets, buffers

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
        return self.fused.window(buf, 0, numel, ("workspace", sign_slot))

    def release_workspace(self) -> None:
        if self.active:
            raise RuntimeError("the workspace is in use by a perturbed forward")
        self._buffers.clear()
        self._views.clear()  # its views would keep the workspace alive
        self.fused.release()

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
