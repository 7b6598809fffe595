"""Perturbation directions z, regenerated from seeds and never stored for the whole model.

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
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait

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


def step_seed(run_seed: int, step: int, query: int = 0) -> int:
    """The seed of one ZO query: a pure function of (run seed, step, query)."""
    return mix(run_seed, step, query)


def param_seed(seed: int, param_index: int) -> int:
    return mix(seed, param_index)


def _cols(shape: torch.Size) -> int:
    return 1 if len(shape) < 2 else shape[1:].numel()


def rows_per_chunk(shape: torch.Size) -> int:
    """Rows of a parameter (viewed as 2-D) that one noise chunk covers."""
    return max(1, CHUNK_ELEMENTS // max(1, _cols(shape)))


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
        out = max(out, min(num_rows(shape), rows) * _cols(shape))
    return out


def chunk_bounds(shape: torch.Size) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of the noise chunks of a parameter, in order."""
    rows, per = num_rows(shape), rows_per_chunk(shape)
    return [(lo, min(lo + per, rows)) for lo in range(0, rows, per)]


# ---------------------------------------------------------------------------------------
# Spans. On CUDA a 256K-value chunk is too little work for the kernels and the Python calls
# it costs: a SmolLM2 step touches about 2000 chunks, and on an H200 the GPU sat idle most
# of the step while the host issued their calls and launches. There, consumers walk spans of
# consecutive chunks of one parameter: a span's z is its chunks' values laid end to end
# (from the table, one gather), so values, replay and resume are those of the chunks. On
# the CPU a span is one chunk (chunks fit the caches and the worker threads share them),
# unless a caller asks for more: intercept.LINEAR_SPAN, one matrix product per map.
# EDGEZO_CUDA_SPAN sets a span's size in values (0: chunk by chunk), for benchmarks.
# ---------------------------------------------------------------------------------------
SPAN_ELEMENTS = {"cuda": int(os.environ.get("EDGEZO_CUDA_SPAN", 1 << 20))}


def chunks_per_span(shape: torch.Size, device: torch.device | str,
                    limit: int | None = None) -> int:
    if limit is None:
        limit = SPAN_ELEMENTS.get(torch.device(device).type, 0)
    return max(1, limit // (rows_per_chunk(shape) * _cols(shape)))


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


def to_signs(z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rademacher values from Gaussian ones (in place, or into `out`): their signs, with
    an exact 0.0 (never drawn in practice) taken as +1."""
    out = z.sign_() if out is None else torch.sign(z, out=out)
    return out.masked_fill_(out == 0, 1.0)


def span_bounds(shape: torch.Size, k: int, end: int | None) -> tuple[int, int]:
    """Rows [lo, hi) of chunks [k, end) (end None: chunk k alone)."""
    per = rows_per_chunk(shape)
    return k * per, min((k + 1 if end is None else end) * per, num_rows(shape))


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def fill_chunk(out: torch.Tensor, seed: int, chunk: int, kind: str = "gaussian"
               ) -> torch.Tensor:
    """Fill `out` (the rows of chunk `chunk`) with its direction values, in place, from
    torch's generator: N(0, 1) draws, or ±1 with equal probability (Rademacher)."""
    gen = _generator(out.device, mix(seed, chunk))
    if kind == "gaussian":
        return out.normal_(generator=gen)
    return out.bernoulli_(0.5, generator=gen).mul_(2.0).sub_(1.0)


# ---------------------------------------------------------------------------------------
# The table source. torch's CPU generator is serial, 5-7 ns a value on the project's
# machines, and a SmolLM2 step draws about 300M values: more time than the forwards. A
# table of N(0,1) values drawn once (OpenAI's evolution strategies shared theirs between
# workers the same way) gives any chunk as a slice at a seeded offset: a view, read at
# memory speed (0.5 ns a value measured, as part of the add that uses it). Slices at
# different offsets are uncorrelated (shifted i.i.d. values), so E[z zᵀ] = I up to the
# table's sampling error (1/sqrt(T) = 7e-4); a slice repeats only when two offsets
# coincide (probability 1/T per pair). The table is drawn on the CPU from a fixed seed,
# then copied to each device: the same values everywhere, so replay is exact across
# machines and devices.
# ---------------------------------------------------------------------------------------
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
                        generator=_generator(torch.device("cpu"), _TABLE_SEED))
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
    if end is None or end == index + 1:
        offset = _offset(numel, seed, index)
        z = table_bf16(device)[offset:offset + numel]
    else:
        z = table_span(shape, seed, index, end, device,
                       thread_buffer("z16", numel, torch.bfloat16, device), table_bf16)
    return z.view(hi - lo, *inner)


def _offset(numel: int, seed: int, chunk: int) -> int:
    return mix(seed, chunk, _TABLE_SEED) % (TABLE_VALUES - numel + 1)


def _table_slice(numel: int, seed: int, chunk: int, device: torch.device) -> torch.Tensor:
    offset = _offset(numel, seed, chunk)
    return table(device)[offset:offset + numel]


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A small int64 tensor on `device`; to CUDA from pinned memory, without waiting for
    the kernels already queued."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _chunk_offsets(shape: torch.Size, seed: int, chunks: Iterable[int],
                   device: torch.device) -> torch.Tensor:
    """Where in the table each of these chunks of a parameter starts, on `device`."""
    per, rows, cols = rows_per_chunk(shape), num_rows(shape), _cols(shape)
    return _to_device([_offset((min((c + 1) * per, rows) - c * per) * cols, seed, c)
                       for c in chunks], device)


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
        found = _LAYOUTS[key] = ((c - k).to(device), ((r - c * per) * _cols(shape)).to(device))
    return found


