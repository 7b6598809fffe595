"""Coordinate-wise ZO estimates (`--directions coordinate`, DeepZero's CGE).

Each query perturbs one trainable value: g_i = (L(θ + ε·e_i) − L(θ − ε·e_i)) / 2ε is that
value's partial derivative to O(ε²), and the update moves each queried value by its own
g_i (no averaging: with every coordinate queried, the update is the finite-difference
gradient itself). Two evaluations a coordinate (one doubled forward in pair mode), so it
suits small trainable sets: prompt
tuning's virtual tokens, the head of a tiny model, or a sampled subset (`--q K`: K
distinct coordinates a step, drawn from the run seed and the step, so a replay draws the
same). A step that would need more forwards than `--max-forwards` is refused before the
run starts, with its cost.
"""

from __future__ import annotations

import bisect
import itertools

import torch

from edgezo.zo import chunking

_SALT = 0xC0_0D  # the coordinate sample's seed: mix(run seed, step, salt)


def resolve_q(q: int | None, groups: list[frozenset[int]], params: list) -> int:
    """Coordinates a step queries: all of them (the true CGE), or the K asked for, at
    most all."""
    total = sum(params[i].numel() for g in groups for i in g)
    return total if q is None else min(q, total)


def too_many(forwards: int, limit: int, coordinates: int) -> str:
    return (f"coordinate-wise estimates query every coordinate on its own: {coordinates:,} "
            f"coordinates make {forwards:,} forward passes a step, over --max-forwards "
            f"{limit:,}. Query fewer a step (--q K), train a smaller set (--scheme prompt "
            "or head), or raise --max-forwards")


class Sampler:
    """Which coordinate each of a step's q queries perturbs, as flat indices over the
    parameters' values in order."""

    def __init__(self, params: list, groups: list[frozenset[int]], seed: int):
        self.starts = tuple(itertools.accumulate((p.numel() for p in params), initial=0))
        self.seed = seed
        (group,) = groups  # block-wise coordinate estimates are refused by the rules
        self.members = sorted(group)  # positions within the group's values map to these
        self.group_starts = tuple(itertools.accumulate(
            (params[i].numel() for i in self.members), initial=0))
        self.total = self.group_starts[-1]
        self._step, self._coords = -1, ()

    def _draw(self, t: int, q: int) -> tuple[int, ...]:
        if q >= self.total:
            picks = torch.arange(self.total)
        else:
            gen = torch.Generator().manual_seed(chunking.mix(self.seed, t, _SALT))
            if q * 4 >= self.total:
                picks = torch.randperm(self.total, generator=gen)[:q]
            else:  # a few distinct values out of many: no permutation of all of them
                seen: dict[int, None] = {}
                while len(seen) < q:
                    for v in torch.randint(self.total, (2 * q,), generator=gen).tolist():
                        if len(seen) < q:
                            seen.setdefault(v, None)
                picks = torch.tensor(list(seen))
        out = []
        for pos in picks.tolist():  # a position within the group's values -> flat index
            j = bisect.bisect_right(self.group_starts, pos) - 1
            out.append(self.starts[self.members[j]] + pos - self.group_starts[j])
        return tuple(out)

    def of(self, seeds: tuple[int, ...], t: int, q: int) -> tuple[int, ...]:
        """The coordinates of the given seeds of step t (query i's seed is step_seed(t, i))."""
        if self._step != t:
            self._step, self._coords = t, self._draw(t, q)
            self._by_seed = {chunking.step_seed(self.seed, t, i): c
                             for i, c in enumerate(self._coords)}
        return tuple(self._by_seed[s] for s in seeds)

    def owners(self, coords: tuple[int, ...]) -> frozenset[int]:
        """The parameters holding the coordinates (the only ones perturbed or updated)."""
        return frozenset(bisect.bisect_right(self.starts, c) - 1 for c in coords)
