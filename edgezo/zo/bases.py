"""The bases of structured directions (lowrank, subspace): small factors per matrix,
drawn from a basis seed and kept while that seed is in use.

`exact` bases are the ones an exact structured z multiplies with (edgezo.zo.grid): the
lowrank B = V's grid values times two grid steps, as (rank x cols); the subspace
√rows·P and √cols·Qᵀ on the grid, scaled, as (rows x k) and (k x cols), k = rank_of.
The others are the raw (P, Q) and V of runs recorded with chunked products.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

import torch

from edgezo.zo import grid
from edgezo.zo.chunking import generator, is_matrix, mix, num_rows

_BASES: dict[tuple, tuple[torch.Tensor | None, torch.Tensor]] = {}
_BASIS_LOCK = threading.Lock()


def basis(kind: str, seed: int, index: int, rows: int, cols: int, rank: int,
          device: torch.device, exact: bool = False
          ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(left, right) factors of a structured direction's basis for one matrix: lowrank,
    (None, V) with V (cols x rank) N(0,1); subspace, orthonormal (P, Q), P (rows x k) and
    Q (cols x k) from QR of Gaussians, k = rank_of (at most min(rows, cols)). Cached for
    the two newest basis seeds: r(m+n) values a matrix (the planner's
    "direction_bases"). `exact`: their grid forms (the module's docstring)."""
    key = (kind, seed, index, rows, cols, rank, device, exact)
    found = _BASES.get(key)
    if found is not None:
        return found
    with _BASIS_LOCK:
        if key not in _BASES:
            _keep_two(seed)
            _BASES[key] = _make_basis(kind, seed, index, rows, cols, rank, device, exact)
        return _BASES[key]


def prepare_bases(kind: str, seed: int, matrices: Iterable[tuple[int, int, int]], rank: int,
                  device: torch.device, exact: bool = False) -> None:
    """Build the factors of every (index, rows, cols) matrix for a basis seed at once, in
    one block, before a forward needs them: the same values `basis` would make.

    Made one by one as the layers ask, each small factor that outlives the step lands
    between a layer's freed activations and keeps glibc from reusing their space for the
    next layer's larger blocks: the heap grows layer by layer, free but resident, and the
    step's peak exceeds its plan (BENCHMARKS.md, "The new methods at a quarter of
    ZO-SGD's forwards, on 500 validation rows")."""
    device = torch.device(device)
    todo = [(i, r, c) for i, r, c in matrices
            if (kind, seed, i, r, c, rank, device, exact) not in _BASES]
    if not todo:
        return
    left = kind != "lowrank"
    ranks = [rank_of(kind, rank, r, c) for _, r, c in todo]
    sizes = [((r if left else 0) + c) * k for (_, r, c), k in zip(todo, ranks, strict=True)]
    with _BASIS_LOCK:
        _keep_two(seed)
        flat = torch.empty(sum(sizes), device=device)
        offset = 0
        for (i, r, c), size, k in zip(todo, sizes, ranks, strict=True):
            block = flat[offset:offset + size]
            offset += size
            right = block[size - c * k:]
            out = ((block[:r * k].view(r, k) if left else None),
                   right.view(k, c) if exact else right.view(c, k))
            _BASES[(kind, seed, i, r, c, rank, device, exact)] = _make_basis(
                kind, seed, i, r, c, rank, device, exact, out)


def _keep_two(seed: int) -> None:
    """Drop the factors of every basis seed but the newest cached one and `seed` (call
    with the lock held)."""
    recent = list(dict.fromkeys(k[1] for k in _BASES))[-1:]
    for old in [k for k in _BASES if k[1] not in (*recent, seed)]:
        del _BASES[old]