def _table_rows(shape: torch.Size, starts: torch.Tensor, out: torch.Tensor,
                values: Callable[[torch.device], torch.Tensor] = table) -> torch.Tensor:
    """out[i] = the table's values (`values`: or its twin's) from starts[i], one row of
    the parameter each: a single gather from a (values, cols) sliding-window view."""
    cols = _cols(shape)
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
    starts.add_((row_ids - chunk_of * per) * _cols(shape))
    out = torch.empty(row_ids.numel(), *shape[1:], dtype=torch.float32, device=row_ids.device)
    _table_rows(shape, starts, out)
    return out


_DITHER_SALT = 0xD1


def random_bits(numel: int, seed: int, chunk: int, device: torch.device) -> torch.Tensor:
    """int32 values with 16 uniform low bits: the stochastic-rounding dither where no
    Gaussian z is at hand (Rademacher directions, first-order gradients)."""
    return fill_bits(thread_buffer("bits", numel, torch.int32, device), seed, chunk)


def fill_bits(out: torch.Tensor, seed: int, chunk: int) -> torch.Tensor:
    """random_bits of chunk `chunk` written into `out` (int32, that chunk's size)."""
    return out.random_(0, 1 << 16, generator=_generator(out.device, mix(seed, chunk, _DITHER_SALT)))


_LOCAL = threading.local()


def thread_buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device
                  ) -> torch.Tensor:
    """A flat buffer reused by this thread, so the hot path allocates nothing.

    Valid until the same thread asks for the same name again.
    """
    buffers = _LOCAL.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    found = buffers.get(key)
    if found is None or found[0].numel() < numel:
        buf = torch.empty(max(numel, CHUNK_ELEMENTS), dtype=dtype, device=device)
        found = buffers[key] = (buf, {})
    buf, views = found
    view = views.get(numel)
    if view is None:  # kept: on a GPU a slice is host time each step (benchmarks/step_ops.py)
        view = views[numel] = buf[:numel]
    return view


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
        if single:
            z = _table_slice(numel, seed, index, device)
        else:
            z = table_span(shape, seed, index, end, device,
                           thread_buffer("z", numel, torch.float32, device)).view(-1)
        if kind != "gaussian":
            z = to_signs(z, out=thread_buffer("z", numel, torch.float32, device))
    elif single:
        z = fill_chunk(thread_buffer("z", numel, torch.float32, device), seed, index, kind)
    else:
        z = thread_buffer("z", numel, torch.float32, device)
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

    parallel_map(draw, needed, row_ids.device, draws)
    return out


def chunk_bounds_of(shape: torch.Size, k: int) -> tuple[int, int]:
    """Rows [lo, hi) of noise chunk k."""
    per = rows_per_chunk(shape)
    return k * per, min((k + 1) * per, num_rows(shape))


def gaussian(numel: int, seed: int, chunk: int, device: torch.device, name: str = "u"
             ) -> torch.Tensor:
    """N(0,1) values from torch's generator in this thread's `name` buffer (the small
    factors of structured directions)."""
    out = thread_buffer(name, numel, torch.float32, device)
    return out.normal_(generator=_generator(device, mix(seed, chunk)))


def remember(z: torch.Tensor) -> None:
    """Make `z` this thread's last z (noise.last_z: the update's rounding dither)."""
    _LOCAL.last_z = z.reshape(-1)


_BASES: dict[tuple, tuple[torch.Tensor | None, torch.Tensor]] = {}
_BASIS_LOCK = threading.Lock()


