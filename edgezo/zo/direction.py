"""Directions in parameter space, described by seeds and scalars, regenerated on demand.

    d = mask ⊙ scale ⊙ Σ_i c_i·z_i        (z_i from seed i)

One type serves every use: a query's perturbation (one seed, c = 1), the averaged
estimate of q queries (c_i = g_i/q), the conservative optimizer's trial moves, and the
deferred update. Only the seeds and the q scalars are kept, never a gradient, and every
consumer regenerates exactly the chunk of d it is about to use.

What z is (`kind`):
- gaussian, rademacher: i.i.d. values (noise.chunk, from torch's generator or the table);
- lowrank (LOZO): for a matrix W (m x n), z = U·Vᵀ with U (m x r) fresh from the seed and
  V (n x r) drawn from the `basis` seed, which the engine changes every few steps; U and
  V have N(0,1) entries: r(m+n) values drawn instead of mn. U comes from the noise
  source, m·r values at a seeded place of the table (wrapping around), or one generator
  call;
- subspace (SubZero): z = √(mn)/r · P·S·Qᵀ with orthonormal P (m x r), Q (n x r) from the
  basis seed (QR of Gaussians) and a fresh r x r core S from the seed, so E‖z‖² = mn as
  for a Gaussian z; r is min(rank, m, n) (a matrix has no more orthonormal columns).
Both are a product A·B of factors on a fixed-point grid (edgezo.zo.grid), exact: the same
values for any rows it is computed on, so a matrix's z is one product however many chunks
it has. Runs recorded before (`chunked`) drew a lowrank U per chunk and multiplied chunk by
chunk with unrounded factors; they keep that. Tensors that are not matrices (norms,
biases) take Gaussian z in both structured kinds.
- coordinate (DeepZero's CGE): z_i = e_{c_i}, the unit vector of one trainable value;
  `coords` holds each seed's coordinate as a flat index over the parameters' values in
  order (`starts`: where each parameter begins). No values are drawn.

`active` restricts d to some parameters (block-wise ZO, hybrid ZO/FO): elsewhere d is 0
and the wrappers compute with the unperturbed weights. `scale(index, rows)` multiplies d
elementwise on those rows (HiZOO's Σ^½, a preconditioner the rule keeps).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgezo.zo import bases, chunking, grid, noise, noise_table, workers
from edgezo.zo.chunking import is_matrix
from edgezo.zo.methods import STRUCTURED
from edgezo.zo.optimizers import work_dtype
from edgezo.zo.sparsity import SparseMasks

_U_SALT = 0x55  # where an exact lowrank U lies in the table
_S_SALT = 0x5C  # and an exact subspace core S
_DITHER_SALT = 0xD17  # the table values whose low bits dither an exact structured update
# Each thread keeps the factors of its last FACTOR_SLOTS queries and parameters, each set
# in buffers of its own (a slot's), so that d of q <= FACTOR_SLOTS queries, regenerated
# chunk by chunk and query by query, makes each query's factors once.
FACTOR_SLOTS = 8
_FACTORS = threading.local()


def _slot(name: str, slot: int, numel: int, device: torch.device) -> torch.Tensor:
    """This thread's fp32 buffer `name` of factor slot `slot`, `numel` values (grown as
    needed, never shrunk: the largest matrix's)."""
    buffers = _FACTORS.__dict__.setdefault("buffers", {})
    found = buffers.get((name, slot, device))
    if found is None or found.numel() < numel:
        found = buffers[(name, slot, device)] = torch.empty(numel, device=device)
    return found[:numel]


