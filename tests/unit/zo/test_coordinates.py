"""Coordinate-wise ZO estimates (CGE): each queried value's own central difference."""

import pytest
import torch
from conftest import lm_batch, zo_engine
from toy_problems import Logistic, logistic_data, quadratic, toy_engine

from edgezo import Session
from edgezo.config.runconfig import RunConfig
from edgezo.errors import ConfigError
from edgezo.models.tiny import VOCAB, tiny_model
from edgezo.zo.optimizers import make_optimizer

ONE_ROW = {"x": torch.zeros(1, 1, dtype=torch.float64)}


def test_all_coordinates_give_the_finite_difference_gradient_by_hand():
    """With every coordinate queried, the step is θ − η·(∂L/∂θ_i by central differences):
    on a quadratic ½Σ c_i(θ_i − t_i)², g_i = c_i(θ_i − t_i) exactly (no O(ε²) term)."""
    problem = quadratic(4)
    theta = problem.theta.detach().clone()
    c, target = problem.curvature, problem.target
    engine = toy_engine(problem, "zo-sgd", eps=1e-3, seed=2, directions="coordinate")
    r = engine.step(ONE_ROW, lr=0.1)
    engine.flush()
    exact = c * (theta - target)
    assert len(r.projected_grads) == 4 and r.forward_passes == 4  # pair: one per coordinate
    torch.testing.assert_close(torch.tensor(r.projected_grads, dtype=torch.float64), exact,
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(problem.theta.detach(), theta - 0.1 * exact,
                               rtol=1e-12, atol=1e-12)


def test_a_coordinate_sample_moves_only_its_coordinates_by_their_partials():
    data = logistic_data(n=40, dim=6)
    problem = Logistic(6)
    theta = problem.theta.detach().clone()
    exact = torch.autograd.grad(problem(data).mean(), problem.theta)[0]
    engine = toy_engine(problem, "zo-sgd", eps=1e-5, seed=3, directions="coordinate", q=2)
    engine.step({"x": data}, lr=1.0)
    engine.flush()
    moved = (theta - problem.theta.detach()).nonzero().flatten()
    assert len(moved) == 2
    torch.testing.assert_close(theta[moved] - problem.theta.detach()[moved], exact[moved],
                               rtol=1e-6, atol=1e-8)


def test_coordinate_steps_replay_exactly_and_reach_the_optimum():
    problem = quadratic(5)
    engine = toy_engine(problem, "zo-sgd", eps=1e-4, seed=1, directions="coordinate", q=2)
    start = engine.loss(ONE_ROW)
    log = [engine.step(ONE_ROW, lr=0.3).log_entry() for _ in range(200)]
    engine.flush()
    assert engine.loss(ONE_ROW) < 1e-6 * start
    fresh = quadratic(5)
    again = toy_engine(fresh, "zo-sgd", eps=1e-4, seed=1, directions="coordinate", q=2)
    for entry in log:
        again.replay(entry)
    again.flush()
    assert torch.equal(fresh.theta, problem.theta)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_coordinates_on_a_prompt_and_an_embedding_row_lookup(family):
    """On a real model's embedding (row lookups) and layers: the only changed values are
    the queried ones, each by −η·g of its own query."""
    model = tiny_model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = zo_engine(model, make_optimizer("zo-sgd"), seed=0, eps=1e-3,
                       directions="coordinate", q=3)
    r = engine.step(lm_batch(VOCAB), lr=1.0)
    engine.flush()
    changes = [(n, (p.detach() - before[n]).flatten()) for n, p in model.named_parameters()]
    moved = sorted(float(-d[i]) for _, d in changes for i in d.nonzero().flatten())
    assert len(moved) <= 3
    assert moved == pytest.approx(sorted(g for g in r.projected_grads if g != 0), rel=1e-3)


def test_too_many_forwards_is_refused_with_the_cost(tiny_folder, data_dir):
    with pytest.raises(ConfigError, match="query every coordinate on its own"):
        Session(model=tiny_folder, data_dir=data_dir, directions="coordinate")
    sess = Session(model=tiny_folder, data_dir=data_dir, scheme="prompt", prompt_tokens=1,
                   directions="coordinate", max_forwards=100, batch_size=2)
    try:
        assert sess.engine.q == 32  # one virtual token of width 32: every value
        assert sess.report()["forward_passes_per_step"] == 32
    finally:
        sess.close()


@pytest.mark.parametrize("options", [
    {"directions": "coordinate", "optimizer": "hizoo"},
    {"directions": "coordinate", "block_wise": True},
    {"directions": "coordinate", "sparsity": 0.5},
    {"max_forwards": 50},
])
def test_coordinates_refuse_what_they_cannot_combine_with(options):
    with pytest.raises(ConfigError, match="coordinate"):
        RunConfig.from_flat(**options).validate()
