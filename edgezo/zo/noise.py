"""The values of z on a chunk or span of a parameter (`chunk`), from the shared table
(`edgezo.zo.noise_table`, the default) or torch's generator, Gaussian or Rademacher;
where z is defined (seeds, chunks, spans) is `edgezo.zo.chunking`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from edgezo.zo import workers
from edgezo.zo.chunking import (
    chunk_bounds,
    chunks_of_span,
    generator,
    mix,
    num_rows,
    rows_per_chunk,
    span_bounds,
)
from edgezo.zo.noise_table import staged, table_slice, table_span


def to_signs(z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rademacher values from Gaussian ones (in place, or into `out`): their signs, with
    an exact 0.0 (never drawn in practice) taken as +1."""
    out = z.sign_() if out is None else torch.sign(z, out=out)
    return out.masked_fill_(out == 0, 1.0)


def fill_chunk(out: torch.Tensor, seed: int, chunk: int, kind: str = "gaussian"
               ) -> torch.Tensor:
    """Fill `out` (the rows of chunk `chunk`) with its direction values, in place, from
    torch's generator: N(0, 1) draws, or ±1 with equal probability (Rademacher)."""
    gen = generator(out.device, mix(seed, chunk))
    if kind == "gaussian":
        return out.normal_(generator=gen)
    return out.bernoulli_(0.5, generator=gen).mul_(2.0).sub_(1.0)


_DITHER_SALT = 0xD1


def random_bits(numel: int, seed: int, chunk: int, device: torch.device) -> torch.Tensor:
    """int32 values with 16 uniform low bits: the stochastic-rounding dither where no
    Gaussian z is at hand (Rademacher directions, first-order gradients)."""
    return fill_bits(workers.thread_buffer("bits", numel, torch.int32, device), seed, chunk)


def fill_bits(out: torch.Tensor, seed: int, chunk: int) -> torch.Tensor:
    """random_bits of chunk `chunk` written into `out` (int32, that chunk's size)."""
    return out.random_(0, 1 << 16, generator=generator(out.device, mix(seed, chunk, _DITHER_SALT)))


_LOCAL = threading.local()


def chunk(shape: torch.Size, seed: int, index: int, device: torch.device,
          kind: str = "gaussian", source: str = "table", end: int | None = None
          ) -> torch.Tensor:
    """z on noise chunk `index` (with `end`: on chunks [index, end), a span), fp32, shape
    (hi - lo, *shape[1:]): in a thread buffer, or a read-only view of the table (source
    "table", Gaussian, one chunk). Treat it as read-only.

    z is fp32 whatever the parameter dtype: a perturbed or updated weight is then
    round(θ + a·z) computed in fp32 with a single rounding, and fp32 draws are faster
    than bf16 ones on the CPU. The thread remembers it (`last_z`): its low mantissa bits
    are the stochastic-rounding dither of the update that follows.
    """
    lo, hi = span_bounds(shape, index, end)
    inner = shape[1:] if len(shape) >= 1 else ()
    numel = (hi - lo) * inner.numel() if inner else hi - lo
    single = end is None or end == index + 1
    if source == "table":
        if single and not staged():
            z = table_slice(numel, seed, index, device)
        else:
            z = table_span(shape, seed, index, index + 1 if end is None else end, device,
                           workers.thread_buffer("z", numel, torch.float32, device)).view(-1)
        if kind != "gaussian":
            z = to_signs(z, out=workers.thread_buffer("z", numel, torch.float32, device))
    elif single:
        z = fill_chunk(workers.thread_buffer("z", numel, torch.float32, device), seed, index, kind)
    else:
        z = workers.thread_buffer("z", numel, torch.float32, device)
        rows = z.view(hi - lo, -1)
        for k, a, b in chunks_of_span(shape, index, end):
            fill_chunk(rows[a:b], seed, k, kind)
    _LOCAL.last_z = z
    return z.view(hi - lo, *inner)


def last_z(numel: int) -> torch.Tensor:
    """The z this thread drew last (its first `numel` values)."""
    return _LOCAL.last_z[:numel]


def full(shape: torch.Size, seed: int, device: torch.device | str = "cpu",
         kind: str = "gaussian", source: str = "table") -> torch.Tensor:
    """The whole z of one parameter (fp32). For tests and references only."""
    device = torch.device(device)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    flat = out.reshape(num_rows(shape), -1)
    for k, (lo, hi) in enumerate(chunk_bounds(shape)):
        flat[lo:hi] = chunk(shape, seed, k, device, kind, source).reshape(hi - lo, -1)
    return out


def rows(shape: torch.Size, row_ids: torch.Tensor, chunk_z: Callable[[int], torch.Tensor],
         draws: bool = True) -> torch.Tensor:
    """z (fp32) at the given sorted, unique rows only, from `chunk_z(k)`, the z of chunk k:
    only the chunks holding those rows are drawn (`draws`: as parallel_map's)."""
    per = rows_per_chunk(shape)
    out = torch.empty((row_ids.numel(), *shape[1:]), dtype=torch.float32, device=row_ids.device)
    chunk_of = torch.div(row_ids, per, rounding_mode="floor")
    # One host sync to learn which chunks are needed; the rows are few, the chunks many.
    needed = torch.unique_consecutive(chunk_of).tolist()

    def draw(k: int) -> None:
        z = chunk_z(k)
        sel = (chunk_of == k).nonzero().squeeze(1)
        out[sel] = z[row_ids[sel] - k * per]

    workers.parallel_map(draw, needed, row_ids.device, draws)
    return out


def gaussian(numel: int, seed: int, chunk: int, device: torch.device, name: str = "u"
             ) -> torch.Tensor:
    """N(0,1) values from torch's generator in this thread's `name` buffer (a chunked
    structured direction's small factors)."""
    out = workers.thread_buffer(name, numel, torch.float32, device)
    return out.normal_(generator=generator(device, mix(seed, chunk)))


def remember(z: torch.Tensor) -> None:
    """Make `z` this thread's last z (noise.last_z: the update's rounding dither)."""
    _LOCAL.last_z = z.reshape(-1)
