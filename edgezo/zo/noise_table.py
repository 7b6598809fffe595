"""The table source of z. torch's CPU generator is serial, and a step draws z for every
trainable value more than once, so drawing can take longer than the forwards
(BENCHMARKS.md, "Step time"). A table of N(0,1) values drawn once (OpenAI's evolution
strategies shared theirs between workers the same way) gives any chunk as a slice at a
seeded offset: a view, read at memory speed. Slices at different offsets are
uncorrelated (shifted i.i.d. values), so E[z zᵀ] = I up to the table's sampling error
(1/sqrt(T) = 7e-4); a slice repeats only when two offsets coincide (probability 1/T per
pair). The table is drawn on the CPU from a fixed seed, then copied to each device: the
same values on every device, so replay is exact across machines and devices. (torch's
CPU generator draws the same values on AVX2 and AVX-512 CPUs, but a CPU of another
kind, where get_cpu_capability() says DEFAULT, rounds some in their last bit.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import numpy as np
import torch

from edgezo.zo.chunking import (
    generator,
    mix,
    mix_many,
    num_rows,
    row_width,
    rows_per_chunk,
    span_bounds,
)
from edgezo.zo.workers import thread_buffer

TABLE_VALUES = 1 << 21  # 8 MiB of fp32, 8x the largest chunk
_TABLE_SEED = 0x7AB1E
_TABLES: dict[torch.device, torch.Tensor] = {}
_TABLE_LOCK = threading.Lock()


def table(device: torch.device) -> torch.Tensor:
    """The shared table of N(0,1) values on `device` (drawn once per process)."""
    device = torch.device(device)
    found = _TABLES.get(device)
    if found is None:
        with _TABLE_LOCK:
            if device not in _TABLES:
                cpu = _TABLES.get(torch.device("cpu"))
                if cpu is None:
                    cpu = torch.empty(TABLE_VALUES).normal_(
                        generator=generator(torch.device("cpu"), _TABLE_SEED))
                    _TABLES[torch.device("cpu")] = cpu
                _TABLES[device] = cpu.to(device)
            found = _TABLES[device]
    return found


# The table's bf16 twin: every value rounded to the nearest bf16, built on first use (half
# the table's bytes). A bf16 weight's perturbed copy round(θ + s·ε·z) from the fp32 table
# costs three passes on the CPU (widen θ into an fp32 buffer, add, round back: torch's CPU
# add of an fp32 tensor into a bf16 one makes a temporary first) and one from the twin: a
# bf16 add, which torch sums in fp32 and rounds once. Only perturbed copies read it; the
# update reads the fp32 table, whose low bits also dither its rounding.
_TWINS: dict[torch.device, torch.Tensor] = {}


def table_bf16(device: torch.device) -> torch.Tensor:
    """The table rounded to bf16 on `device` (built once per process and device)."""
    device = torch.device(device)
    found = _TWINS.get(device)
    if found is None:
        full_table = table(device)
        with _TABLE_LOCK:
            if device not in _TWINS:
                _TWINS[device] = full_table.to(torch.bfloat16)
            found = _TWINS[device]
    return found


def chunk_bf16(shape: torch.Size, seed: int, index: int, device: torch.device,
               end: int | None = None) -> torch.Tensor:
    """The twin's values where the table source reads the Gaussian z of chunk `index`
    (with `end`: of chunks [index, end), into a thread buffer), shape (rows, *shape[1:]):
    that z, each value rounded to bf16. Read-only."""
    lo, hi = span_bounds(shape, index, end)
    inner = shape[1:] if len(shape) >= 1 else ()
    numel = (hi - lo) * inner.numel() if inner else hi - lo
    if (end is None or end == index + 1) and not staged():
        offset = table_offset(numel, seed, index)
        z = table_bf16(device)[offset:offset + numel]
    else:
        z = table_span(shape, seed, index, index + 1 if end is None else end, device,
                       thread_buffer("z16", numel, torch.bfloat16, device), table_bf16)
    return z.view(hi - lo, *inner)


def table_offset(numel: int, seed: int, chunk: int) -> int:
    return mix(seed, chunk, _TABLE_SEED) % (TABLE_VALUES - numel + 1)


def table_offsets(seeds: np.ndarray, chunks: np.ndarray, numels: np.ndarray) -> np.ndarray:
    """table_offset at each position of uint64 arrays, in a few vectorized operations."""
    return mix_many(seeds, chunks, _TABLE_SEED) % (np.uint64(TABLE_VALUES + 1) - numels)


def table_slice(numel: int, seed: int, chunk: int, device: torch.device) -> torch.Tensor:
    offset = table_offset(numel, seed, chunk)
    return table(device)[offset:offset + numel]


def wrapped_into(out: torch.Tensor, seed: int) -> torch.Tensor:
    """out[t] = the table's value at (seed + t) mod TABLE_VALUES: any number of values
    (an exact lowrank U of a wide vocabulary may hold more than the table), in one copy
    while they lie before the table's end."""
    values, start, done = table(out.device), seed % TABLE_VALUES, 0
    if start + out.numel() <= TABLE_VALUES:
        return out.copy_(values[start:start + out.numel()])
    while done < out.numel():
        n = min(out.numel() - done, TABLE_VALUES - start)
        out[done:done + n].copy_(values[start:start + n])
        done, start = done + n, 0
    return out


