"""Where a parameter's perturbation z comes from: seeds, and the chunks and spans z is
defined in, regenerated from seeds and never stored for the whole model.

z for one parameter is defined in row-chunks: the parameter is viewed as (rows, cols) and
chunk k (rows [k*R, (k+1)*R), R*cols <= CHUNK_ELEMENTS unless one row is longer) is
drawn from its own generator seeded with mix(param_seed, k). That definition lets every
consumer regenerate exactly the values it needs and no more:

- a decoder layer fills its scratch copy chunk by chunk (transient: one chunk),
- an embedding draws only the chunks holding the token rows a batch uses,
- an LM head computes its logits one row-chunk at a time,
- the deferred update walks the chunks again,

and chunks can be drawn in parallel threads without changing a single value.

Consumers may walk spans of consecutive chunks instead (`spans`): the same values, fewer
and larger kernels. On CUDA every consumer does; on the CPU, the linear maps that compute
from z (intercept.LINEAR_SPAN).
"""

from __future__ import annotations

import os

import numpy as np
import torch

CHUNK_ELEMENTS = 1 << 18
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """Hash integers into one well-spread 63-bit seed (order matters)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = _splitmix64(h ^ (v & _MASK64))
    return h >> 1


def mix_many(*values) -> np.ndarray:
    """`mix` of each position of equal-length uint64 arrays (or ints, the same at every
    position): the same numbers, for a CUDA graph's step, whose host works out every
    table offset of a step at once (edgezo.zo.graphs.Stage)."""
    n = max(np.size(v) for v in values)
    with np.errstate(over="ignore"):
        h = np.full(n, 0x243F6A8885A308D3, dtype=np.uint64)
        for v in values:
            x = h ^ np.asarray(v, dtype=np.uint64)
            x = x + np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = x ^ (x >> np.uint64(31))
    return h >> np.uint64(1)


def step_seed(run_seed: int, step: int, query: int = 0) -> int:
    """The seed of one ZO query: a pure function of (run seed, step, query)."""
    return mix(run_seed, step, query)


def param_seed(seed: int, param_index: int) -> int:
    return mix(seed, param_index)


def row_width(shape: torch.Size) -> int:
    return 1 if len(shape) < 2 else shape[1:].numel()


def is_matrix(shape: torch.Size) -> bool:
    """A parameter structured directions apply to: 2-D (or more, viewed as rows x rest)
    with more than one row and column."""
    return len(shape) >= 2 and shape[0] > 1 and shape[1:].numel() > 1


def rows_per_chunk(shape: torch.Size) -> int:
    """Rows of a parameter (viewed as 2-D) that one noise chunk covers."""
    return max(1, CHUNK_ELEMENTS // max(1, row_width(shape)))


def num_rows(shape: torch.Size) -> int:
    return 1 if len(shape) == 0 else shape[0]


def largest_chunk(shapes, device: torch.device | str = "cpu", limit: int | None = None
                  ) -> int:
    """Elements of the largest noise chunk (on CUDA: span; with `limit`, spans of that
    many values) over parameters of these shapes: what each thread's reusable buffers
    hold (tiny adapters never fill a full CHUNK_ELEMENTS)."""
    out = 0
    for shape in shapes:
        shape = torch.Size(shape)
        rows = rows_per_chunk(shape) * chunks_per_span(shape, device, limit)
        out = max(out, min(num_rows(shape), rows) * row_width(shape))
    return out


def chunk_bounds(shape: torch.Size) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of the noise chunks of a parameter, in order."""
    rows, per = num_rows(shape), rows_per_chunk(shape)
    return [(lo, min(lo + per, rows)) for lo in range(0, rows, per)]


# Spans. On CUDA a 256K-value chunk is too little work for the kernels and the Python calls
# it costs: a step walks every trainable chunk more than once, and the GPU waits while the
# host issues their calls and launches (BENCHMARKS.md, "Second loan, later the same day:
# noise spans on CUDA"). There, consumers walk spans of consecutive chunks of one
# parameter: a span's z is its chunks' values laid end to end (from the table, one
# gather), so values, replay and resume are those of the chunks. On
# the CPU a span is one chunk (chunks fit the caches and the worker threads share them),
# unless a caller asks for more: intercept.LINEAR_SPAN, one matrix product per map.
# EDGEZO_CUDA_SPAN sets a span's size in values (0: chunk by chunk), for benchmarks.
SPAN_ELEMENTS = {"cuda": int(os.environ.get("EDGEZO_CUDA_SPAN", 1 << 20))}


def chunks_per_span(shape: torch.Size, device: torch.device | str,
                    limit: int | None = None) -> int:
    if limit is None:
        limit = SPAN_ELEMENTS.get(torch.device(device).type, 0)
    return max(1, limit // (rows_per_chunk(shape) * row_width(shape)))


def spans(shape: torch.Size, device: torch.device | str, limit: int | None = None
          ) -> list[tuple[int, int, int, int]]:
    """(first chunk, end chunk, first row, end row) of each span of a parameter, in order
    (`limit`: values a span holds at most, instead of the device's SPAN_ELEMENTS)."""
    per, rows = rows_per_chunk(shape), num_rows(shape)
    n = chunks_per_span(shape, device, limit)
    count = -(-rows // per)
    return [(k, min(k + n, count), k * per, min((k + n) * per, rows))
            for k in range(0, count, n)]


def chunks_of_span(shape: torch.Size, k: int, end: int | None
                   ) -> list[tuple[int, int, int]]:
    """(chunk, first row, end row) of each chunk in [k, end), rows counted from the span's
    first: for the consumers that still draw a span chunk by chunk."""
    lo = k * rows_per_chunk(shape)
    return [(c, a - lo, b - lo)
            for c in range(k, k + 1 if end is None else end)
            for a, b in [chunk_bounds_of(shape, c)]]


def span_bounds(shape: torch.Size, k: int, end: int | None) -> tuple[int, int]:
    """Rows [lo, hi) of chunks [k, end) (end None: chunk k alone)."""
    per = rows_per_chunk(shape)
    return k * per, min((k + 1 if end is None else end) * per, num_rows(shape))


def generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def chunk_bounds_of(shape: torch.Size, k: int) -> tuple[int, int]:
    """Rows [lo, hi) of noise chunk k."""
    per = rows_per_chunk(shape)
    return k * per, min((k + 1) * per, num_rows(shape))
