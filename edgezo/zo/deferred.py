"""The deferred update: the update of step t (θ ← θ − η·u(g, z_t)) is applied to a
parameter the next time a wrapper touches it, right before it is perturbed with z_{t+1},
so each parameter's weights are read and written once per step; `flush` applies what is
left. A mixin of `Perturbation` (edgezo.zo.perturb), whose wrappers call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgezo.zo import chunking, workers
from edgezo.zo.direction import Direction
from edgezo.zo.intercept import flat
from edgezo.zo.optimizers import SGD, work_dtype
from edgezo.zo.staging import GraphUnsafe


@dataclass
class PendingUpdate:
    """The not-yet-applied update θ ← rule(θ, η, d) of step `t` (1-based, for Adam's bias
    correction); d is regenerated from its seeds, on the parameters it covers."""

    direction: Direction
    lr: float
    t: int
    info: dict | None = None  # the step's scalars the rule needs beyond d (HiZOO)


class DeferredUpdate:
    """Queue, apply and flush a step's update on a Perturbation's parameters."""

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

    def _update_fused(self, todo: list[int]) -> list[int]:
        """Apply the pending ZO-SGD update to the fused pieces among `todo` (fused.py);
        returns the indices left to the span path."""
        pending, d_of = self.pending, self.pending.direction
        coef = d_of.single_coef()
        if (coef is None or type(self.rule) is not SGD or not self.rule.linear_in_d()
                or self.after_update is not None
                or not self._fuses(self.params[todo[0]].device, d_of)):
            return self._left_to_spans(todo)
        pieces, rest = self.fused.pieces(todo)
        # A CUDA graph's step (edgezo.zo.graphs): the rate is a device scalar, −η·c, the
        # runner sets before each replay, never a number the capture would keep; and
        # what a graph cannot hold is refused before anything is written.
        rate = pending.lr * coef if self.rate is None else self.rate
        if self.rate is not None:
            self._left_to_spans(rest)
            if d_of.own_dither() and any(self.params[piece.indices[0]].dtype == torch.bfloat16
                                         for piece in pieces):
                raise GraphUnsafe("a bf16 update along Rademacher z draws its dither")
        for piece in pieces:
            p = self.params[piece.indices[0]]
            seed, device = d_of.seeds[0], p.device
            z = self.fused.z(piece, d_of, seed, workers.thread_buffer(
                "fused_z", piece.numel, torch.float32, device))
            bits = None
            if d_of.own_dither() and p.dtype == torch.bfloat16:
                bits = self.fused.bits(piece, d_of, seed, workers.thread_buffer(
                    "fused_dither", piece.numel, torch.int32, device))
            self.fused.sgd_update(piece, z, rate, workers.thread_buffer(
                "fused_new", piece.numel, torch.float32, device), bits)
        return self._left_to_spans(rest)

    def _left_to_spans(self, todo: list[int]) -> list[int]:
        """`todo`, the parameters the span path updates: refused while a CUDA graph's step
        is captured, whose rate the span path would keep as a number."""
        if todo and self.rate is not None:
            raise GraphUnsafe("an update goes span by span (not plain ZO-SGD on fp32, "
                              "fp16 or bf16 weights)")
        return todo

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
        try:
            todo = self._update_fused(todo)
        except GraphUnsafe:  # refused before it wrote anything: these still owe it
            self._updated.difference_update(todo)
            raise
        if not todo:
            return
        work = []
        for index in todo:
            p = self._update_target(index)
            work += [(index, p, k, end, lo, hi)
                     for k, end, lo, hi in chunking.spans(p.shape, p.device)]
        d_of, rule = pending.direction, self.rule
        coef = d_of.single_coef() if rule.linear_in_d() else None

        def update(i: int) -> None:
            index, p, k, end, lo, hi = work[i]
            if coef is None:
                d = flat(d_of.chunk(p.shape, index, k, p.device, writable=True,
                                     dtype=work_dtype(p.dtype), end=end))
                lr = pending.lr
            else:  # d = c·z: the rule reads z, and c goes into the rate
                d = flat(d_of.z(p.shape, d_of.seeds[0], index, k, p.device, end))
                lr = pending.lr * coef
            bits = (d_of.dither_bits(d.numel(), index, k, p.device, p.shape, end)
                    if p.dtype == torch.bfloat16 else None)
            rule.update(flat(p)[lo:hi], d, lr, pending.t, index, lo, bits, pending.info)

        bf16 = any(p.dtype == torch.bfloat16 for _, p, *_ in work)
        workers.parallel_map(update, range(len(work)), work[0][1].device, d_of.draws(bf16))
        if self.after_update is not None:
            self.after_update(todo)
        if self.streamer is not None:
            for index in todo:
                self.streamer.mark_updated(self.params[index])