# Where a captured step reads the table's offsets from (edgezo.zo.graphs.Stage): set while
# a step is recorded or captured, None otherwise.
_STAGE = None


def staged() -> bool:
    """Whether offsets are staged now (a CUDA graph's step is recorded or captured): then
    every read of the table is a gather at offsets held on the device, never a slice at
    an offset the host worked out, which a graph would keep for every later step."""
    return _STAGE is not None


def offsets(entries: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
    """Where in the table each (parameter seed, chunk, values) starts, int64 on `device`
    (a graph's step reads them from its staging buffer instead)."""
    if _STAGE is not None:
        return _STAGE.offsets(entries, device)
    return host_offsets(entries, device)


def host_offsets(entries: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
    """`offsets` worked out on the host, one hash an entry, sent in one copy."""
    return to_device([table_offset(n, seed, c) for seed, c, n in entries], device)


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A small int64 tensor on `device`; to CUDA from pinned memory, without waiting for
    the kernels already queued."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _chunk_offsets(shape: torch.Size, seed: int, chunks: Iterable[int],
                   device: torch.device) -> torch.Tensor:
    """Where in the table each of these chunks of a parameter starts, on `device`."""
    per, rows, cols = rows_per_chunk(shape), num_rows(shape), row_width(shape)
    return offsets([(seed, c, (min((c + 1) * per, rows) - c * per) * cols) for c in chunks],
                   device)


_LAYOUTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _span_layout(shape: torch.Size, k: int, end: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of chunks [k, end): its chunk's position in the span, and where the row
    starts inside its chunk (int64 on `device`; a few bytes a row, kept per span)."""
    key = (tuple(shape), rows_per_chunk(shape), k, end, device)
    found = _LAYOUTS.get(key)
    if found is None:
        per = rows_per_chunk(shape)
        lo, hi = span_bounds(shape, k, end)
        r = torch.arange(lo, hi)
        c = torch.div(r, per, rounding_mode="floor")
        found = _LAYOUTS[key] = ((c - k).to(device), ((r - c * per) * row_width(shape)).to(device))
    return found


def _table_rows(shape: torch.Size, starts: torch.Tensor, out: torch.Tensor,
                values: Callable[[torch.device], torch.Tensor] = table) -> torch.Tensor:
    """out[i] = the table's values (`values`: or its twin's) from starts[i], one row of
    the parameter each: a single gather from a (values, cols) sliding-window view."""
    cols = row_width(shape)
    windows = values(starts.device).unfold(0, cols, 1)
    return torch.index_select(windows, 0, starts, out=out.view(starts.numel(), cols))


def table_span(shape: torch.Size, seed: int, k: int, end: int, device: torch.device,
               out: torch.Tensor, values: Callable[[torch.device], torch.Tensor] = table
               ) -> torch.Tensor:
    """z (table source, Gaussian) on chunks [k, end) of a parameter into `out` (`values`:
    table, or table_bf16 for the twin's)."""
    which, local = _span_layout(shape, k, end, device)
    starts = _chunk_offsets(shape, seed, range(k, end), device)[which].add_(local)
    return _table_rows(shape, starts, out, values)


def table_rows(shape: torch.Size, seed: int, row_ids: torch.Tensor) -> torch.Tensor:
    """z (table source, Gaussian) at the given rows of a parameter, fp32: one gather,
    with no host sync (every chunk's offset is computed on the host, a hash each)."""
    per = rows_per_chunk(shape)
    chunk_of = torch.div(row_ids, per, rounding_mode="floor")
    count = -(-num_rows(shape) // per)
    starts = _chunk_offsets(shape, seed, range(count), row_ids.device)[chunk_of]
    starts.add_((row_ids - chunk_of * per) * row_width(shape))
    out = torch.empty(row_ids.numel(), *shape[1:], dtype=torch.float32, device=row_ids.device)
    _table_rows(shape, starts, out)
    return out
