"""A running log-softmax over a linear head's output spans: how a token-level loss
reads a perturbed head (Perturbation.label_logprob_sums) with each span of W ± εz built
once and no position's full logits held at once."""

from __future__ import annotations

import torch


class LogSumExp:
    """A running log-softmax over the head's output spans, at every position of `x`,
    with the logit of each position's target kept when its span comes by."""

    def __init__(self, x: torch.Tensor, targets: torch.Tensor):
        # contiguous: a strided input makes F.linear copy the weight span for every row
        self.x, self.targets = x.contiguous(), targets.clamp(min=0)
        shape, dtype = targets.shape, torch.promote_types(x.dtype, torch.float32)
        self.top = torch.full(shape, float("-inf"), dtype=dtype, device=x.device)
        self.total = torch.zeros(shape, dtype=dtype, device=x.device)
        self.picked = torch.zeros(shape, dtype=dtype, device=x.device)
        self.exact: torch.Tensor | None = None  # target logits computed apart
        self._by_span: tuple[torch.Tensor, list[int]] | None = None

    def targets_in(self, starts: list[int], k: int) -> torch.Tensor:
        """Flat indices of the positions whose target lies in span k of the spans that
        begin at `starts`: one sort, and one host sync, per head call."""
        if self._by_span is None:
            flat = self.targets.reshape(-1)
            edges = torch.tensor(starts[1:], dtype=flat.dtype, device=flat.device)
            span = torch.searchsorted(edges, flat, right=True)
            ends = torch.bincount(span, minlength=len(starts)).cumsum(0).tolist()
            self._by_span = torch.argsort(span, stable=True), [0, *ends]
        order, ends = self._by_span
        return order[ends[k]:ends[k + 1]]

    def exact_targets(self, starts: list[int], k: int, weight: torch.Tensor,
                      z: torch.Tensor, scale: float, bias: torch.Tensor | None) -> None:
        """Compute in fp32, from weight + scale·z unrounded, the logits of the targets in
        span k (rows from starts[k], z its noise): add() then uses them in place of the
        half-precision products' own values.

        Why: the head at every position in fp32 is what made a token-level loss's step
        slow; the normaliser averages the products' rounding over the vocabulary, while
        the target's own logit carries L(θ+εz) − L(θ−εz) at full precision (the projected
        gradients' difference from an fp32 head: BENCHMARKS.md, "A token-level loss").
        Each position's target lies in one span, so the whole head costs one row a
        position."""
        positions, lo = self.targets_in(starts, k), starts[k]
        local = self.targets.reshape(-1)[positions] - lo
        w = weight[lo + local].float().add_(z[local].float(), alpha=scale)
        values = (self.x.reshape(-1, self.x.shape[-1])[positions].float() * w).sum(-1)
        if bias is not None:
            values += bias[local].float()
        if self.exact is None:
            self.exact = torch.zeros(self.targets.shape, dtype=self.top.dtype,
                                     device=self.top.device)
        self.exact.view(-1)[positions] = values.to(self.exact.dtype)

    def add(self, logits: torch.Tensor, lo: int, hi: int, block: slice) -> None:
        """Fold in the logits of output rows [lo, hi) at the positions `block`."""
        targets = self.targets[:, block]
        inside = (targets >= lo) & (targets < hi)
        local = (targets - lo).clamp(0, hi - lo - 1).unsqueeze(-1)
        target_logits = logits.gather(-1, local).squeeze(-1)
        if self.exact is not None:
            target_logits = torch.where(inside, self.exact[:, block], target_logits)
            logits.scatter_(-1, local, target_logits.unsqueeze(-1))
        old = self.top[:, block]
        top = torch.maximum(old, logits.amax(-1))
        self.total[:, block].mul_(torch.exp(old - top)).add_(
            torch.exp(logits - top.unsqueeze(-1)).sum(-1))
        self.top[:, block] = top
        picked = self.picked[:, block]
        picked.copy_(torch.where(inside, target_logits, picked))

    def logprobs(self) -> torch.Tensor:
        return self.picked - self.top - torch.log(self.total)
