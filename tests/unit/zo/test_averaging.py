"""Tail averaging from the seed log: the mean of the last weights, with no copy kept."""

import pytest
import torch
from conftest import lm_batch, zo_engine
from test_estimators import matrix_quadratic
from toy_problems import ONE_ROW_X, toy_engine

from edgezo.errors import ConfigError
from edgezo.models.tiny import VOCAB, tiny_model
from edgezo.zo.optimizers import make_optimizer


def run_and_keep(engine, params, steps: int, lr: float, batch_of=lambda t: ONE_ROW_X):
    """Step the engine, keeping each step's log line and the weights after it."""
    entries, after = [], []
    for t in range(steps):
        r = engine.step(batch_of(t), lr=lr)
        engine.flush()
        entries.append(r.log_entry())
        after.append([p.detach().clone() for p in params])
    return entries, after


def assert_mean_of_last(params, after, count: int, tol: float = 1e-6):
    """The weights equal the mean of the last `count` kept ones, to `tol` of the distance
    the last steps moved (d is summed in fp32) and a few roundings of the weights' dtype."""
    for i, p in enumerate(params):
        kept = torch.stack([a[i].double() for a in after[-count:]])
        moved = (kept[-1] - kept[0]).abs().max().item()
        assert moved > 0
        torch.testing.assert_close(p.detach().double(), kept.mean(0),
                                   rtol=8 * torch.finfo(p.dtype).eps, atol=tol * moved)


@pytest.mark.parametrize("count", [1, 2, 4, 7])
@pytest.mark.parametrize("name, kw", [
    ("zo-sgd", {}),
    ("zo-sgd", {"q": 3, "directions": "rademacher"}),
    ("zo-sgd", {"pair": False, "noise": "table"}),
    ("fzoo", {"q": 4}),  # each step's scale is the spread of its queries
    ("zo-sgd", {"directions": "lowrank", "rank": 1, "basis_every": 3}),  # bases change
    ("forward-grad", {"eps": None}),
    ("zo-sgd-cons", {}),  # each step's move (1, 0 or -1) is in its logged rate
])
def test_the_tail_average_is_the_mean_of_the_last_weights(name, kw, count):
    problem = matrix_quadratic()
    kw = dict(kw)
    pair = kw.pop("pair", True)
    kw = {"eps": 1e-3, **kw}
    engine = toy_engine(problem, name, seed=3, pair=pair, **kw)
    entries, after = run_and_keep(engine, [problem.theta], 7, lr=0.05)
    engine.average_tail(entries[-count:])
    engine.flush()
    if count == 1:  # the mean of one: the last weights, untouched
        assert torch.equal(problem.theta.detach(), after[-1][0])
    else:
        assert_mean_of_last([problem.theta], after, count)
    assert engine.step_index == 7  # no step taken


@pytest.mark.parametrize("block_wise", [False, True])
def test_a_language_models_every_parameter_is_averaged(block_wise):
    """Embedding rows, linear maps, norms and the tied head, in one group or block by
    block (each block its own seeds)."""
    model = tiny_model("llama")
    params = [p for p in model.parameters() if p.requires_grad]
    engine = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-2, block_wise=block_wise)
    entries, after = run_and_keep(engine, params, 5, lr=1e-2,
                                  batch_of=lambda t: lm_batch(VOCAB, seed=t))
    engine.average_tail(entries[-3:])
    engine.flush()
    assert_mean_of_last(params, after, 3, tol=1e-5)
    engine.close()


def test_in_bf16_the_average_is_rounded_once():
    """bf16 weights: the mean is summed in fp32 and stochastically rounded once, so each
    weight is one of the two bf16 values around θ_T + the undone share of the updates."""
    model = tiny_model("llama", dtype=torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-2)
    entries, after = run_and_keep(engine, params, 6, lr=1e-3,
                                  batch_of=lambda t: lm_batch(VOCAB, seed=t))
    engine.average_tail(entries[-4:])
    engine.flush()
    # the same mean in fp32 and in one piece, from a copy of the last weights
    model_ref = tiny_model("llama", dtype=torch.float32)
    ref = [p for p in model_ref.parameters() if p.requires_grad]
    with torch.no_grad():
        for r, a in zip(ref, after[-1], strict=True):
            r.copy_(a.float())
    ref_engine = zo_engine(model_ref, make_optimizer("zo-sgd"), eps=1e-2)
    ref_engine.step_index = 6
    ref_engine.average_tail(entries[-4:])
    ref_engine.flush()
    for p, r in zip(params, ref, strict=True):
        exact = r.detach()
        spacing = exact.abs() * 2 ** -7  # at least one bf16 step at the exact mean
        assert ((p.detach().float() - exact).abs() <= spacing).all()
    moved = sum(int((p != a).sum()) for p, a in zip(params, after[-1], strict=True))
    assert moved > 0
    engine.close()
    ref_engine.close()


@pytest.mark.parametrize("name, kw, needle", [
    ("zo-adam", {}, "state or sign"),
    ("zo-sgd-mmt", {}, "state or sign"),
    ("zo-sgd-sign", {}, "state or sign"),
    ("hizoo", {}, "state or sign"),
    ("zo-sgd", {"weight_decay": 0.1}, "weight decay"),
])
def test_updates_that_are_not_a_multiple_of_their_direction_are_refused(name, kw, needle):
    problem = matrix_quadratic()
    engine = toy_engine(problem, name, opt_kwargs=kw, eps=1e-3)
    entries, _ = run_and_keep(engine, [problem.theta], 2, lr=0.01)
    with pytest.raises(ConfigError, match=needle):
        engine.average_tail(entries)


def test_the_log_must_be_the_runs_last_steps_in_order():
    problem = matrix_quadratic()
    engine = toy_engine(problem, "zo-sgd", eps=1e-3)
    entries, _ = run_and_keep(engine, [problem.theta], 4, lr=0.01)
    for wrong in (entries[:2], entries[:1] + entries[2:], entries[::-1]):
        with pytest.raises(ConfigError, match="in order"):
            engine.average_tail(wrong)
