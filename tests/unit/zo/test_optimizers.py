"""Every optimizer and estimator option, checked against known optima, hand-computed
steps, torch.optim and autograd."""

import copy

import pytest
import torch
from conftest import lm_batch, zo_engine
from toy_problems import Logistic, logistic_data, logistic_optimum, quadratic, toy_engine

from edgezo.models.tiny import VOCAB, tiny_model
from edgezo.tasks.loss import example_losses
from edgezo.zo import chunking, noise, noise_table
from edgezo.zo.blocks import build_block_map, estimation_groups
from edgezo.zo.direction import Direction
from edgezo.zo.optimizers import OPTIMIZERS, make_optimizer
from edgezo.zo.schedule import Schedule

ONE_ROW = {"x": torch.zeros(1, 1, dtype=torch.float64)}

# Peak learning rates, decayed linearly to 0 over the run.
LR = {"zo-sgd": 0.05, "zo-sgd-sign": 0.05, "zo-sgd-mmt": 0.01, "zo-sgd-cons": 0.05,
      "zo-adam": 0.1, "fzoo": 0.1, "hizoo": 0.05, "hizoo-l": 0.05, "forward-grad": 0.05,
      "forward-grad-mmt": 0.01, "forward-grad-adam": 0.1, "fo-sgd": 0.3, "fo-adam": 0.1}
STEPS = 300


def run(engine, batch: dict, lr: float, steps: int = STEPS) -> float:
    schedule = Schedule(lr, "linear", steps)
    for t in range(steps):
        engine.step(batch, schedule(t))
    return engine.loss(batch)


def zo_eps(name: str, eps: float) -> dict:
    """ε for the optimizers that perturb (ZO); the others take none."""
    return {"eps": eps} if OPTIMIZERS[name].estimator == "zo" else {}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_converges_on_a_quadratic(name):
    """Within 300 steps the loss falls below 1e-3 of its start (5 dimensions)."""
    engine = toy_engine(quadratic(5), name, seed=1, **zo_eps(name, 1e-4))
    start = engine.loss(ONE_ROW)
    assert run(engine, ONE_ROW, LR[name]) < 1e-3 * start


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_converges_on_logistic_regression(name):
    """Within 300 steps the mean loss is within 0.01 of the L-BFGS optimum."""
    data = logistic_data()
    engine = toy_engine(Logistic(4), name, seed=1, **zo_eps(name, 1e-4))
    assert run(engine, {"x": data}, 2 * LR[name]) - logistic_optimum(data) < 1e-2


