"""A running log-softmax over a linear head's output spans: how a token-level loss
reads a perturbed head (Perturbation.label_logprob_sums) with each span of W ± εz built
once and no position's full logits held at once."""

from __future__ import annotations

import torch


class LogSumExp:
    """A running log-softmax over the head's output spans, at every position of `x`,
    with the logit of each position's target kept when its span comes by."""

    def __init__(self, x: torch.Tensor, targets: torch.Tensor):
        self.x, self.targets = x, targets.clamp(min=0)
        shape, dtype = targets.shape, torch.promote_types(x.dtype, torch.float32)
        self.top = torch.full(shape, float("-inf"), dtype=dtype, device=x.device)
        self.total = torch.zeros(shape, dtype=dtype, device=x.device)
        self.picked = torch.zeros(shape, dtype=dtype, device=x.device)

    def add(self, logits: torch.Tensor, lo: int, hi: int, block: slice) -> None:
        """Fold in the logits of output rows [lo, hi) at the positions `block`."""
        old, targets = self.top[:, block], self.targets[:, block]
        top = torch.maximum(old, logits.amax(-1))
        self.total[:, block].mul_(torch.exp(old - top)).add_(
            torch.exp(logits - top.unsqueeze(-1)).sum(-1))
        self.top[:, block] = top
        inside = (targets >= lo) & (targets < hi)
        local = (targets - lo).clamp(0, hi - lo - 1).unsqueeze(-1)
        picked = self.picked[:, block]
        picked.copy_(torch.where(inside, logits.gather(-1, local).squeeze(-1), picked))

    def logprobs(self) -> torch.Tensor:
        return self.picked - self.top - torch.log(self.total)
