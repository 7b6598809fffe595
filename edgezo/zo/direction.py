"""Directions in parameter space, described by seeds and scalars, regenerated on demand.

    d = mask ⊙ Σ_i c_i·z_i        (z_i from seed i: Gaussian or Rademacher)

One type serves every use: a query's perturbation (one seed, c = 1), the averaged
estimate of q queries (c_i = g_i/q), the conservative optimizer's trial moves, and the
deferred update. Only the seeds and the q scalars are kept, never a gradient, and every
consumer regenerates exactly the chunk of d it is about to use.

`active` restricts d to some parameters (block-wise ZO, hybrid ZO/FO): elsewhere d is 0
and the wrappers compute with the unperturbed weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgezo.zo import noise
from edgezo.zo.sparsity import SparseMasks


@dataclass(frozen=True)
class Direction:
    seeds: tuple[int, ...]
    coefs: tuple[float, ...]
    kind: str = "gaussian"
    masks: SparseMasks | None = None
    active: frozenset[int] | None = None  # parameter indices d touches; None: all

    def covers(self, index: int) -> bool:
        return self.active is None or index in self.active

    def _plain(self) -> bool:
        return len(self.seeds) == 1 and self.coefs[0] == 1.0 and self.masks is None

    def chunk(self, shape: torch.Size, index: int, k: int, device: torch.device,
              writable: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """d on noise chunk k of parameter `index`, in a thread buffer: z is drawn in fp32
        and combined in `dtype` (fp32, or fp64 for fp64 parameters).

        Seed 0's z is drawn last, so after the call the thread's "z" buffer holds it
        unscaled: `dither_bits` reads its low mantissa bits as free rounding noise.
        `writable`: d is returned in its own buffer, never the "z" one, so the caller may
        change it in place without touching those bits.
        """
        if self._plain() and not writable:  # a single query's perturbation: z itself, no copy
            return noise.chunk(shape, noise.param_seed(self.seeds[0], index), k, device,
                               self.kind)
        out = None
        for seed, coef in reversed(list(zip(self.seeds, self.coefs, strict=True))):
            z = noise.chunk(shape, noise.param_seed(seed, index), k, device, self.kind)
            if out is None:
                out = noise.thread_buffer("dir", z.numel(), dtype, device).view(z.shape)
                torch.mul(z, coef, out=out)
            else:
                out.add_(z, alpha=coef)
        if self.masks is not None:
            lo = k * noise.rows_per_chunk(shape)
            out.mul_(self.masks.chunk(index, lo, lo + out.shape[0]).view(out.shape))
        return out

    def dither_bits(self, numel: int, index: int, k: int, device: torch.device
                    ) -> torch.Tensor:
        """int32 values whose low 16 bits are uniform, for stochastic rounding of the
        update of chunk k; call right after `chunk` for the same (index, k)."""
        if self.kind == "gaussian":
            return noise.thread_buffer("z", numel, torch.float32, device).view(torch.int32)
        return noise.random_bits(numel, noise.param_seed(self.seeds[0], index), k, device)

    def rows(self, shape: torch.Size, index: int, row_ids: torch.Tensor,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """d at the given sorted, unique rows only (embedding lookups)."""
        out = None  # same order and operations as chunk(): bit-identical values
        for seed, coef in reversed(list(zip(self.seeds, self.coefs, strict=True))):
            z = noise.rows(shape, noise.param_seed(seed, index), row_ids, self.kind).to(dtype)
            out = z.mul_(coef) if out is None else out.add_(z, alpha=coef)
        if self.masks is not None:
            out.mul_(self.masks.rows(index, row_ids))
        return out

    def full(self, shape: torch.Size, index: int, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole d of one parameter: forward-gradient tangents and tests."""
        device = torch.device(device)
        out = torch.empty(shape, dtype=dtype, device=device)
        flat = out.view(noise.num_rows(shape), -1)
        for k, (lo, hi) in enumerate(noise.chunk_bounds(shape)):
            flat[lo:hi] = self.chunk(shape, index, k, device, dtype=dtype).reshape(hi - lo, -1)
        return out