@pytest.mark.parametrize("directions", ["gaussian", "rademacher"])
def test_zo_estimate_is_unbiased(directions):
    """E[g·z] = ∇L: the mean of 4000 queries is within 4.5 standard errors of the exact
    gradient in every coordinate (a smooth, non-quadratic loss)."""
    data = logistic_data(n=50, dim=3)
    problem = Logistic(3)
    with torch.no_grad():
        problem.theta.copy_(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    theta = problem.theta.detach().clone()
    loss = problem(data).mean()
    exact = torch.autograd.grad(loss, problem.theta)[0]
    q = 4000
    engine = toy_engine(problem, "zo-sgd", eps=1e-4, seed=7, q=q, directions=directions)
    r = engine.step({"x": data}, lr=1.0)
    engine.flush()
    mean = theta - problem.theta.detach()  # θ − 1·d, d = (1/q)·Σ g_i z_i
    # per-coordinate variance of g·z_j: E[(∇L·z)² z_j²] − ∇L_j² ≤ |∇L|² + 2∇L_j²
    se = torch.sqrt((exact.pow(2).sum() + 2 * exact.pow(2)) / q)
    assert len(r.projected_grads) == q
    assert ((mean - exact).abs() < 4.5 * se).all(), (mean, exact, se)


def test_q_queries_equal_the_mean_of_single_query_estimates():
    problem = quadratic(4)
    single = toy_engine(copy.deepcopy(problem), "zo-sgd", eps=1e-3, seed=3)
    seeds = [chunking.step_seed(3, 0, i) for i in range(4)]
    singles = []
    for s in seeds:
        plus, minus = single.losses(ONE_ROW, s)
        singles.append((plus - minus) / 2e-3)
    engine = toy_engine(problem, "zo-sgd", eps=1e-3, seed=3, q=4)
    theta = problem.theta.detach().clone()
    r = engine.step(ONE_ROW, lr=0.1)
    assert r.seeds == seeds and r.projected_grads == singles
    engine.flush()
    expected = theta - 0.1 * sum(g * noise.full((4,), chunking.param_seed(s, 0)).double()
                                 for s, g in zip(r.seeds, singles, strict=True)) / 4
    torch.testing.assert_close(problem.theta.detach(), expected, rtol=1e-8, atol=0)
    assert len(set(r.seeds)) == 4


def test_one_sided_estimate_uses_the_unperturbed_loss():
    problem = quadratic(3)
    engine = toy_engine(problem, "zo-sgd", eps=1e-3, seed=2, estimate="one-sided")
    base = engine.loss(ONE_ROW)
    r = engine.step(ONE_ROW, lr=0.0)
    z = noise.full((3,), chunking.param_seed(r.seed, 0)).double()
    with torch.no_grad():
        plus = problem(torch.zeros(1, 1))[0]
        problem.theta.add_(1e-3 * z)
        plus = problem(torch.zeros(1, 1))[0].item()
        problem.theta.sub_(1e-3 * z)
    assert r.loss == base and r.forward_passes == 2
    assert r.projected_grad == pytest.approx((plus - base) / 1e-3, rel=1e-9)


def test_rademacher_directions_are_plus_minus_one():
    z = noise.full((1000,), 5, kind="rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 0.1


# -- hand-computed steps on a 3-parameter problem ------------------------------------------
def hand_setup(name: str, **opt_kwargs):
    problem = quadratic(3)
    engine = toy_engine(problem, name, seed=11, opt_kwargs=opt_kwargs, **zo_eps(name, 1e-3))
    return problem, engine


def grad_estimate(problem, seed: int, eps: float = 1e-3) -> torch.Tensor:
    """The two-point estimate g·z along seed's z, computed by hand."""
    z = noise.full((3,), chunking.param_seed(seed, 0)).double()
    theta = problem.theta.detach()
    a, t = problem.curvature, problem.target

    def loss(th):
        return 0.5 * (a * (th - t) ** 2).sum()

    g = (loss(theta + eps * z) - loss(theta - eps * z)) / (2 * eps)
    return g * z


def test_sign_matches_a_hand_computed_step():
    problem, engine = hand_setup("zo-sgd-sign")
    theta = problem.theta.detach().clone()
    r = engine.step(ONE_ROW, lr=0.1)
    d = grad_estimate(problem, r.seed)
    engine.flush()
    torch.testing.assert_close(problem.theta.detach(), theta - 0.1 * d.sign(), rtol=0, atol=0)


def test_momentum_matches_hand_computed_steps():
    problem, engine = hand_setup("zo-sgd-mmt", momentum=0.8)
    m = torch.zeros(3, dtype=torch.float64)
    for step in range(3):
        theta = problem.theta.detach().clone()
        r = engine.step(ONE_ROW, lr=0.05)
        d = grad_estimate(problem, r.seed)
        engine.flush()
        m = 0.8 * m + d
        torch.testing.assert_close(problem.theta.detach(), theta - 0.05 * m, rtol=1e-8,
                                   atol=0, msg=f"step {step}")


def test_adam_matches_hand_computed_steps():
    b1, b2, eps = 0.8, 0.9, 1e-6
    problem, engine = hand_setup("zo-adam", betas=(b1, b2), adam_eps=eps)
    m = torch.zeros(3, dtype=torch.float64)
    v = torch.zeros(3, dtype=torch.float64)
    for t in range(1, 4):
        theta = problem.theta.detach().clone()
        r = engine.step(ONE_ROW, lr=0.05)
        d = grad_estimate(problem, r.seed)
        engine.flush()
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        expected = theta - 0.05 * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        torch.testing.assert_close(problem.theta.detach(), expected, rtol=1e-8, atol=0)
    # moments are fp32 for fp32/bf16/fp16 weights (fp64 for fp64 ones)
    for dtype in (torch.bfloat16, torch.float16):
        bf = zo_engine(tiny_model("llama", dtype=dtype), make_optimizer("zo-adam"), seed=0)
        assert all(m.dtype == torch.float32 for m in bf.optimizer.rule.state["exp_avg"])
        bf.close()


def test_zo_sgd_with_weight_decay_is_exact_and_leaves_the_noise_table_alone():
    """θ ← θ − η·(g·z + λθ), against an fp32 reference, step after step. Without weight
    decay ZO-SGD's update reads z as a view of the shared table and folds g into the
    rate; with it, the rule adds λθ to d in place, so that shortcut would scale λθ by g
    and write θ into the table (every later direction of the process would change)."""
    table = noise_table.table(torch.device("cpu"))
    saved = table.clone()
    model = tiny_model("llama")
    wd, lr = 0.1, 0.05
    engine = zo_engine(model, make_optimizer("zo-sgd", weight_decay=wd), eps=1e-3, seed=1)
    params = engine.blocks.params
    for step in range(2):
        before = [p.detach().clone() for p in params]
        zs = [noise.full(p.shape, chunking.param_seed(chunking.step_seed(1, step, 0), i))
              for i, p in enumerate(params)]  # drawn before the step reads the table
        r = engine.step(lm_batch(VOCAB, seed=step), lr=lr)
        engine.flush()
        assert torch.equal(table, saved), f"step {step} wrote into the noise table"
        g = r.projected_grad
        assert abs(g - 1) > 0.5  # λθ scaled by g would be off by λθ·|g − 1|
        for i, p in enumerate(params):
            expected = before[i] - lr * (g * zs[i] + wd * before[i])
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=2e-6,
                                       msg=f"step {step} {engine.blocks.names[i]}")
    engine.close()


@pytest.mark.parametrize("lr", [0.05, 3.0])  # a small lr takes the step; a huge one must not
def test_conservative_keeps_the_lowest_of_three_points(lr):
    problem, engine = hand_setup("zo-sgd-cons")
    theta = problem.theta.detach().clone()
    r = engine.step(ONE_ROW, lr=lr)
    d = grad_estimate(problem, r.seed)
    engine.flush()
    a, t = problem.curvature, problem.target
    candidates = {0: theta, 1: theta - lr * d, -1: theta + lr * d}
    losses = {m: (0.5 * (a * (th - t) ** 2).sum()).item() for m, th in candidates.items()}
    best = min(losses, key=lambda m: (losses[m], [0, 1, -1].index(m)))
    assert r.move == [best]
    torch.testing.assert_close(problem.theta.detach(), candidates[best], rtol=1e-8, atol=0)
    assert r.forward_passes == 3  # estimate (pair), L(θ), L(θ ± η·d) (pair)
    assert r.batch_forwards == 5  # the doubled forwards count two


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_conservative_moves_are_exact(dtype):
    """The weights kept are bit-for-bit the trial point whose loss was measured:
    round(θ − m·η·d), rounded once, exactly as the perturbed forward builds it."""
    model = tiny_model("llama", dtype=dtype)
    before = [p.detach().clone() for p in build_block_map(model).params]
    engine = zo_engine(model, make_optimizer("zo-sgd-cons"), eps=1e-2, seed=0)
    r = engine.step(lm_batch(VOCAB), lr=0.05)
    engine.flush()
    (move,) = r.move
    d = Direction(tuple(r.seeds), tuple(r.projected_grads), "gaussian")
    for i, p in enumerate(engine.blocks.params):
        expected = torch.add(before[i], d.full(p.shape, i), alpha=-move * 0.05).to(dtype)
        assert torch.equal(p.detach(), expected)
    engine.close()


def test_fo_baselines_are_torch_sgd_and_adam():
    model = tiny_model("qwen2")
    reference = copy.deepcopy(model)
    for name, torch_opt in (("fo-sgd", lambda ps: torch.optim.SGD(ps, lr=0.05,
                                                                     weight_decay=0.01)),
                            ("fo-adam", lambda ps: torch.optim.Adam(ps, lr=0.01,
                                                                      weight_decay=0.01))):
        ours, theirs = copy.deepcopy(model), copy.deepcopy(reference)
        engine = zo_engine(ours, make_optimizer(name, weight_decay=0.01), seed=0)
        opt = torch_opt([p for p in theirs.parameters()])
        theirs.eval()
        for step in range(3):
            batch = lm_batch(VOCAB, seed=step)
            r = engine.step(batch, lr=0.05 if name == "fo-sgd" else 0.01)
            opt.zero_grad()
            loss = example_losses(theirs, batch).mean()
            loss.backward()
            opt.step()
            assert r.loss == pytest.approx(loss.item(), rel=1e-6)
            assert (r.forward_passes, r.backward_passes) == (1, 1)
        engine.close()
        for (n, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=f"{name} {n}")


def test_forward_gradient_is_the_exact_directional_derivative():
    model = tiny_model("gpt2", dtype=torch.float64)  # LayerNorm stays fp64 (RMSNorm: fp32)
    batch = lm_batch(VOCAB)
    blocks = build_block_map(model)
    loss = example_losses(model, batch).mean()
    grads = torch.autograd.grad(loss, blocks.params)
    engine = zo_engine(model, make_optimizer("forward-grad"), seed=4, q=2, blocks=blocks)
    r = engine.step(batch, lr=0.0)
    engine.close()
    for s, g in zip(r.seeds, r.projected_grads, strict=True):
        exact = sum((gr * noise.full(p.shape, chunking.param_seed(s, i)).double()).sum()
                    for i, (p, gr) in enumerate(zip(blocks.params, grads, strict=True)))
        assert g == pytest.approx(exact.item(), rel=1e-9)
    assert r.loss == pytest.approx(loss.item(), rel=1e-12)


# -- block-wise ---------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["layer", "half"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3"])
def test_block_wise_perturbs_one_group_per_query_with_its_own_seed(family, granularity):
    model = tiny_model(family)
    engine = zo_engine(model, make_optimizer("zo-sgd"), seed=0, block_wise=True,
                      granularity=granularity)
    seen = []
    inner = engine.perturbation.perturbed

    def spy(direction, eps, sign, pair_rows=0):
        seen.append(direction)
        return inner(direction, eps, sign, pair_rows)

    engine.perturbation.perturbed = spy
    r = engine.step(lm_batch(VOCAB), lr=1e-3)
    engine.close()
    groups = engine.groups
    n_layers = model.config.num_hidden_layers
    assert len(groups) == 2 + n_layers * (2 if granularity == "half" else 1)
    assert [d.active for d in seen] == groups  # one query per group, in order
    assert sorted(i for g in groups for i in g) == list(range(len(engine.blocks.params)))
    assert len(set(r.seeds)) == len(groups) and r.forward_passes == len(groups)


def test_block_wise_directions_differ_between_layers():
    """ZO-Bench reused one z for every block; here same-shaped tensors in different
    layers get different directions."""
    model = tiny_model("llama")
    engine = zo_engine(model, make_optimizer("zo-sgd"), seed=0, block_wise=True)
    r = engine.step(lm_batch(VOCAB), lr=1e-3)
    engine.close()
    names = engine.blocks.names
    q0 = names.index("model.layers.0.self_attn.q_proj.weight")
    q1 = names.index("model.layers.1.self_attn.q_proj.weight")
    group_of = {i: k for k, g in enumerate(engine.groups) for i in g}
    shape = engine.blocks.params[q0].shape
    z0 = noise.full(shape, chunking.param_seed(r.seeds[group_of[q0]], q0))
    z1 = noise.full(shape, chunking.param_seed(r.seeds[group_of[q1]], q1))
    assert not torch.equal(z0, z1)


def test_half_granularity_splits_attention_from_mlp():
    model = tiny_model("llama")
    blocks = build_block_map(model)
    groups = estimation_groups(model, blocks, "half")
    first_layer = [[blocks.names[i] for i in g] for g in groups
                   if any(".layers.0." in blocks.names[i] for i in g)]
    assert len(first_layer) == 2
    assert all("self_attn" in n or "input_layernorm" in n for n in first_layer[0])
    assert all("mlp" in n or "post_attention_layernorm" in n for n in first_layer[1])


# -- sparsity -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["random", "magnitude"])
def test_sparsity_perturbs_and_updates_exactly_the_requested_fraction(mode):
    model = tiny_model("gpt2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = zo_engine(model, make_optimizer("zo-sgd"), seed=0, sparsity=0.75,
                      sparsity_mask=mode)
    r = engine.step(lm_batch(VOCAB), lr=0.5)
    engine.flush()
    masks = engine.masks
    for i, p in enumerate(engine.blocks.params):
        assert p.numel() % 4 == 0  # so a quarter of it is exact, no rounding to argue
        k = p.numel() // 4  # S = 0.75 leaves a quarter perturbed
        assert int(masks.masks[i].sum()) == k
        d = Direction((r.seed,), (1.0,), "gaussian", masks).full(p.shape, i)
        assert int((d != 0).sum()) == k
        moved = p.detach() != before[engine.blocks.names[i]]
        assert not (moved & ~masks.masks[i]).any()  # nothing outside the mask changed
        if mode == "magnitude":
            mag = before[engine.blocks.names[i]].abs()
            kept, dropped = mag[masks.masks[i]], mag[~masks.masks[i]]
            if kept.numel() and dropped.numel():
                assert kept.max() <= dropped.min()  # the smallest weights are perturbed
    engine.close()


def test_sparse_masks_are_redrawn_every_k_steps():
    model = tiny_model("llama")
    engine = zo_engine(model, make_optimizer("zo-sgd"), seed=0, sparsity=0.5,
                      sparsity_every=2)
    history = []
    for step in range(5):
        engine.step(lm_batch(VOCAB, seed=step), lr=1e-3)
        history.append(engine.masks.masks[1].clone())
    engine.close()
    assert torch.equal(history[0], history[1]) and not torch.equal(history[1], history[2])
    assert torch.equal(history[2], history[3]) and not torch.equal(history[3], history[4])


# -- hybrid ZO/FO -------------------------------------------------------------------------
def test_hybrid_gives_fo_blocks_the_exact_backprop_gradient():
    model = tiny_model("qwen2", dtype=torch.float64)
    batch = lm_batch(VOCAB)
    reference = copy.deepcopy(model)
    loss = example_losses(reference, batch).mean()
    loss.backward()
    engine = zo_engine(model, make_optimizer("zo-sgd"), seed=0, fo_blocks=["head", "-1"])
    fo = engine.fo_indices
    names = {engine.blocks.names[i] for i in fo}
    assert "lm_head.weight" in names and any(".layers.1." in n for n in names)
    assert not any(".layers.0." in n for n in names)
    r = engine.step(batch, lr=0.1)
    engine.close()
    assert r.backward_passes == 1 and r.forward_passes == 2
    ref = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        if n in names:
            torch.testing.assert_close(p, ref[n] - 0.1 * ref[n].grad, rtol=0, atol=1e-12)
        else:
            assert not torch.equal(p, ref[n])  # the ZO part moved too


def test_hybrid_memory_cost_is_planned(tiny_folder, data_dir):
    from edgezo.run.session import Session

    plain = Session(model=tiny_folder, data_dir=data_dir, batch_size=4)
    hybrid = Session(model=tiny_folder, data_dir=data_dir, batch_size=4, fo_blocks=["head"])
    try:
        assert "fo_gradients" not in plain.plan.components
        assert hybrid.plan.components["fo_gradients"] > 0
        assert hybrid.plan.components["fo_activations"] > 0
        assert hybrid.plan.phases["train"] > plain.plan.phases["train"]
        assert hybrid.report()["backward_passes_per_step"] == 1
    finally:
        plain.close()
        hybrid.close()


# -- schedules and state ------------------------------------------------------------------
def test_schedules():
    s = Schedule(1.0, "linear", total_steps=10, warmup_steps=2)
    assert [s(t) for t in (0, 1, 2)] == [0.5, 1.0, 1.0] and s(6) == pytest.approx(0.5)
    c = Schedule(1.0, "cosine", total_steps=4)
    assert c(0) == 1.0 and c(2) == pytest.approx(0.5) and c(4) == pytest.approx(0.0)
    assert Schedule(0.3)(1000) == 0.3


@pytest.mark.parametrize("name, per_param", [("zo-sgd", 0), ("zo-sgd-sign", 0),
                                             ("zo-sgd-mmt", 4), ("zo-sgd-cons", 0),
                                             ("zo-adam", 8), ("fo-adam", 8)])
def test_optimizers_declare_their_state_and_allocate_exactly_that(name, per_param):
    model = tiny_model("llama")
    engine = zo_engine(model, make_optimizer(name), seed=0)
    state = sum(t.numel() * t.element_size() for ts in engine.optimizer.rule.state.values()
                for t in ts)
    assert engine.optimizer.state_bytes_per_param == per_param
    assert state == per_param * engine.blocks.numel()
    engine.close()


def test_lr_zero_steps_restore_weights_for_every_stateless_optimizer():
    for name in ("zo-sgd-sign", "zo-sgd-cons", "forward-grad"):
        model = tiny_model("llama", dtype=torch.bfloat16)
        before = {n: p.clone() for n, p in model.state_dict().items()}
        engine = zo_engine(model, make_optimizer(name), seed=0)
        engine.step(lm_batch(VOCAB), lr=0.0)
        engine.close()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), name


