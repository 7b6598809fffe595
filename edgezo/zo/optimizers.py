"""ZO optimizers: turn (projected gradient g, direction z) into a parameter update.

An optimizer sees one noise chunk of one parameter at a time (z is regenerated, never
stored), so its update must be expressible chunk by chunk. Each optimizer declares the
bytes of state it keeps per trainable parameter, which the memory planner counts.

Adding an optimizer: a class here with `name`, `state_bytes_per_param` and
`update_chunk`, plus a line in OPTIMIZERS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgezo.errors import ConfigError, unknown_choice
from edgezo.zo import noise

_LOW16 = 0xFFFF


def fp32_copy(param: torch.Tensor) -> torch.Tensor:
    """param as fp32 in this thread's reusable buffer (the update path allocates nothing:
    freed blocks in worker threads' malloc arenas would otherwise stay resident)."""
    out = noise.thread_buffer("fp32", param.numel(), torch.float32, param.device)
    return out.view(param.shape).copy_(param)


def store(param: torch.Tensor, new: torch.Tensor, z: torch.Tensor) -> None:
    """Write fp32 values `new` into `param`, rounding stochastically when param is bf16.

    A ZO update η·g·z is often smaller than half a bf16 ulp of the weight it changes, so
    round-to-nearest would drop most of it, every step, in the same direction. Stochastic
    rounding keeps the update unbiased. Its dither is the low 16 mantissa bits of the fp32
    z already drawn (uniform for all practical purposes), so it costs no extra random
    numbers and stays a pure function of the seed: replay gives the same weights.
    fp32 parameters are stored exactly; fp16 ones round to nearest.
    """
    if param.dtype != torch.bfloat16:
        param.copy_(new)
        return
    bits = new.view(torch.int32)
    dither = noise.thread_buffer("dither", new.numel(), torch.int32, new.device).view(new.shape)
    torch.bitwise_and(z.reshape(new.shape).view(torch.int32), _LOW16, out=dither)
    # Adding a uniform 16-bit dither to the magnitude, then truncating the low 16 bits,
    # rounds the magnitude up with probability equal to the dropped fraction.
    bits.add_(dither).bitwise_and_(~_LOW16)
    param.copy_(new)  # exact: the value is representable in bf16


@dataclass
class ZOSGD:
    """MeZO's ZO-SGD: θ ← θ − η·(g·z + λ·θ)."""

    weight_decay: float = 0.0
    name: str = "zo-sgd"
    state_bytes_per_param: int = 0

    def __post_init__(self) -> None:
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def update_chunk(self, param: torch.Tensor, z: torch.Tensor, g: float, lr: float,
                     index: int, chunk: int) -> None:
        """Apply the update to one chunk of one parameter, in place."""
        new = fp32_copy(param)
        if self.weight_decay:
            new.mul_(1.0 - lr * self.weight_decay)
        new.add_(z, alpha=-lr * g)
        store(param, new, z)


OPTIMIZERS = {"zo-sgd": ZOSGD}


def make_optimizer(name: str, **kwargs) -> ZOSGD:
    if name not in OPTIMIZERS:
        raise unknown_choice("optimizer", name, list(OPTIMIZERS))
    return OPTIMIZERS[name](**kwargs)
