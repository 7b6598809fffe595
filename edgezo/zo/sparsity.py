"""Sparse perturbation masks: perturb (and update) exactly a fraction 1 − S of each tensor.

Two ways to choose the coordinates, both redrawn every K steps:

- "random": from a seed. Each parameter's count k = round((1 − S)·n) is shared out over
  its noise chunks (largest remainder), and each chunk picks its share by a seeded
  permutation, so the mask is a pure function of (seed, epoch) and never needs more than
  one chunk of scratch to build.
- "magnitude": Sparse-MeZO's choice, the k smallest-magnitude weights of each parameter
  (ties broken by position), taken from the weights at the resampling step.

Exactly k coordinates are chosen in both cases (ZO-Bench's sparse mode zeroed Φ(s) of
them instead). Masks cost one byte per trainable parameter, which the planner counts.
"""

from __future__ import annotations

import torch

from edgezo.zo import chunking

_MASK_SALT = 0x5A


def kept_count(numel: int, sparsity: float) -> int:
    """How many coordinates of an n-element tensor a sparsity S perturbs."""
    return int(round((1.0 - sparsity) * numel))


def _shares(total: int, sizes: list[int]) -> list[int]:
    """Split `total` over parts proportionally to `sizes`, exactly (largest remainder)."""
    n = sum(sizes)
    exact = [total * s / n for s in sizes]
    shares = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: (shares[i] - exact[i], i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


class SparseMasks:
    """One boolean mask per trainable parameter (True: perturbed and updated)."""

    bytes_per_param = 1

    def __init__(self, params: list[torch.Tensor], sparsity: float, mode: str = "random",
                 every: int = 0, seed: int = 0):
        self.params, self.sparsity, self.mode = params, sparsity, mode
        self.every, self.seed = every, seed
        self.masks = [torch.zeros(p.shape, dtype=torch.bool, device=p.device) for p in params]
        self.epoch: int | None = None

    def due(self, step: int) -> bool:
        """Whether step `step` starts a new mask epoch."""
        return self.epoch is None or (self.every > 0 and step // self.every != self.epoch)

    @torch.no_grad()
    def resample(self, step: int) -> None:
        """Choose the masks of the epoch holding `step` (flush pending updates first)."""
        self.epoch = step // self.every if self.every > 0 else 0
        for index, (p, mask) in enumerate(zip(self.params, self.masks, strict=True)):
            k = kept_count(p.numel(), self.sparsity)
            if self.mode == "random":
                self._random(index, p, mask, k)
            else:
                self._magnitude(p, mask, k)

    def _random(self, index: int, p: torch.Tensor, mask: torch.Tensor, k: int) -> None:
        flat = mask.view(chunking.num_rows(p.shape), -1)
        bounds = chunking.chunk_bounds(p.shape)
        sizes = [(hi - lo) * flat.shape[1] for lo, hi in bounds]
        seed = chunking.mix(self.seed, self.epoch, index, _MASK_SALT)
        for c, ((lo, hi), share) in enumerate(zip(bounds, _shares(k, sizes), strict=True)):
            part = flat[lo:hi].view(-1)
            part.zero_()
            gen = torch.Generator(device=p.device).manual_seed(chunking.mix(seed, c))
            part[torch.randperm(part.numel(), generator=gen, device=p.device)[:share]] = True

    @staticmethod
    def _magnitude(p: torch.Tensor, mask: torch.Tensor, k: int) -> None:
        flat = mask.view(-1)
        if k == 0:
            flat.zero_()
            return
        mag = p.detach().abs().view(-1)
        threshold = mag.kthvalue(k).values
        torch.lt(mag, threshold, out=flat)
        need = k - int(flat.sum())
        # Ties at the threshold, first by position, until exactly k are chosen.
        ties = (mag == threshold).nonzero().squeeze(1)[:need]
        flat[ties] = True

    def chunk(self, index: int, lo: int, hi: int) -> torch.Tensor:
        """The mask rows [lo, hi) of a parameter, shaped like its noise chunk."""
        m = self.masks[index]
        return m.view(chunking.num_rows(m.shape), *m.shape[1:])[lo:hi]

    def rows(self, index: int, row_ids: torch.Tensor) -> torch.Tensor:
        return self.masks[index][row_ids]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "masks": self.masks}
