"""A snapshot's tensors besides the weights: the update rule's state (moments, Hessian
estimates) and the sparsity masks, by name, so a resumed run continues bit for bit."""

from __future__ import annotations

import torch

from edgezo.zo.optimizers import Rule
from edgezo.zo.sparsity import SparseMasks


def tensors(rule: Rule, masks: SparseMasks | None) -> dict[str, torch.Tensor]:
    out = {}
    for key, stored in getattr(rule, "state", {}).items():
        for i, t in enumerate(stored):
            out[f"rule.{key}.{i}"] = t
    if masks is not None and masks.epoch is not None:
        for i, m in enumerate(masks.masks):
            out[f"mask.{i}"] = m.to(torch.uint8)
    return out


@torch.no_grad()
def load(rule: Rule, masks: SparseMasks | None, stored: dict[str, torch.Tensor],
         mask_epoch: int | None) -> None:
    for key, state in getattr(rule, "state", {}).items():
        for i, t in enumerate(state):
            t.copy_(stored[f"rule.{key}.{i}"])
    if masks is not None and mask_epoch is not None:
        for i, m in enumerate(masks.masks):
            m.copy_(stored[f"mask.{i}"].bool())
        masks.epoch = mask_epoch
