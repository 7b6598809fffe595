"""The two gradient sources beside ZO estimates: the forward gradient (∇L·v by jvp) and
backpropagation (the FO baselines, and the FO blocks of a hybrid step).

Both feed the same update rules as ZO, chunk by chunk, so fo-adam is zo-adam with d = ∇L.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from edgezo.device.heap import release_freed_memory
from edgezo.zo import chunking, noise, workers
from edgezo.zo.blocks import BlockMap
from edgezo.zo.direction import Direction
from edgezo.zo.intercept import flat
from edgezo.zo.optimizers import Rule, work_dtype

LossFn = Callable[[nn.Module, dict], torch.Tensor]
FO_SALT = 1 << 40  # query index of the FO part's rounding seed (never a ZO query's)


class _Bound:
    """Calls `model` with some parameters replaced (torch.func's functional_call), so a
    loss function written for a model can run under jvp."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        self.model, self.params = model, params

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, self.params, args, kwargs)


def forward_gradient(model: nn.Module, loss_fn: LossFn, blocks: BlockMap, batch: dict,
                     direction: Direction) -> tuple[float, float]:
    """(L(θ), ∇L·v) by forward-mode AD along v = d; v is materialised in the model dtype
    for the parameters d covers (the update regenerates it in fp32)."""
    primals, tangents = {}, {}
    for i, p in enumerate(blocks.params):
        if direction.covers(i):
            name = blocks.names[i]
            primals[name] = p.detach()
            tangents[name] = direction.full(p.shape, i, p.device, work_dtype(p.dtype)
                                            ).to(p.dtype)

    def loss(params):
        return loss_fn(_Bound(model, params), batch).mean()

    # Fused attention kernels have no forward-mode derivative; the math one does.
    # no_grad: forward-mode AD needs no backward graph, which would keep every activation.
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        value, derivative = jvp(loss, (primals,), (tangents,))
    result = value.item(), derivative.item()
    del tangents, value, derivative
    if blocks.params[0].device.type == "cpu":
        # The dual forward's many short-lived buffers otherwise stay in the heap, and
        # resident memory creeps up step after step.
        release_freed_memory()
    return result


def backward(model: nn.Module, loss_fn: LossFn, params: list[nn.Parameter],
             fo_indices: set[int], batch: dict) -> tuple[float, bool]:
    """(L(θ), whether a backward ran) with the exact gradient of the FO parameters in
    their .grad: autograd records only what depends on them (the rest are constants)."""
    flags = [p.requires_grad for p in params]
    for i, p in enumerate(params):
        p.requires_grad_(i in fo_indices)
        p.grad = None
    ran = False
    try:
        with torch.enable_grad():
            loss = loss_fn(model, batch).mean()
            if torch.isfinite(loss):
                loss.backward()
                ran = True
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return loss.item(), ran


@torch.no_grad()
def apply_gradients(params: list[nn.Parameter], fo_indices: set[int], rule: Rule, lr: float,
                    t: int, seed: int) -> None:
    """The rule on the FO parameters with d = their gradient, chunk by chunk; bf16
    weights round stochastically with seeded bits (so a resume rounds the same way)."""
    step_seed = chunking.step_seed(seed, t - 1, FO_SALT)
    work = []
    for index in sorted(fo_indices):
        p = params[index]
        grad = p.grad
        p.grad = None
        if grad is None:
            grad = torch.zeros_like(p)
        work += [(index, p.detach(), grad, k, lo, hi)
                 for k, (lo, hi) in enumerate(chunking.chunk_bounds(p.shape))]

    def update(i: int) -> None:
        index, p, grad, k, lo, hi = work[i]
        g = flat(grad)[lo:hi]
        d = workers.thread_buffer("dir", g.numel(), work_dtype(g.dtype), g.device).view(g.shape)
        d.copy_(g)
        bits = (noise.random_bits(d.numel(), chunking.param_seed(step_seed, index), k, p.device)
                if p.dtype == torch.bfloat16 else None)
        rule.update(flat(p)[lo:hi], d, lr, t, index, lo, bits)

    if work:  # bf16 weights draw their rounding bits from the generator
        workers.parallel_map(update, range(len(work)), work[0][1].device,
                           draws=any(p.dtype == torch.bfloat16 for _, p, *_ in work))