@pytest.mark.parametrize("name", ["zo-sgd", "zo-sgd-sign", "zo-sgd-mmt", "zo-adam",
                                  "fo-sgd"])
def test_stochastic_rounding_keeps_the_mean_of_many_tiny_updates(name):
    """bf16 weights at 1.0 (ulp 2^-7) take 64 updates of a tenth of an ulp each, through
    the rule and with the dither the engine uses (z's low bits for ZO, seeded bits for
    FO): round-to-nearest would keep every weight at 1.0; stochastic rounding moves the
    mean by the sum of the updates (6.4 ulps), to within 2%."""
    from edgezo.zo.direction import Direction

    n, steps, lr = 1 << 16, 64, 2.0**-7 / 10
    p = torch.ones(256, n // 256, dtype=torch.bfloat16)
    rule = make_optimizer(name).rule
    rule.init_state([p])
    fo = OPTIMIZERS[name].estimator == "fo"
    for t in range(1, steps + 1):
        direction = Direction((chunking.step_seed(3, t),), (1.0,))
        direction.chunk(p.shape, 0, 0, p.device)  # draws z: its low bits are the dither
        bits = (noise.random_bits(p.numel(), t, 0, p.device) if fo
                else direction.dither_bits(p.numel(), 0, 0, p.device))
        d = torch.ones(p.shape, dtype=torch.float32)  # the same gradient every step
        rule.update(p, d, lr, t, 0, 0, bits)
    beta = 0.9  # momentum: step t moves lr·(1 + β + ... + β^(t-1))
    moves = ([lr * (1 - beta**t) / (1 - beta) for t in range(1, steps + 1)]
             if name == "zo-sgd-mmt" else [lr / (1 + 1e-8)] * steps)
    expected = 1.0 - sum(moves)
    assert abs(p.float().mean().item() - expected) < 0.02 * sum(moves), name


def test_forwards_per_step_counts_each_methods_passes():
    """One rule for the engine's report and `edgezo optimizers`."""
    from edgezo.zo.methods import OPTIMIZERS

    def n(name, **kw):
        m = OPTIMIZERS[name]
        return m.forwards_per_step(**{"q": m.q, "one_sided": m.estimate == "one-sided",
                                       "pair": True, **kw})

    assert n("zo-sgd") == 1 and n("zo-sgd", pair=False) == 2
    assert n("zo-sgd", q=3, groups=2) == 6  # block-wise: every group its own queries
    assert n("fzoo") == 9  # 8 one-sided queries + L(θ)
    assert n("hizoo") == 2  # the pair + L(θ) for the curvature
    assert n("zo-sgd-cons") == 3 and n("zo-sgd-cons", pair=False) == 5
    assert n("zo-sgd", fo=True) == 2 and n("hizoo", fo=True) == 2  # FO forward is L(θ)
