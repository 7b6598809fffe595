"""The model input as the engine sees it: rows, pair mode's doubled batch [x; x], and the
geometry a phase's batches have (what the planner prices)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    """What one forward of a phase feeds the model.

    `rows_per_example`: a task whose candidates are scored as separate rows (COPA's two
    sentences) multiplies the batch; `logit_positions`: how many positions the loss reads
    logits at (1 for a one-token answer, the answer's length otherwise).
    """

    batch_size: int
    seq_len: int
    rows_per_example: int = 1
    logit_positions: int = 1

    @property
    def rows(self) -> int:
        return self.batch_size * self.rows_per_example


def double(batch: dict) -> dict:
    """[x; x]: every tensor stacked twice along dim 0 (pair mode)."""
    return {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_rows(batch: dict) -> int:
    """Rows of the model input (examples × candidates for multi-token candidates)."""
    if "input_ids" in batch:
        return batch["input_ids"].shape[0]
    return next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
