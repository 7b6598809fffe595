"""Perturbed computations that never build a perturbed copy of a whole tensor: they
intercept the functional call that uses a weight and compute with θ ± εz on the fly.

- embeddings: F.embedding on the weight looks rows up from (W ± εz)[rows] (only the
  looked-up rows are built);
- linear maps inside a unit: F.linear on a covered weight computes its output one span
  of rows of W at a time (LINEAR_SPAN; a whole SmolLM2 matrix on the CPU), from one
  span-sized buffer (the perturbed rows, built chunk by chunk from z), when z is cheap to
  read (the table, structured directions) and the device is one of
  perturb.CHUNKED_LINEAR_DEVICES (the CPU): the unit then needs no layer-sized scratch
  copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from edgezo.zo import chunking, workers
from edgezo.zo.batch import join_pair
from edgezo.zo.blocks import Unit
from edgezo.zo.optimizers import work_dtype
from edgezo.zo.staging import static

if TYPE_CHECKING:
    from edgezo.zo.perturb import Perturbation


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(chunking.num_rows(t.shape), -1)


def perturbed_into(out: torch.Tensor, theta: torch.Tensor, z: torch.Tensor, scale: float
                   ) -> None:
    """out = round(θ + scale·z): summed in fp32, rounded once to out's dtype.

    A bf16 z (the table's twin: Direction.perturbation_chunk) with bf16 θ and out is one
    bf16 add, where torch also rounds `scale` to bf16. The perturbation is then s·ε'·z'
    with ε' and z' within 2^-9 of ε and z, a smaller change than the rounding of θ ± εz
    itself; the estimate still divides by ε, and the update still reads the fp32 z.
    Otherwise summing into a reusable fp32 buffer first avoids the temporary torch.add
    allocates when `out` has another dtype than the sum (the hot path allocates nothing).
    """
    if z.dtype == torch.bfloat16:
        if out.dtype == theta.dtype == torch.bfloat16:
            torch.add(theta, z, alpha=scale, out=out)
            return
        z = z.float()  # a unit whose copies hold other dtypes: its z' all the same
    if out.dtype in (torch.float32, torch.float64) or out.device.type == "cuda":
        # CUDA computes a mixed-dtype add in fp32 and rounds on the store: no temporary
        torch.add(theta, z, alpha=scale, out=out)
        return
    # On the CPU, torch.add(theta, z, out=acc) would first widen θ into a temporary of its
    # own; copying θ into acc and adding in place gives the same sum, in acc alone.
    acc = workers.thread_buffer("acc", z.numel(), torch.float32, z.device).view(z.shape)
    acc.copy_(theta).add_(z, alpha=scale)
    out.copy_(acc)


class RowPerturbedEmbedding(TorchFunctionMode):
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
        if static():  # as a CUDA graph's: each token's row (the unique rows' values)
            uniq = ids.reshape(-1)
            inverse = torch.arange(uniq.numel(), device=ids.device).view(ids.shape)
        else:
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
        return join_pair(F.embedding(inverse, tables[0]), F.embedding(inverse, tables[1]),
                     owner.pair_rows // 2)


def linear_slots(unit: Unit) -> dict[int, tuple[int, int | None]]:
    """{id(weight): (weight index, bias index or None)} for the nn.Linear maps inside a
    unit whose weight is trainable: what PerturbedLinears computes span by span."""
    slots = dict(unit.slots)
    out = {}
    for name, module in unit.module.named_modules():
        prefix = f"{name}." if name else ""
        if type(module) is nn.Linear and f"{prefix}weight" in slots:
            out[id(module.weight)] = (slots[f"{prefix}weight"], slots.get(f"{prefix}bias"))
    return out


# Values a span of a linear map's weight holds at most, where the map computes from z
# (perturb.CHUNKED_LINEAR_DEVICES): on the CPU, 1M values, so SmolLM2's matrices are one
# span each. One matrix product per map instead of one per 256K-value chunk gives the
# kernels larger products and the host fewer calls (BENCHMARKS.md, "Step time"), for one
# span-sized buffer: the perturbed weight, built chunk by chunk (each chunk's z, from the
# table, is read in place).
LINEAR_SPAN: dict[str, int] = {"cpu": 1 << 20}


class PerturbedLinears(TorchFunctionMode):
    """F.linear(x, W, b) on a mapped weight, computed as x·(W + s·ε·z)ᵀ + (b + s·ε·z_b) one
    span of rows of W at a time (s: the half's sign; LINEAR_SPAN)."""

    def __init__(self, owner: Perturbation, slots: dict[int, tuple[int, int | None]],
                 sign: int):
        super().__init__()
        self.owner, self.slots, self.sign = owner, slots, sign

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        found = self.slots.get(id(weight))
        if found is None:
            return func(*args, **kwargs)
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return self._chunked(x, weight.detach(), found, bias)

    def _chunked(self, x: torch.Tensor, weight: torch.Tensor, found: tuple[int, int | None],
                 bias: torch.Tensor | None) -> torch.Tensor:
        owner, (w_index, b_index) = self.owner, found
        scale = self.sign * owner.eps
        if bias is not None:
            bias = bias.detach()
            if b_index is not None and owner.direction.covers(b_index):
                z = owner.direction.perturbation_chunk(  # every chunk: a span
                    bias.shape, b_index, 0, bias.device, bias.dtype,
                    len(chunking.chunk_bounds(bias.shape)))
                bias = torch.add(bias, z.view(bias.shape), alpha=scale).to(bias.dtype)
        bias_of = (lambda lo, hi: None) if bias is None else (lambda lo, hi: bias[lo:hi])
        device = weight.device
        spans = chunking.spans(weight.shape, device, LINEAR_SPAN.get(device.type))
        out = (None if len(spans) == 1 else
               torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device))
        for k, end, lo, hi in spans:
            w = workers.thread_buffer("w", weight[lo:hi].numel(), weight.dtype,
                                    device).view(hi - lo, *weight.shape[1:])
            # The span's weight is built chunk by chunk, each from its own z: the table's
            # chunks are read in place, where gathering the span's z into a buffer first
            # costs an extra pass over it and a span-sized buffer (BENCHMARKS.md, "Step
            # time").
            for c, a, b in chunking.chunks_of_span(weight.shape, k, end):
                z = owner.direction.perturbation_chunk(weight.shape, w_index, c, device,
                                                       weight.dtype)
                perturbed_into(w[a:b], weight[lo + a:lo + b], z, scale)
            if out is None:  # one span: the whole weight
                return F.linear(x, w, bias_of(lo, hi))
            out[..., lo:hi] = F.linear(x, w, bias_of(lo, hi))
        return out
