"""A step's host cost by the unit, not by the chunk: the perturbed copies and the deferred
update of several parameters at once.

On a GPU each dispatched operation costs host time (Python, the dispatcher, a kernel
launch), and a small model's step is bound by that, not by the GPU
(benchmarks/step_ops.py counts them). Walking a layer's parameters span by span costs
about twenty operations a parameter. Here a *piece* (consecutive parameters of a unit,
at most FUSED_VALUES values in all) is handled as one flat run of values:

- z: from the table (Gaussian or Rademacher), one gather per run of parameters with the
  same row width, every chunk's table offset computed on the host and sent in one copy;
  a structured direction's, one exact product a matrix (fused_grid.py); otherwise each
  chunk's values written in place (one generator call a chunk, as the generator source
  defines z);
- the perturbed copies: the piece's weights concatenated into the scratch copy, then one
  add per sign;
- the deferred update (ZO-SGD): the weights concatenated into an fp32 buffer, one
  subtraction, the stochastic rounding's integer operations, and one multi-tensor copy
  back.

The values are the chunks' own (Direction.chunk_into or Direction.factors makes them for
both paths), and
every elementwise operation is the one the span path applies. fp32 steps and every
update equal the span path's bit for bit (tests/unit/zo/test_fused.py, on the CPU); a bf16
perturbed copy does on a GPU, where each element takes the same arithmetic, but not
always on the CPU, whose add rounds a tensor's vectorized body and its tail apart (the
CPU keeps its own path, so that only matters to the tests that force this one there).
Coordinate directions (a few entries, no values drawn), stateful rules' updates, masks,
preconditioners and streamed layers keep the span path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from edgezo.zo import chunking, noise, noise_table, workers
from edgezo.zo.direction import Direction
from edgezo.zo.fused_grid import StructuredPieces
from edgezo.zo.methods import STRUCTURED

# Where units take the fused path. The CPU keeps its own (perturb.CHUNKED_LINEAR_DEVICES:
# linear maps computed from z, no scratch copy), where a chunk's work is large next to
# its dispatch cost. EDGEZO_FUSED=0 keeps the span path everywhere (the same values).
FUSED_DEVICES = () if os.environ.get("EDGEZO_FUSED") == "0" else ("cuda",)
# Values a piece holds at most: its z and, for an update, its fp32 copy are buffers of
# this size (the planner's noise_buffers); a larger parameter goes span by span.
FUSED_VALUES = 1 << 22

_LOW16 = 0xFFFF


@dataclass(frozen=True)
class Piece:
    """Segments of parameters laid end to end (each a run of whole chunks of one
    parameter's rows), with what a gather of their z needs."""

    segments: tuple[tuple[int, int, int], ...]  # (parameter index, first row, end row)
    sizes: tuple[int, ...]  # values in each segment
    numel: int
    chunks: tuple[tuple[int, int, int], ...]  # (parameter index, chunk, values) in order
    runs: tuple[tuple[int, int, int, int, int], ...]  # (cols, first row, end row, lo, hi)
    row_chunk: torch.Tensor  # for each row: its chunk's place in `chunks` (device)
    row_local: torch.Tensor  # for each row: where it starts inside its chunk (device)

    @property
    def indices(self) -> tuple[int, ...]:
        """The parameters the piece holds rows of, in order."""
        return tuple(dict.fromkeys(i for i, _, _ in self.segments))


def _layout(params: Sequence[torch.Tensor], segments: tuple[tuple[int, int, int], ...],
            device: torch.device) -> Piece:
    chunks, runs, row_chunk, row_local, sizes = [], [], [], [], []
    row = value = 0
    for i, first, end in segments:
        shape = params[i].shape
        cols, per = chunking.row_width(shape), chunking.rows_per_chunk(shape)
        for c in range(first // per, -(-end // per)):
            lo, hi = chunking.chunk_bounds_of(shape, c)
            row_chunk += [len(chunks)] * (hi - lo)
            row_local += [(r - lo) * cols for r in range(lo, hi)]
            chunks.append((i, c, (hi - lo) * cols))
        rows = end - first
        if runs and runs[-1][0] == cols:
            c0, r0, _, v0, _ = runs[-1]
            runs[-1] = (c0, r0, row + rows, v0, value + rows * cols)
        else:
            runs.append((cols, row, row + rows, value, value + rows * cols))
        sizes.append(rows * cols)
        row += rows
        value += rows * cols
    as_long = dict(dtype=torch.int64)
    return Piece(segments, tuple(sizes), value, tuple(chunks), tuple(runs),
                 torch.tensor(row_chunk, **as_long).to(device),
                 torch.tensor(row_local, **as_long).to(device))


def _segments(shape: torch.Size, index: int) -> list[tuple[int, int, int]]:
    """A parameter's rows cut into runs of whole chunks of at most FUSED_VALUES values."""
    rows, cols = chunking.num_rows(shape), chunking.row_width(shape)
    per = chunking.rows_per_chunk(shape)
    step = max(per, FUSED_VALUES // cols // per * per)  # whole chunks (one at least)
    return [(index, lo, min(lo + step, rows)) for lo in range(0, rows, step)]


class Fused(StructuredPieces):
    """The pieces of a model's trainable parameters, built once per set of indices."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = params
        self._pieces: dict[tuple, tuple[list[Piece], list[int]]] = {}
        self._windows: dict[tuple, torch.Tensor] = {}
        self._slices: dict[tuple, tuple[int, torch.Tensor]] = {}
        self._views: dict[tuple, tuple[tuple, list[torch.Tensor]]] = {}

    def pieces(self, indices: Sequence[int]) -> tuple[list[Piece], list[int]]:
        """The pieces covering `indices` in order (a parameter larger than a piece is
        cut at chunk boundaries), and the indices left to the span path (dtypes the
        fused update does not handle)."""
        key = tuple(indices)
        found = self._pieces.get(key)
        if found is not None:
            return found
        pieces, rest, current, size = [], [], [], 0
        device = dtype = None

        def close() -> None:
            if current:
                pieces.append(_layout(self.params, tuple(current), device))
                current.clear()

        for i in key:
            p = self.params[i]
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                close()  # a piece's segments lie end to end: this parameter ends it
                size = 0
                rest.append(i)
                continue
            for segment in _segments(p.shape, i):
                values = (segment[2] - segment[1]) * chunking.row_width(p.shape)
                if current and (size + values > FUSED_VALUES or p.device != device
                                or p.dtype != dtype):
                    close()
                    size = 0
                device, dtype = p.device, p.dtype
                current.append(segment)
                size += values
        close()
        self._pieces[key] = found = (pieces, rest)
        return found

    def release(self) -> None:
        """Drop the kept slices and views of buffers (they would keep them alive)."""
        self._slices.clear()
        self._views = {k: v for k, v in self._views.items() if k[0] == "weights"}

    def _window(self, values: torch.Tensor, cols: int) -> torch.Tensor:
        key = (values.data_ptr(), values.dtype, cols)
        found = self._windows.get(key)
        if found is None:
            found = self._windows[key] = values.unfold(0, cols, 1)
        return found

    def _kept(self, role: str, piece: Piece, memory: tuple, make: Callable[[], list]
              ) -> list[torch.Tensor]:
        """Views of `role` for a piece, made once and kept while the memory they view is
        the same (`memory`: data pointers). A kept view holds its storage, so an equal
        pointer is the same live memory; views of memory that moved are replaced the next
        time the piece asks, and until then keep that memory alive."""
        key = (role, piece.segments)
        found = self._views.get(key)
        if found is None or found[0] != memory:
            found = self._views[key] = (memory, make())
        return found[1]

    def views(self, flat: torch.Tensor, piece: Piece) -> list[torch.Tensor]:
        """`flat` (a piece's values) cut into its parameters' flat runs."""
        return self._kept(f"split-{flat.dtype}", piece, (flat.data_ptr(),),
                          lambda: list(flat.split(piece.sizes)))

    def weights(self, piece: Piece) -> list[torch.Tensor]:
        """The piece's segments as flat views of their parameters' storage (an update
        writes through them in place)."""
        params = [self.params[i] for i, _, _ in piece.segments]
        return self._kept("weights", piece, tuple(p.data_ptr() for p in params),
                          lambda: [p.detach().reshape(chunking.num_rows(p.shape), -1)[a:b]
                                   .view(-1)
                                   for p, (_, a, b) in zip(params, piece.segments,
                                                           strict=True)])

    def _runs_of(self, out: torch.Tensor, piece: Piece) -> list[torch.Tensor]:
        """`out` cut into the (rows, cols) blocks each gather of the piece fills."""
        return self._kept(f"runs-{out.dtype}", piece, (out.data_ptr(),),
                          lambda: [out[lo:hi].view(r1 - r0, cols)
                                   for cols, r0, r1, lo, hi in piece.runs])

    def _chunks_of(self, out: torch.Tensor, piece: Piece) -> list[torch.Tensor]:
        """`out` cut into each chunk's (rows, cols) block, in the piece's order."""
        def make() -> list[torch.Tensor]:
            views, offset = [], 0
            for i, _, n in piece.chunks:
                width = chunking.row_width(self.params[i].shape)
                views.append(out[offset:offset + n].view(-1, width))
                offset += n
            return views
        return self._kept(f"chunks-{out.dtype}", piece, (out.data_ptr(),), make)

    def window(self, buffer: torch.Tensor, lo: int, numel: int, role: object) -> torch.Tensor:
        """buffer[lo:lo + numel], kept while `role`'s buffer is the same memory (a new
        buffer replaces the views of the old one, which then goes)."""
        key = ("window", role, buffer.dtype, lo, numel)
        found = self._slices.get(key)
        if found is None or found[0] != buffer.data_ptr():
            found = self._slices[key] = (buffer.data_ptr(), buffer[lo:lo + numel])
        return found[1]

    def z(self, piece: Piece, direction: Direction, seed: int, out: torch.Tensor,
          values: Callable[[torch.device], torch.Tensor] = noise_table.table) -> torch.Tensor:
        """The piece's z for query `seed` of `direction` (each parameter's chunks as the
        direction defines them) into `out` (`values`: the table, or its bf16 twin).

        From the table, i.i.d. z is one gather per run of rows of one width; an exact
        structured z is one product a matrix (fused_grid.py) and its vectors' chunks are
        table slices; otherwise each chunk is written in place (one generator call, or a
        chunked structured z's small product, a chunk)."""
        if direction.source == "table" and direction.kind in ("gaussian", "rademacher"):
            self._gather(piece, seed, out, values)
            return noise.to_signs(out) if direction.kind == "rademacher" else out
        exact = direction.kind in STRUCTURED and not direction.chunked
        if exact:  # a matrix's rows in one product (the other tensors' z chunk by chunk)
            self._structured(piece, direction, seed, out)
        last, factors = None, None
        flats = self._kept(f"flat-chunks-{out.dtype}", piece, (out.data_ptr(),),
                           lambda: list(out.split([n for _, _, n in piece.chunks])))
        for (i, c, n), view, flat in zip(piece.chunks, self._chunks_of(out, piece), flats,
                                         strict=True):
            shape = self.params[i].shape
            if exact and chunking.is_matrix(shape):
                continue
            if exact and direction.source == "table":  # Gaussian: the chunk's table slice
                flat.copy_(noise_table.table_slice(n, chunking.param_seed(seed, i), c,
                                                   out.device))
                continue
            if i != last:
                last, factors = i, direction.factors(shape, seed, i, out.device)
            direction.chunk_into(view, shape, seed, i, c, factors)
        return out

    def _segments_of(self, out: torch.Tensor, piece: Piece) -> list[torch.Tensor]:
        """`out` cut into each segment's (rows, cols) block."""
        return self._kept(f"segments-{out.dtype}", piece, (out.data_ptr(),),
                          lambda: [flat.view(end - first, -1) for flat, (_, first, end)
                                   in zip(out.split(piece.sizes), piece.segments,
                                          strict=True)])

    def _gather(self, piece: Piece, seed: int, out: torch.Tensor,
                values: Callable[[torch.device], torch.Tensor]) -> None:
        device = out.device
        offsets = noise_table.offsets(
            [(chunking.param_seed(seed, i), c, n) for i, c, n in piece.chunks], device)
        starts = self._starts(len(piece.row_chunk), device)
        torch.index_select(offsets, 0, piece.row_chunk, out=starts).add_(piece.row_local)
        table = values(device)
        for (cols, _, _, _, _), part, rows in zip(piece.runs, self._runs_of(out, piece),
                                                  self._rows_of(starts, piece), strict=True):
            torch.index_select(self._window(table, cols), 0, rows, out=part)

    def _starts(self, rows: int, device: torch.device) -> torch.Tensor:
        """Where each row of a piece starts in the table: one int64 a row, for the
        largest piece (the planner's row layouts)."""
        key = ("starts", device)
        found = self._windows.get(key)
        if found is None or found.numel() < rows:
            largest = max(len(p.row_chunk) for pieces, _ in self._pieces.values() for p in pieces)
            found = self._windows[key] = torch.empty(max(rows, largest), dtype=torch.int64,
                                                     device=device)
        return self.window(found, 0, rows, "starts")

    def _rows_of(self, starts: torch.Tensor, piece: Piece) -> list[torch.Tensor]:
        return self._kept("rows", piece, (starts.data_ptr(),),
                          lambda: [starts[r0:r1] for _, r0, r1, _, _ in piece.runs])

    def bits(self, piece: Piece, direction: Direction, seed: int, out: torch.Tensor
             ) -> torch.Tensor:
        """The update's rounding dither where z has no random low bits, as the span path
        draws it (Direction.dither_bits) into `out` (int32, below 2^16): an exact
        structured z's, the table's bits in one gather; Rademacher's, each chunk's
        noise.random_bits."""
        if direction.kind in STRUCTURED and not direction.chunked:
            self._gather(piece, direction.dither_seed(seed), out.view(torch.float32),
                         noise_table.table)
            return out.bitwise_and_(_LOW16)
        for (i, c, _), view in zip(piece.chunks, self._chunks_of(out, piece), strict=True):
            noise.fill_bits(view, chunking.param_seed(seed, i), c)
        return out

    def perturb(self, piece: Piece, outs: list[torch.Tensor], z: torch.Tensor,
                scales: Sequence[float]) -> None:
        """outs[i] (a piece-sized run of scratch) = round(θ + scales[i]·z): the piece's
        weights copied into the first, each sign one add, summed in fp32 and rounded
        once (as intercept.perturbed_into)."""
        first = outs[0]
        torch.cat(self.weights(piece), out=first)
        for out, scale in reversed(list(zip(outs, scales, strict=True))):
            torch.add(first, z, alpha=scale, out=out)  # the first last: it is θ until then

    def sgd_update(self, piece: Piece, z: torch.Tensor, lr: float | torch.Tensor,
                   new: torch.Tensor, bits: torch.Tensor | None = None) -> None:
        """θ ← θ − lr·z (optimizers.SGD with d = z), through the fp32 buffer `new`, bf16
        weights rounded stochastically with the low bits of `bits` (int32), by default
        z's own (optimizers.store, Direction.dither_bits).

        `lr` may instead be a 0-d fp32 tensor on the device holding −lr (a CUDA graph's
        step, whose rate changes every replay): θ + z·(−lr) is then addcmul's with value
        1, one fused multiply-add as sub_'s θ − lr·z is (a value other than 1 would round
        the product first on CUDA; tests/unit/zo/test_graphs.py checks both)."""
        weights = self.weights(piece)
        torch.cat(weights, out=new)
        if isinstance(lr, torch.Tensor):
            new.addcmul_(z, lr)
        else:
            new.sub_(z, alpha=lr)
        if weights[0].dtype == torch.bfloat16:
            word = new.view(torch.int32)
            if bits is None:
                bits = workers.thread_buffer("fused_dither", z.numel(), torch.int32, z.device)
                torch.bitwise_and(z.view(torch.int32), _LOW16, out=bits)
            word.add_(bits).bitwise_and_(~_LOW16)  # rademacher's bits are below 2^16
        torch._foreach_copy_(weights, self.views(new, piece))
