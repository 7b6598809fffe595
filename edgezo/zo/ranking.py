"""Learning from rankings instead of losses (ZO-RankSGD, Tang et al., arXiv 2303.03751).

Some objectives give no number, only an order: a person (or a judge model) picks the
better of two answers. `Session.rank_step` generates each candidate's answers at
θ + μ·z_k for m directions z_k, asks a ranking function for their order, and moves θ by
the rank-based estimate

    ĝ = (1/|E|) · Σ_{(i, j) ∈ E} (z_i − z_j),

where E holds a pair (i, j) for every candidate i ranked above a candidate j; θ ← θ + η·ĝ
(towards the preferred ones). Each candidate's coefficient is (candidates it beats −
candidates that beat it) / |E|. Candidates left out of a partial ranking (top-k
feedback) rank below every listed one and tie among themselves; a tied group adds no
edge; an empty ranking (no preference) moves nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edgezo.errors import ConfigError
from edgezo.zo.result import StepResult

Ranking = Sequence[int | Sequence[int]] | None
RankFn = Callable[[list[list[str]]], Ranking]


def coefficients(order: Ranking, m: int) -> list[float]:
    """Each candidate's weight in ĝ, from an order given best first: an index, or a
    group of tied indices, per place."""
    if not order:
        return [0.0] * m
    places: list[list[int]] = [[p] if isinstance(p, int) else list(p) for p in order]
    listed = [i for place in places for i in place]
    if any(not isinstance(i, int) or not 0 <= i < m for i in listed):
        raise ConfigError(f"a ranking holds candidate indices 0..{m - 1}, got {list(order)}")
    if len(set(listed)) != len(listed):
        raise ConfigError(f"a ranking lists each candidate once, got {list(order)}")
    rest = [i for i in range(m) if i not in listed]
    if rest:
        places.append(rest)  # unranked: below every ranked one, tied among themselves
    wins = [0] * m
    edges = 0
    for p, place in enumerate(places):
        below = sum(len(q) for q in places[p + 1:])
        for i in place:
            wins[i] += below
            edges += below
        for q in places[p + 1:]:
            for j in q:
                wins[j] -= len(place)
    return [w / edges for w in wins] if edges else [0.0] * m


@dataclass
class RankResult:
    """One rank step: each candidate's answers, the order given, the weights it made."""

    outputs: list[list[str]]
    order: Ranking
    coefs: list[float]
    step: StepResult