def _make_basis(kind: str, seed: int, index: int, rows: int, cols: int, rank: int,
                device: torch.device, exact: bool = False,
                out: tuple[torch.Tensor | None, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`out`: (left, right) buffers to fill (left None for lowrank), else new tensors.
    Exact bases are made on the CPU whatever `device` is (_exact_basis), then copied
    there. Chunked runs drew on the device."""
    if exact:
        left, right = _exact_basis(kind, seed, index, rows, cols, rank)
        if out is None:
            return (None if left is None else left.to(device)), right.to(device)
        return (None if left is None else out[0].copy_(left)), out[1].copy_(right)
    def draw(n: int, salt: int, buf: torch.Tensor | None) -> torch.Tensor:
        gen = generator(device, mix(seed, index, salt))
        k = rank_of(kind, rank, rows, cols)
        buf = torch.empty(n, k, device=device) if buf is None else buf
        return buf.normal_(generator=gen)

    left_buf, right_buf = (None, None) if out is None else out
    if kind == "lowrank":
        return None, draw(cols, 2, right_buf)
    left = torch.linalg.qr(draw(rows, 1, left_buf)).Q
    right = torch.linalg.qr(draw(cols, 2, right_buf)).Q
    if out is None:
        return left.contiguous(), right.contiguous()
    return left_buf.copy_(left), right_buf.copy_(right)


def _exact_basis(kind: str, seed: int, index: int, rows: int, cols: int, rank: int
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """An exact run's bases, made on the CPU: the Gaussians as a chunked run on a CPU
    draws them, a subspace's QR in fp64 (fp32's last bits change with the number of
    threads, and the grid would carry a change to the next step), then on the grid. So a
    run, its resume and its replay get the same bases on any device and thread count (of
    one kind of CPU: torch's CPU generator draws other values on another architecture)."""
    k, cpu = rank_of(kind, rank, rows, cols), torch.device("cpu")

    def draw(n: int, salt: int) -> torch.Tensor:
        gen = generator(cpu, mix(seed, index, salt))
        return torch.empty(n, k).normal_(generator=gen).double()

    if kind == "lowrank":
        left, right = None, draw(cols, 2)
    else:
        left, right = torch.linalg.qr(draw(rows, 1)).Q, torch.linalg.qr(draw(cols, 2)).Q
    left, right = _on_grid(kind, left, right, rows, cols, rank)  # exact in fp32 as well
    return (None if left is None else left.float()), right.float()


def prepare_matrices(kind: str, seed: int, params: list[torch.Tensor], indices: Iterable[int],
                     rank: int, exact: bool = False) -> None:
    """The factors of every matrix among `params[indices]` for a basis seed, built per
    device before a forward asks for them one by one (prepare_bases says why). A streamed
    run draws them on the device a layer computes on, so it keeps building them as
    asked."""
    by_device: dict[torch.device, list[tuple[int, int, int]]] = {}
    for i in sorted(indices):
        shape = params[i].shape
        if is_matrix(shape):
            by_device.setdefault(params[i].device, []).append(
                (i, num_rows(shape), shape[1:].numel()))
    for device, matrices in by_device.items():
        prepare_bases(kind, seed, matrices, rank, device, exact)


def _on_grid(kind: str, left: torch.Tensor | None, right: torch.Tensor, rows: int, cols: int,
             rank: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The exact forms of raw bases (left (rows x k) or None, right (cols x k), k =
    rank_of; the grid's bits from `rank`): see the module's docstring and
    Direction.factors, which multiplies with them."""
    if kind == "lowrank":  # V's grid integers times U's step and V's own
        return None, grid.to_ints(right.T.contiguous(), rank).mul_(grid.step(rank) ** 2)
    # √rows·P, whose entries have unit variance, times its step and the step of the core
    # product S·(√cols·Q)ᵀ/k, whose entries have variance 1/k (Direction.factors); and
    # √cols·Qᵀ on the grid, times its step
    a = grid.to_ints(left * math.sqrt(rows), rank).mul_(
        grid.step(rank) * grid.step(rank, core_log2_sigma(left.shape[1])))
    return a, grid.to_ints(right.T * math.sqrt(cols), rank).mul_(grid.step(rank)).contiguous()


def rank_of(kind: str, rank: int, rows: int, cols: int) -> int:
    """Columns of a matrix's basis: a subspace's orthonormal P and Q have at most
    min(rows, cols) (a LoRA factor of rank 4 under --rank 8); a lowrank V has `rank`."""
    return min(rank, rows, cols) if kind == "subspace" else rank


def core_log2_sigma(rank: int) -> int:
    """log2 of the grid's σ for a subspace core product S·(√cols·Q)ᵀ/r (σ = 1/√r): a
    power of two at or above it, so that the grid's clip stays at 8σ or beyond."""
    return -math.floor(math.log2(rank) / 2)
