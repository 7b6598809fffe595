"""The model input as the engine sees it: rows, pair mode's doubled batch [x; x], and the
geometry a phase's batches have (what the planner prices)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Logit values computed at once when a loss reads many positions: the head and the
# log-softmax run a chunk of positions at a time (32 MiB of fp32 logits; tasks/loss.py, and
# a perturbed head's spans, head.PerturbedHead.label_logprob_sums), so a batch whose labels cover
# every token (an app's language-modelling batch) never holds its rows x positions x
# vocabulary logits, nor their doubled pair-mode copy.
LOGIT_CHUNK_VALUES = 1 << 23


@dataclass(frozen=True)
class Shape:
    """What one forward of a phase feeds the model.

    `rows_per_example`: a task whose candidates are scored as separate rows (COPA's two
    sentences) multiplies the batch; `logit_positions`: how many positions the loss reads
    logits at (1 for a one-token answer, the answer's length otherwise); `new_tokens`:
    tokens a generative evaluation writes after the prompt (counted in `seq_len`), whose
    keys and values its KV cache holds.
    """

    batch_size: int
    seq_len: int
    rows_per_example: int = 1
    logit_positions: int = 1
    new_tokens: int = 0

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


def split_pair(obj: Any, rows: int) -> tuple[Any, Any]:
    """Split every batch-shaped tensor (ndim >= 2, dim 0 == rows) into its two halves."""
    if isinstance(obj, torch.Tensor) and obj.dim() >= 2 and obj.shape[0] == rows:
        half = rows // 2
        return obj[:half], obj[half:]
    if isinstance(obj, (tuple, list)):
        pairs = [split_pair(o, rows) for o in obj]
        return type(obj)(p[0] for p in pairs), type(obj)(p[1] for p in pairs)
    if isinstance(obj, dict):
        pairs = {k: split_pair(v, rows) for k, v in obj.items()}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    return obj, obj


def join_pair(plus: Any, minus: Any, half: int) -> Any:
    """Inverse of split_pair on outputs; a broadcast (dim 0 == 1) output is expanded."""
    if isinstance(plus, torch.Tensor):
        if plus.dim() >= 1 and plus.shape[0] == 1 and half != 1:
            plus, minus = plus.expand(half, *plus.shape[1:]), minus.expand(half, *minus.shape[1:])
        return torch.cat([plus, minus], dim=0)
    if isinstance(plus, (tuple, list)):
        return type(plus)(join_pair(p, m, half) for p, m in zip(plus, minus, strict=True))
    return plus


def global_means(values: torch.Tensor, parts: int, world: int) -> tuple[list[float], int]:
    """(means of the `parts` equal slices of the per-example losses over every rank, bytes
    sent). Data-parallel: each rank holds a contiguous shard of the examples, so gathering
    the per-example values in rank order rebuilds the single-process vector exactly, and
    its mean is the single-process mean bit for bit. One collective per query: parts x
    examples x 4 bytes (fp32 losses) from each rank."""
    sent = 0
    if world > 1:
        import torch.distributed as dist

        gathered = [torch.empty_like(values) for _ in range(world)]
        dist.all_gather(gathered, values.contiguous())
        sent = values.numel() * values.element_size() * world
        n = values.numel() // parts
        values = torch.cat([torch.cat([g[k * n:(k + 1) * n] for g in gathered])
                            for k in range(parts)])
    return [v.mean().item() for v in values.chunk(parts)], sent