def basis(kind: str, seed: int, index: int, rows: int, cols: int, rank: int,
          device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(left, right) factors of a structured direction's basis for one matrix: lowrank,
    (None, V) with V (cols x rank) N(0,1); subspace, orthonormal (P, Q), P (rows x rank)
    and Q (cols x rank) from QR of Gaussians. Cached for the two newest basis seeds:
    r(m+n) values a matrix (the planner's "direction_bases")."""
    key = (kind, seed, index, rows, cols, rank, device)
    found = _BASES.get(key)
    if found is not None:
        return found
    with _BASIS_LOCK:
        if key not in _BASES:
            _keep_two(seed)
            _BASES[key] = _make_basis(kind, seed, index, rows, cols, rank, device)
        return _BASES[key]


def prepare_bases(kind: str, seed: int, matrices: Iterable[tuple[int, int, int]], rank: int,
                  device: torch.device) -> None:
    """Build the factors of every (index, rows, cols) matrix for a basis seed at once, in
    one block, before a forward needs them: the same values `basis` would make.

    Made one by one as the layers ask, each small factor that outlives the step landed
    between a layer's freed activations and kept glibc from reusing their space: a LOZO
    step on SmolLM2 grew the heap by 3-7 MiB a layer, 137-218 MiB in all, most of it free
    but resident (the measured peak 490-555 MiB against 371 planned)."""
    device = torch.device(device)
    todo = [(i, r, c) for i, r, c in matrices
            if (kind, seed, i, r, c, rank, device) not in _BASES]
    if not todo:
        return
    left = kind != "lowrank"
    sizes = [((r if left else 0) + c) * rank for _, r, c in todo]
    with _BASIS_LOCK:
        _keep_two(seed)
        flat = torch.empty(sum(sizes), device=device)
        offset = 0
        for (i, r, c), size in zip(todo, sizes, strict=True):
            block = flat[offset:offset + size]
            offset += size
            out = ((block[:r * rank].view(r, rank) if left else None),
                   block[size - c * rank:].view(c, rank))
            _BASES[(kind, seed, i, r, c, rank, device)] = _make_basis(
                kind, seed, i, r, c, rank, device, out)


def _keep_two(seed: int) -> None:
    """Drop the factors of every basis seed but the newest cached one and `seed` (call
    with the lock held)."""
    recent = list(dict.fromkeys(k[1] for k in _BASES))[-1:]
    for old in [k for k in _BASES if k[1] not in (*recent, seed)]:
        del _BASES[old]


def _make_basis(kind: str, seed: int, index: int, rows: int, cols: int, rank: int,
                device: torch.device,
                out: tuple[torch.Tensor | None, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`out`: (left, right) buffers to fill (left None for lowrank), else new tensors."""
    def draw(n: int, salt: int, buf: torch.Tensor | None) -> torch.Tensor:
        gen = _generator(device, mix(seed, index, salt))
        buf = torch.empty(n, rank, device=device) if buf is None else buf
        return buf.normal_(generator=gen)

    left_buf, right_buf = (None, None) if out is None else out
    if kind == "lowrank":
        return None, draw(cols, 2, right_buf)
    left = torch.linalg.qr(draw(rows, 1, left_buf)).Q
    right = torch.linalg.qr(draw(cols, 2, right_buf)).Q
    if out is None:
        return left.contiguous(), right.contiguous()
    return left_buf.copy_(left), right_buf.copy_(right)


# ---------------------------------------------------------------------------------------
# Parallel chunk work on the CPU. torch's CPU generator is serial (about 5 ns a value on
# the project's machines), which makes drawing z the largest cost of a ZO step after the
# forward passes; independent chunks let the cores share it. On CUDA the kernels are
# asynchronous already, so chunks run in order on the caller's thread.
# ---------------------------------------------------------------------------------------
_POOL: ThreadPoolExecutor | None = None


def worker_threads() -> int:
    """Threads that draw noise chunks on the CPU ($EDGEZO_NOISE_THREADS, default: torch's)."""
    return int(os.environ.get("EDGEZO_NOISE_THREADS", torch.get_num_threads()))


def pool_threads(draws: bool) -> int:
    """The noise pool's threads that CPU work of this kind uses (parallel_map): none
    when it stays on the caller's thread. The planner prices a set of buffers for each."""
    n = worker_threads()
    return n if draws and n >= 2 else 0


def parallel_map(fn: Callable[[int], None], items: Iterable[int], device: torch.device,
                 draws: bool = True) -> None:
    """Run fn over chunk indices; items must touch disjoint memory.

    `draws`: fn draws from torch's generator, which is serial, so the chunks go to worker
    threads. Work that only reads and combines tensors (the table's slices) runs on the
    caller's thread, where each operation already uses torch's intra-op
    threads: in the pool as well, it ran two threads per worker and four on two cores
    (a SmolLM2 bf16 step on a 2-core CPU: 1.62x two forwards in the pool, 1.31x without).
    """
    global _POOL
    items = list(items)
    threads = pool_threads(draws)
    if device.type != "cpu" or not threads or len(items) < 2:
        for item in items:
            fn(item)
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="edgezo-noise")
    futures = [_POOL.submit(fn, item) for item in items]
    try:
        for future in futures:
            future.result()
    except BaseException:
        # a Ctrl-C (or an error) here must not leave workers writing into tensors the
        # caller goes on to restore or read: stop what has not started, wait for the rest
        for future in futures:
            future.cancel()
        wait(futures)
        raise
