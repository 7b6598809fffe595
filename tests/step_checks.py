"""What a completed ZO step must have done to the weights, checked from outside the
engine's update path (for the tests of sessions, whose dtype follows the CPU)."""

from __future__ import annotations

import math

import torch

from edgezo.zo.direction import Direction


def trainable(engine) -> list[torch.Tensor]:
    """Copies of the engine's trainable tensors, with every completed step applied."""
    engine.flush()
    return [p.detach().clone() for p in engine.blocks.params]


def assert_step_applied(engine, before: list[torch.Tensor], r) -> None:
    """The step moved every trainable tensor to θ − η·(1/q)·Σ g_i·z_i, with its logged
    lr, seeds and projected gradients (z regenerated from the seeds, the sum in fp64):
    to the last bit's rounding in fp32, or to one of the two neighbouring values of a
    half-precision weight (bf16 rounds stochastically). A wrong seed, g or lr moves a
    weight by about η·g·z, far more than that."""
    assert not r.skipped and r.projected_grads
    assert all(math.isfinite(g) and g != 0 for g in r.projected_grads), r.projected_grads
    engine.flush()
    q = len(r.seeds)
    d = Direction(tuple(r.seeds), tuple(g / q for g in r.projected_grads),
                  engine.directions, source=engine.noise)
    moved = False
    for i, p in enumerate(engine.blocks.params):
        want = before[i].double() - r.lr * d.full(p.shape, i, p.device, torch.float64)
        got = p.detach().double()
        info = torch.finfo(p.dtype)
        slack = 2 * info.eps * torch.maximum(got.abs(), want.abs()) + info.tiny
        assert ((got - want).abs() <= slack).all(), engine.blocks.names[i]
        moved = moved or not torch.equal(p.detach(), before[i])
    assert moved
