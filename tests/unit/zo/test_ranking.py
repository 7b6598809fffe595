"""Rank feedback (ZO-RankSGD): the estimator's weights by hand, its update, convergence from
orderings alone, and Session.rank_step end to end."""

import pytest
import torch
from toy_problems import ONE_ROW_X, quadratic, toy_engine

from edgezo import Session
from edgezo.errors import ConfigError
from edgezo.zo import chunking
from edgezo.zo.direction import Direction
from edgezo.zo.ranking import coefficients


@pytest.mark.parametrize("order, m, expected", [
    ([0, 1], 2, [1.0, -1.0]),          # one edge: ĝ = z0 − z1
    ([1], 2, [-1.0, 1.0]),             # top-1 of two is the full order
    ([2, 0, 1], 3, [0.0, -2 / 3, 2 / 3]),  # (wins − losses)/3 edges: 0→0, 1→−2, 2→+2
    ([3], 4, [-1 / 3, -1 / 3, -1 / 3, 1.0]),  # top-1 of 4: 3 edges, the rest tie below
    ([[0, 1], 2], 3, [0.5, 0.5, -1.0]),  # a tied pair above the third: 2 edges
    ([], 3, [0.0, 0.0, 0.0]), (None, 2, [0.0, 0.0]),  # no preference
])
def test_rank_weights_by_hand(order, m, expected):
    assert coefficients(order, m) == pytest.approx(expected)


@pytest.mark.parametrize("order", [[0, 0], [2], [0, [0, 1]]])
def test_malformed_rankings_are_refused(order):
    with pytest.raises(ConfigError):
        coefficients(order, 2)


def ranked_step(engine, objective, m: int, mu: float, lr: float):
    """One rank step of a toy: the oracle orders the m perturbed points by `objective`."""
    values = []
    for k in range(m):
        with engine.perturbed_query(k, mu):
            values.append(float(objective()))
    order = sorted(range(m), key=values.__getitem__)  # lower objective = preferred
    return engine.step_along([-c for c in coefficients(order, m)], lr)


def test_step_moves_towards_the_preferred_candidate_exactly():
    problem = quadratic(4)
    engine = toy_engine(problem, "zo-sgd", eps=1e-3, seed=5)
    theta = problem.theta.detach().clone()
    r = engine.step_along([-c for c in coefficients([1, 0], 2)], lr=0.1)  # 1 preferred
    engine.flush()
    z = [Direction((s,), (1.0,)).full(theta.shape, 0, dtype=torch.float64) for s in r.seeds]
    assert r.seeds == [chunking.step_seed(5, 0, k) for k in range(2)]
    torch.testing.assert_close(problem.theta.detach(), theta + 0.1 * (z[1] - z[0]))


def test_orderings_alone_minimise_a_quadratic_and_replay():
    """The oracle sees only which perturbed point is better, never a value; 400 steps of
    4 candidates bring the loss below 1% of its start (the estimate is ∝ the gradient's
    direction in expectation)."""
    problem = quadratic(5)
    engine = toy_engine(problem, "zo-sgd", eps=1e-3, seed=1)
    start = engine.loss(ONE_ROW_X)
    log = []
    for t in range(400):
        lr = 0.05 * (1 - t / 400)
        log.append(ranked_step(engine, lambda: problem(ONE_ROW_X["x"]), 4, 1e-3, lr)
                   .log_entry())
    engine.flush()
    assert engine.loss(ONE_ROW_X) < 0.01 * start
    fresh = quadratic(5)
    again = toy_engine(fresh, "zo-sgd", eps=1e-3, seed=1)
    for entry in log:
        again.replay(entry)
    again.flush()
    assert torch.equal(fresh.theta, problem.theta)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rank_step_generates_per_candidate_and_updates(tmp_path, family):
    """Each candidate answers at its own θ + μ·z_k; the ranking's weights move the
    adapters; the step is logged for replay."""
    from edgezo.models.tiny import save_tiny

    save_tiny(tmp_path, family)
    sess = Session(model=str(tmp_path), task=None, scheme="lora", lr=1e-2, seed=0)
    try:
        before = {n: p.detach().clone() for n, p in sess.model.named_parameters()
                  if p.requires_grad}
        seen = []

        def prefer_last(outputs):
            seen.append(outputs)
            return [len(outputs) - 1]

        r = sess.rank_step(["the cat", "a dog and"], prefer_last, candidates=3,
                           max_new_tokens=4, mu=0.5)
        assert len(seen) == 1 and len(r.outputs) == 3
        assert all(len(o) == 2 and all(isinstance(t, str) for t in o) for o in r.outputs)
        assert r.coefs == pytest.approx([-0.5, -0.5, 1.0])
        after = dict(sess.model.named_parameters())
        assert any(not torch.equal(after[n], v) for n, v in before.items())
        assert r.step.log_entry()["groups"][0]["coefs"] == [0.5, 0.5, -1.0]
        assert sess.history[-1] is r.step
        none = sess.rank_step("the cat", lambda outputs: None, max_new_tokens=2)
        assert none.coefs == [0.0, 0.0] and not none.step.groups[0]["applied"]
    finally:
        sess.close()


def test_rank_steps_refuse_what_they_cannot_replay(tmp_path):
    """Sparse masks (redrawn by step()) or a curvature method would make the candidates or
    the replay differ: refused before any candidate is generated."""
    problem = quadratic(3)
    engine = toy_engine(problem, "zo-sgd", eps=1e-3, seed=0, sparsity=0.5)
    with pytest.raises(ConfigError, match="steps from rankings"), \
            engine.perturbed_query(0, 1e-3):
        pass
    hizoo = toy_engine(quadratic(3), "hizoo", eps=1e-3, seed=0)
    with pytest.raises(ConfigError, match="steps from rankings"):
        hizoo.step_along([1.0, -1.0], lr=0.1)
