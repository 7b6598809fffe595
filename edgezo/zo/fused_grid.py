"""An exact structured z a piece at a time: a mixin of `edgezo.zo.fused.Fused`.

Lowrank and subspace z are products of factors on a fixed-point grid (edgezo.zo.grid), so
a matrix's z is one product whatever rows it is computed on. Here a piece's matrices get
theirs: the small per-query factors of all of them (a lowrank U's rows, a subspace core
S) read from the table in one gather and put on the grid at once, then one product a
matrix (a subspace also its core's product with Q̂ first). The values are those
Direction.factors makes for one matrix, bit for bit (tests/unit/zo/test_fused.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from edgezo.zo import bases, chunking, grid, noise_table, workers
from edgezo.zo.direction import Direction

if TYPE_CHECKING:
    from edgezo.zo.fused import Piece


class StructuredPieces:
    """The exact structured z of a piece's matrices; the other tensors' z is Fused's. Uses
    Fused's parameters, kept views (_kept, _segments_of) and layouts (_windows)."""

    params: Sequence[torch.Tensor]
    _windows: dict

    def _structured(self, piece: Piece, direction: Direction, seed: int, out: torch.Tensor
                    ) -> None:
        """z of query `seed` on the piece's matrices, into their rows of `out`: from the
        table as the module's docstring says; from the generator each matrix draws its
        own factors (Direction.factors)."""
        device, r = out.device, direction.rank
        segments = self._segments_of(out, piece)
        mats = [(k, i, first, end) for k, (i, first, end) in enumerate(piece.segments)
                if chunking.is_matrix(self.params[i].shape)]
        if not mats:
            return
        if direction.source != "table":
            for k, i, first, end in mats:
                left, right = direction.factors(self.params[i].shape, seed, i, device)
                torch.matmul(left if end - first == len(left) else left[first:end], right,
                             out=segments[k])
            return
        lowrank = direction.kind == "lowrank"
        sizes = self._small_sizes(direction, mats)
        small = workers.thread_buffer("fused_small", sum(sizes), torch.float32, device)
        factors = [self._basis(direction, i) for _, i, _, _ in mats]
        kind = f"{direction.kind}-{r}"  # the views' shapes follow the kind and rank
        smalls = self._kept(f"small-{kind}", piece, (small.data_ptr(),),
                            lambda: list(small.split(sizes)))
        torch.index_select(noise_table.table(device), 0,
                           self._small_places(piece, direction, mats, seed, device), out=small)
        grid.to_ints(small, r)
        if lowrank:
            us = self._kept(f"small-2d-{kind}", piece, (small.data_ptr(),),
                            lambda: [f.view(-1, r) for f in smalls])
            for (k, *_), u, (_, b) in zip(mats, us, factors, strict=True):
                torch.matmul(u, b, out=segments[k])
            return
        products = workers.thread_buffer("fused_core_q", sum(q.numel() for _, q in factors),
                                         torch.float32, device)
        rows_of = self._kept(f"core-q-{kind}", piece, (products.data_ptr(), small.data_ptr()),
                             lambda: self._core_views(products, smalls, factors))
        for (s, product), (_, q) in zip(rows_of, factors, strict=True):
            torch.mm(s, q, out=product)
        ranks = [q.shape[0] for _, q in factors]
        if all(k == r for k in ranks):
            direction.core_on_grid(products, r)
        else:  # a matrix narrower than the rank (a LoRA factor): its own normalization
            for (_, product), k in zip(rows_of, ranks, strict=True):
                direction.core_on_grid(product, k)
        for (k, _, first, end), (_, product), (a, _) in zip(mats, rows_of, factors,
                                                            strict=True):
            torch.matmul(a if end - first == len(a) else a[first:end], product,
                         out=segments[k])

    def _small_places(self, piece: Piece, direction: Direction, mats: list, seed: int,
                      device: torch.device) -> torch.Tensor:
        """Where each value of the piece's small factors lies in the table: its matrix's
        place (Direction.small_seed) plus its own within that factor (a U's values from
        the segment's first row), wrapping around, as Direction.small_draw reads them."""
        r, lowrank = direction.rank, direction.kind == "lowrank"
        key = ("small-layout", piece.segments, lowrank, r, device)
        layout = self._windows.get(key)
        if layout is None:
            which: list[int] = []
            local: list[int] = []
            for n, ((_, _, first, _), count) in enumerate(
                    zip(mats, self._small_sizes(direction, mats), strict=True)):
                start = first * r if lowrank else 0
                which += [n] * count
                local += range(start, start + count)
            as_int = dict(dtype=torch.int32)  # kept while the run lasts (the planner's)
            layout = self._windows[key] = (torch.tensor(which, **as_int).to(device),
                                           torch.tensor(local, **as_int).to(device))
        which, local = layout
        starts = noise_table.to_device(
            [direction.small_seed(chunking.param_seed(seed, i)) % noise_table.TABLE_VALUES
             for _, i, _, _ in mats], device)
        places = workers.thread_buffer("fused_small_places", len(which), torch.int64, device)
        torch.index_select(starts, 0, which, out=places)
        return places.add_(local).remainder_(noise_table.TABLE_VALUES)

    def _small_sizes(self, direction: Direction, mats: list) -> list[int]:
        """Values of each matrix's small factor: a lowrank U's rows of the segment, or a
        subspace core (rank_of the matrix, squared)."""
        if direction.kind == "lowrank":
            return [(end - first) * direction.rank for _, _, first, end in mats]
        return [direction.rank_of(chunking.num_rows(shape), chunking.row_width(shape)) ** 2
                for shape in (self.params[i].shape for _, i, _, _ in mats)]

    def _basis(self, direction: Direction, i: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        shape = self.params[i].shape
        return bases.basis(direction.kind, direction.basis, i, chunking.num_rows(shape),
                           chunking.row_width(shape), direction.rank, self.params[i].device,
                           exact=True)

    @staticmethod
    def _core_views(products: torch.Tensor, smalls: list[torch.Tensor], factors: list
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(S as k x k, S·Q̂'s place in `products` as k x cols) for each matrix, k its
        rank (Q̂'s rows)."""
        views, offset = [], 0
        for s, (_, q) in zip(smalls, factors, strict=True):
            k = q.shape[0]
            views.append((s.view(k, k), products[offset:offset + q.numel()].view(k, -1)))
            offset += q.numel()
        return views
