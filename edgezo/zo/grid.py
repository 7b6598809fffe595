"""Structured directions' factors on a fixed-point grid, so that z = A·B is exact.

A structured z (lowrank U·Vᵀ, subspace P·S·Qᵀ) is a matrix product of a tall factor A
(rows x r) and a wide one B (r x cols). A floating-point product rounds by the order it
sums its r terms in, and that order depends on the kernel: on the shape of the rows it
is asked for (a chunk, a span, a piece of a unit), on the device and on the library.
Then every consumer of z (the perturbed copy, the update, an embedding's rows) would
have to cut the rows the same way, one product per 256K-value chunk: host time on a
GPU, where each product is a kernel launch (benchmarks/step_ops.py).

On the grid every entry of A is an integer of at most 2^p in magnitude and every entry
of B an integer times a power of two, so each product a·b is exact in fp32 and so is
every partial sum while r·2^(2p) ≤ 2^24: the product has one value however it is
computed, whole or by any rows, on a CPU or a GPU, with or without fused multiply-adds,
and with TF32 (p ≤ 10 keeps each integer within its 11 significant bits). Not with
torch.set_float32_matmul_precision("medium"), which lets a CPU multiply fp32 in bf16 (8
significant bits); edgezo leaves the default.

A factor of N(0, σ²) values goes on the grid as round(x·2^(p-3)/σ) clipped to ±2^p:
steps of σ/2^(p-3) (σ/128 at p = 10), clipped at 8σ. A subspace core product's values
are only roughly N(0, σ²), so a rare one may be clipped; every path clips it alike.
"""

from __future__ import annotations

import math

import torch


def bits(rank: int) -> int:
    """p: the integers' magnitude bits for rank r, so that r·2^(2p) ≤ 2^24 (and p ≤ 10)."""
    return min(10, (24 - math.ceil(math.log2(rank))) // 2)


def to_ints(x: torch.Tensor, rank: int, log2_sigma: int = 0, scale: float = 1.0
            ) -> torch.Tensor:
    """scale·x (N(0, σ²) values, σ = 2^log2_sigma) as the grid's integers, in place. Each
    operation is elementwise and rounds once, so the integers do not depend on where a
    value lies in its tensor or on the device."""
    p = bits(rank)
    return x.mul_(scale * 2.0 ** (p - 3 - log2_sigma)).round_().clamp_(-(2 ** p), 2 ** p)


def step(rank: int, log2_sigma: int = 0) -> float:
    """The value of one unit of to_ints(x, rank, log2_sigma): a power of two."""
    return 2.0 ** (3 - bits(rank) + log2_sigma)