@dataclass(frozen=True)
class Direction:
    seeds: tuple[int, ...]
    coefs: tuple[float, ...]
    kind: str = "gaussian"
    masks: SparseMasks | None = None
    active: frozenset[int] | None = None  # parameter indices d touches; None: all
    source: str = "table"  # where i.i.d. values come from: noise.chunk
    rank: int = 0  # lowrank, subspace
    basis: int = 0  # the seed of the lowrank V / subspace bases
    scale: Callable[[int, slice | torch.Tensor], torch.Tensor] | None = None
    coords: tuple[int, ...] = ()  # coordinate: each seed's value, a flat index
    starts: tuple[int, ...] = ()  # coordinate: each parameter's first flat index
    chunked: bool = False  # structured z as runs recorded before structured_z computed it

    def _coordinates(self, index: int) -> list[tuple[float, int]]:
        """(coef, offset within parameter `index`) of the seeds whose coordinate is there."""
        lo, hi = self.starts[index], self.starts[index + 1]
        return [(c, x - lo) for c, x in zip(self.coefs, self.coords, strict=True)
                if lo <= x < hi]

    def covers(self, index: int) -> bool:
        return self.active is None or index in self.active

    def _plain(self) -> bool:
        return (len(self.seeds) == 1 and self.coefs[0] == 1.0 and self.masks is None
                and self.scale is None)

    def draws(self, bf16_update: bool = False) -> bool:
        """Whether regenerating d (with `bf16_update`, also the update's rounding dither)
        draws values from torch's generator, serial on the CPU: only such work goes to the
        noise threads (workers.parallel_map); the table is read, not drawn. Structured
        directions draw their small factors from the generator (exact ones only with the
        generator source), so the pool runs their draws in parallel (BENCHMARKS.md, "Table
        noise off the noise pool, on a CPU with native bf16")."""
        if self.kind in STRUCTURED:  # exact: the small factors and the dither from the table
            return self.chunked or self.source != "table"
        if bf16_update and self.kind in ("rademacher", "coordinate"):
            return True  # dither_bits: noise.random_bits
        return self.kind != "coordinate" and self.source != "table"

    def single_coef(self) -> float | None:
        """c when d = c·z of one query's z, with no mask or scale (an update a rule that
        is linear in d can apply from z itself); else None."""
        if (len(self.seeds) == 1 and self.masks is None and self.scale is None
                and self.kind != "coordinate"):
            return self.coefs[0]
        return None

    def z(self, shape: torch.Size, seed: int, index: int, k: int, device: torch.device,
          end: int | None = None) -> torch.Tensor:
        """z of query `seed` on noise chunk k of parameter `index` (with `end`: on chunks
        [k, end), a span) (read-only; the thread remembers it as its last z, whose low
        bits dither the update's rounding, except an exact structured z's: dither_bits)."""
        pseed = chunking.param_seed(seed, index)
        if self.kind not in STRUCTURED or not is_matrix(shape):
            kind = "rademacher" if self.kind == "rademacher" else "gaussian"
            return noise.chunk(shape, pseed, k, device, kind, self.source, end)
        lo, hi = chunking.span_bounds(shape, k, end)
        out = workers.thread_buffer("z", (hi - lo) * shape[1:].numel(), torch.float32, device)
        out = out.view(hi - lo, -1)
        factors = self.factors(shape, seed, index, device)
        if not self.chunked:  # exact: any rows in one product
            torch.matmul(factors[0][lo:hi], factors[1], out=out)
        else:  # chunk by chunk even in a span: this product's rounding depends on its shape
            for c, a, b in chunking.chunks_of_span(shape, k, end):
                self.chunk_into(out[a:b], shape, seed, index, c, factors)
        noise.remember(out)
        return out.view(hi - lo, *shape[1:])

    def factors(self, shape: torch.Size, seed: int, index: int, device: torch.device
                ) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """The factors of a matrix's structured z for query `seed`, worked out once per
        query and parameter (the thread keeps its last FACTOR_SLOTS): exact, (A, B) with
        z = A·B; chunked, what each chunk's rows multiply with: lowrank (None, Vᵀ),
        subspace (P, √(mn)/r · S·Qᵀ). None where z is i.i.d. (other kinds, and tensors
        that are not matrices). Valid until this thread has asked for FACTOR_SLOTS
        others."""
        if self.kind not in STRUCTURED or not is_matrix(shape):
            return None
        key = (self.kind, self.source, self.rank, self.basis, self.chunked, seed, index,
               tuple(shape), device)
        kept: OrderedDict = _FACTORS.__dict__.setdefault("kept", OrderedDict())
        found = kept.get(key)
        if found is not None:
            kept.move_to_end(key)
            return found[1]
        # a free slot, or the least recently used one's (its factors are dropped)
        slot = len(kept) if len(kept) < FACTOR_SLOTS else kept.popitem(last=False)[1][0]
        rows, cols = chunking.num_rows(shape), shape[1:].numel()
        r = self.rank_of(rows, cols)
        left, right = bases.basis(self.kind, self.basis, index, rows, cols, self.rank, device,
                                  exact=not self.chunked)
        pseed = chunking.param_seed(seed, index)
        if self.kind == "lowrank" and self.chunked:
            found = None, right.T
        elif self.kind == "lowrank":  # U (rows x r) on the grid; right is B already
            u = self.small_draw(_slot("u", slot, rows * r, device), pseed)
            found = grid.to_ints(u, self.rank).view(rows, r), right
        elif self.chunked:
            core = noise.gaussian(r * r, pseed, 0, device, "core").view(r, r)
            found = left, (core @ right.T).mul_(math.sqrt(rows * cols) / r)
        else:  # S on the grid times √n·Qᵀ's grid values (exact), /r on the grid
            core = self.small_draw(_slot("s", slot, r * r, device), pseed)
            product = _slot("sq", slot, r * cols, device)
            torch.mm(grid.to_ints(core, self.rank).view(r, r), right,
                     out=product.view(r, cols))
            found = left, self.core_on_grid(product, r).view(r, cols)
        kept[key] = (slot, found)
        return found

    def small_draw(self, out: torch.Tensor, pseed: int) -> torch.Tensor:
        """`out` filled with the N(0,1) values of an exact structured z's per-query factor
        (lowrank U, rows x r; subspace S, r x r) of parameter seed `pseed`: from the
        table, at a seeded place (wrapping around; fused_grid.py reads each matrix's part
        of it), or one generator call."""
        if self.source != "table":
            return noise.fill_chunk(out, pseed, 0)
        return noise_table.wrapped_into(out, self.small_seed(pseed))

    def small_seed(self, pseed: int) -> int:
        """Where small_draw's values start in the table (any integer; modulo its size)."""
        return chunking.mix(pseed, _U_SALT if self.kind == "lowrank" else _S_SALT)

    def core_on_grid(self, product: torch.Tensor, r: int) -> torch.Tensor:
        """An exact subspace core product S_int·Q̂ (r x cols, r: rank_of the matrix) as the
        grid's integers of S·(√cols·Q)ᵀ/r, in place (bases._on_grid has the steps)."""
        return grid.to_ints(product, self.rank, bases.core_log2_sigma(r),
                            grid.step(self.rank) / r)

    def rank_of(self, rows: int, cols: int) -> int:
        """The rank of a matrix's z (bases.rank_of); the grid's bits follow the run's
        rank for every matrix."""
        return bases.rank_of(self.kind, self.rank, rows, cols)

    def chunk_into(self, out: torch.Tensor, shape: torch.Size, seed: int, index: int,
                   c: int, factors: tuple | None) -> None:
        """Write z of query `seed` on noise chunk c of parameter `index` into `out` (that
        chunk's rows, viewed as (rows, cols)); `factors`: self.factors(...) for it. Every
        consumer that writes a chunk's z into a buffer of its own goes through here, or
        for an exact structured z multiplies the same factors (z, _rows_z, fused_grid.py),
        so they all hold the same values."""
        pseed = chunking.param_seed(seed, index)
        if factors is None:
            kind = "rademacher" if self.kind == "rademacher" else "gaussian"
            if self.source != "table":
                noise.fill_chunk(out, pseed, c, kind)
                return
            z = noise.chunk(shape, pseed, c, out.device, "gaussian", "table").view(out.shape)
            if kind == "rademacher":
                noise.to_signs(z, out=out)
            else:
                out.copy_(z)
            return
        left, right = factors
        lo, hi = chunking.chunk_bounds_of(shape, c)
        if self.kind == "lowrank" and self.chunked:
            u = noise.gaussian((hi - lo) * self.rank, pseed, c, out.device)
            torch.matmul(u.view(hi - lo, self.rank), right, out=out)
        else:
            torch.matmul(left[lo:hi], right, out=out)

    def chunk(self, shape: torch.Size, index: int, k: int, device: torch.device,
              writable: bool = False, dtype: torch.dtype = torch.float32,
              end: int | None = None) -> torch.Tensor:
        """d on noise chunk k of parameter `index` (with `end`: on chunks [k, end), a
        span), in a thread buffer: z is drawn in fp32 and combined in `dtype` (fp32, or
        fp64 for fp64 parameters).

        Seed 0's z is drawn last, so after the call the thread's last z (noise.last_z) is
        it, unscaled: `dither_bits` reads its low mantissa bits as free rounding noise
        (where they are random: not an exact structured z's, see own_dither).
        `writable`: d is returned in its own buffer, never z's, so the caller may change
        it in place without touching those bits.
        """
        if self.kind == "coordinate":
            lo, hi = chunking.span_bounds(shape, k, end)
            cols = shape[1:].numel()
            out = workers.thread_buffer("dir", (hi - lo) * cols, dtype, device).zero_()
            for coef, offset in self._coordinates(index):
                if lo * cols <= offset < hi * cols:
                    out[offset - lo * cols] += coef
            return out.view(hi - lo, *shape[1:])
        if self._plain() and not writable:  # a single query's perturbation: z itself, no copy
            return self.z(shape, self.seeds[0], index, k, device, end)
        out = None
        for seed, coef in reversed(list(zip(self.seeds, self.coefs, strict=True))):
            z = self.z(shape, seed, index, k, device, end)
            if out is None:
                out = workers.thread_buffer("dir", z.numel(), dtype, device).view(z.shape)
                if dtype == z.dtype:
                    torch.mul(z, coef, out=out)
                else:  # fp64 weights: the product in fp64, not fp32 then widened
                    out.copy_(z).mul_(coef)
            else:
                out.add_(z, alpha=coef)
        lo = k * chunking.rows_per_chunk(shape)
        if self.masks is not None:
            out.mul_(self.masks.chunk(index, lo, lo + out.shape[0]).view(out.shape))
        if self.scale is not None:  # (rows, cols) or (rows, 1): broadcast along each row
            out.view(out.shape[0], -1).mul_(self.scale(index, slice(lo, lo + out.shape[0])))
        return out

    def perturbation_chunk(self, shape: torch.Size, index: int, k: int,
                           device: torch.device, param_dtype: torch.dtype,
                           end: int | None = None) -> torch.Tensor:
        """d on chunk k of parameter `index` (with `end`: chunks [k, end)) for a perturbed
        copy of a `param_dtype` weight: for a bf16 weight on the CPU, where d is one
        query's plain Gaussian z from the table, z rounded to bf16 from the table's twin
        (noise_table.table_bf16; the copy is then one bf16 add, intercept.perturbed_into); else
        `chunk` in the weight's work dtype. (A structured direction's vectors, norms and
        biases, are too small for the twin to matter: they take fp32 z as its matrices
        do, so one unit's z has one dtype, as the fused path needs.)"""
        if (param_dtype == torch.bfloat16 and device.type == "cpu"
                and self.source == "table" and self._plain() and self.kind == "gaussian"):
            return noise_table.chunk_bf16(shape, chunking.param_seed(self.seeds[0], index), k,
                                    device, end)
        return self.chunk(shape, index, k, device, dtype=work_dtype(param_dtype), end=end)

    def own_dither(self) -> bool:
        """Whether a bf16 update's dither is drawn for it rather than read from z's low
        bits: a Rademacher z's are ±1's, an exact structured z's a grid's (mostly 0)."""
        return self.kind == "rademacher" or (self.kind in STRUCTURED and not self.chunked)

    def dither_bits(self, numel: int, index: int, k: int, device: torch.device,
                    shape: torch.Size | None = None, end: int | None = None) -> torch.Tensor:
        """int32 values whose low 16 bits are uniform, for stochastic rounding of the
        update of chunk k (with `end` and the parameter's `shape`: of chunks [k, end));
        call right after `chunk` for the same chunks."""
        if self.kind in STRUCTURED and not self.chunked:  # z's low bits are a grid's
            return self.table_bits(numel, index, k, device, shape, end)
        if self.kind not in ("rademacher", "coordinate"):
            return noise.last_z(numel).view(torch.int32)
        pseed = chunking.param_seed(self.seeds[0], index)
        if end is None or end == k + 1:
            return noise.random_bits(numel, pseed, k, device)
        out = workers.thread_buffer("bitspan", numel, torch.int32, device)
        lo, hi = chunking.span_bounds(shape, k, end)
        cols = numel // (hi - lo)
        for c, a, b in chunking.chunks_of_span(shape, k, end):
            out[a * cols:b * cols] = noise.random_bits((b - a) * cols, pseed, c, device)
        return out

    def dither_seed(self, seed: int) -> int:
        """The seed whose table z's low bits dither an exact structured update of query
        `seed` (table_bits; fused.Fused.bits gathers the same)."""
        return chunking.mix(seed, _DITHER_SALT)

    def table_bits(self, numel: int, index: int, k: int, device: torch.device,
                   shape: torch.Size | None = None, end: int | None = None) -> torch.Tensor:
        """An exact structured update's dither (its z is on a grid: most of its low bits
        are 0): the low bits of the table's values where the Gaussian z of a salted seed
        lies, on chunk k (or chunks [k, end)); int32, read-only."""
        pseed = chunking.param_seed(self.dither_seed(self.seeds[0]), index)
        if end is None or end == k + 1:
            return noise_table.table_slice(numel, pseed, k, device).view(torch.int32)
        out = workers.thread_buffer("bitspan", numel, torch.int32, device)
        noise_table.table_span(shape, pseed, k, end, device, out.view(torch.float32))
        return out

    def rows(self, shape: torch.Size, index: int, row_ids: torch.Tensor,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """d at the given sorted, unique rows only (embedding lookups)."""
        if self.kind == "coordinate":
            cols = shape[1:].numel()
            out = torch.zeros(len(row_ids), cols, dtype=dtype, device=row_ids.device)
            for coef, offset in self._coordinates(index):
                hit = (row_ids == offset // cols).nonzero()
                if len(hit):
                    out[hit[0, 0], offset % cols] += coef
            return out.view(len(row_ids), *shape[1:])
        out = None  # same order and operations as chunk(): bit-identical values
        for seed, coef in reversed(list(zip(self.seeds, self.coefs, strict=True))):
            z = self._rows_z(shape, seed, index, row_ids).to(dtype)
            out = z.mul_(coef) if out is None else out.add_(z, alpha=coef)
        if self.masks is not None:
            out.mul_(self.masks.rows(index, row_ids))
        if self.scale is not None:
            out.view(out.shape[0], -1).mul_(self.scale(index, row_ids))
        return out

    def _rows_z(self, shape: torch.Size, seed: int, index: int, row_ids: torch.Tensor
                ) -> torch.Tensor:
        """z of query `seed` at the given rows: from the table in one gather, else drawing
        the chunks that hold them."""
        if self.source == "table" and self.kind in ("gaussian", "rademacher"):
            z = noise_table.table_rows(shape, chunking.param_seed(seed, index), row_ids)
            return noise.to_signs(z) if self.kind == "rademacher" else z
        if self.kind in STRUCTURED and is_matrix(shape) and not self.chunked:
            left, right = self.factors(shape, seed, index, row_ids.device)
            return (left.index_select(0, row_ids) @ right).view(len(row_ids), *shape[1:])
        return noise.rows(shape, row_ids, lambda k: self.z(shape, seed, index, k,
                                                           row_ids.device), self.draws())

    def full(self, shape: torch.Size, index: int, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole d of one parameter: forward-gradient tangents and tests."""
        device = torch.device(device)
        out = torch.empty(shape, dtype=dtype, device=device)
        flat = out.view(chunking.num_rows(shape), -1)
        for k, (lo, hi) in enumerate(chunking.chunk_bounds(shape)):
            flat[lo:hi] = self.chunk(shape, index, k, device, dtype=dtype).reshape(hi - lo, -1)
        return out
