"""The ZO step's subtle properties: exact restore, pair mode, estimator maths, seeds."""

import copy

import pytest
import torch
from conftest import lm_batch, zo_engine

from edgezo.models.tiny import FAMILIES, VOCAB, tiny_model
from edgezo.tasks.loss import example_losses
from edgezo.zo import chunking, noise, noise_table, workers
from edgezo.zo import head as zo_head
from edgezo.zo.blocks import build_block_map
from edgezo.zo.optimizers import make_optimizer

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(model, snap) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pair", [True, False], ids=["pair", "two-pass"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_weights_restored_bit_exactly_with_zero_lr(family, pair, dtype):
    model = tiny_model(family, dtype=dtype)
    before = snapshot(model)
    engine = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-2, seed=0, pair=pair)
    for step in range(3):
        engine.step(lm_batch(VOCAB, seed=step), lr=0.0)
    engine.close()
    assert same_weights(model, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_pair_mode_equals_two_sequential_passes(family):
    model = tiny_model(family)
    batch = lm_batch(VOCAB)
    pair = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-3, seed=5, pair=True)
    p = pair.losses(batch, 123)
    pair.close()
    two = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-3, seed=5, pair=False)
    t = two.losses(batch, 123)
    two.close()
    assert p == t


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_a_language_modelling_loss_streams_the_perturbed_head_span_by_span(family,
                                                                           monkeypatch):
    """Labels on every token, in a ZO step: the perturbed head builds each span of
    W ± εz once and keeps a running log-softmax over the spans (no position's full logits
    at once, no span rebuilt per chunk of positions), in pair mode too, and gives the
    losses of the whole-logits path. Outside a step the head runs a chunk of positions at
    a time (here 3)."""
    from edgezo.tasks import loss

    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 512)  # several spans of the head
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 12), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    logits = []
    head = model.get_output_embeddings()
    head.register_forward_hook(  # full logits (not the identity's hidden states)
        lambda m, a, out: logits.append(out.shape[1]) if out.shape[-1] == VOCAB else None)
    monkeypatch.setattr(loss, "LOGIT_CHUNK_VALUES", 3 * 4 * VOCAB)
    # and inside a span too, at most 3 positions' logits of 4 rows at once
    monkeypatch.setattr(zo_head, "LOGIT_CHUNK_VALUES", 3 * 4 * (512 // 32))
    results = {}
    for streamed in (True, False):
        if not streamed:
            monkeypatch.setattr(loss, "_chunkable_head", lambda m: None)
        for pair in (True, False):
            engine = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-3, seed=5, pair=pair,
                               noise="generator")
            logits.clear()  # the engine's own probe of the model at set-up
            results[streamed, pair] = engine.losses(batch, 123)
            if streamed and pair:
                assert logits == []  # the step never computed a whole row of logits
                engine.loss(batch)  # unperturbed: a chunk of positions at a time
                assert logits == [3, 3, 3, 2]
            engine.close()
    for pair in (True, False):
        assert results[True, pair] == pytest.approx(results[False, pair], abs=1e-5)
    assert results[True, True] == pytest.approx(results[True, False], abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_bf16_heads_streamed_loss_keeps_the_targets_logits_exact(family, monkeypatch):
    """In bf16 the streamed head takes the log-softmax's normaliser from bf16 products
    but each target's logit from θ ± εz in fp32: the losses stay within bf16 rounding
    of the fp32 head's (the whole-logits path), and far closer than a target logit with
    the wrong sign of εz."""
    from edgezo.tasks import loss
    from edgezo.zo.head import LogSumExp

    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 512)  # several spans of the head
    monkeypatch.setattr(zo_head, "LOGIT_CHUNK_VALUES", 3 * 4 * (512 // 32))  # and blocks
    model = tiny_model(family, dtype=torch.bfloat16)
    with torch.no_grad():  # logits of a few units, where bf16's ulp is 1/64-1/128
        model.get_output_embeddings().weight.mul_(20)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 12), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def losses() -> list[float]:
        engine = zo_engine(model, make_optimizer("zo-sgd"), eps=0.05, seed=5, pair=True,
                           noise="generator")
        out = engine.losses(batch, 123)
        engine.close()
        return out

    streamed = losses()
    exact = LogSumExp.exact_targets

    def flipped(self, starts, k, weight, z, scale, bias):
        exact(self, starts, k, weight, z, -scale, bias)

    monkeypatch.setattr(LogSumExp, "exact_targets", flipped)
    wrong = losses()
    monkeypatch.setattr(loss, "_chunkable_head", lambda m: None)
    whole = losses()  # the head perturbed in fp32 with every logit unrounded
    error = max(abs(a - b) for a, b in zip(streamed, whole, strict=True))
    assert error < 5e-3  # losses of about 12, L+ − L− of 0.2-0.5
    assert max(abs(a - b) for a, b in zip(wrong, whole, strict=True)) > 10 * error


def perturbed_copy(model, seed: int, scale: float):
    """A reference: the whole model moved by scale·z, z drawn in full per parameter."""
    ref = copy.deepcopy(model)
    blocks = build_block_map(ref)
    with torch.no_grad():
        for i, p in enumerate(blocks.params):
            p.add_(noise.full(p.shape, chunking.param_seed(seed, i)).to(p.dtype), alpha=scale)
    return ref, blocks


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt", "gemma3"])
def test_projected_gradient_matches_finite_difference_along_the_same_z(family):
    model = tiny_model(family)
    batch, eps, seed = lm_batch(VOCAB), 1e-3, 99
    engine = zo_engine(model, make_optimizer("zo-sgd"), eps=eps, seed=0, pair=True)
    plus, minus = engine.losses(batch, seed)
    engine.close()
    with torch.no_grad():
        ref_plus = example_losses(perturbed_copy(model, seed, eps)[0], batch).mean().item()
        ref_minus = example_losses(perturbed_copy(model, seed, -eps)[0], batch).mean().item()
    assert plus == pytest.approx(ref_plus, rel=1e-5)
    assert minus == pytest.approx(ref_minus, rel=1e-5)
    assert (plus - minus) / (2 * eps) == pytest.approx((ref_plus - ref_minus) / (2 * eps),
                                                       rel=1e-3, abs=1e-4)


def test_projected_gradient_is_the_directional_derivative():
    """In float64 the two-point estimate converges to ∇L·z as ε → 0 (tied weights too).

    ε = 1e-4: HF's RMSNorm computes in fp32 even in a float64 model, which limits how
    small ε can go; the O(ε²) truncation error is then ~1e-8.
    """
    model = tiny_model("llama", dtype=torch.float64)
    batch, seed, eps = lm_batch(VOCAB), 4, 1e-4
    engine = zo_engine(model, make_optimizer("zo-sgd"), eps=eps, seed=0)
    plus, minus = engine.losses(batch, seed)
    engine.close()
    g = (plus - minus) / (2 * eps)
    blocks = build_block_map(model)
    loss = example_losses(model, batch).mean()
    grads = torch.autograd.grad(loss, blocks.params)
    exact = sum((gr * noise.full(p.shape, chunking.param_seed(seed, i)).double()).sum()
                for i, (p, gr) in enumerate(zip(blocks.params, grads, strict=True)))
    assert g == pytest.approx(exact.item(), rel=1e-4)


@pytest.mark.parametrize("pair", [True, False], ids=["pair", "two-pass"])
def test_update_is_theta_minus_lr_g_z_and_is_deferred(pair):
    """g = (L(θ + εz) − L(θ − εz)) / 2ε with L evaluated here, on copies of the model
    moved by ±εz (z regenerated from the step's seed), not read from the engine; the
    update is θ − η·g·z. float64, so both agree to rounding: a flipped sign, or a
    division by ε instead of 2ε, is off by the whole of g."""
    model = tiny_model("llama", dtype=torch.float64)
    batch, eps, lr = lm_batch(VOCAB), 1e-3, 0.1
    seed = chunking.step_seed(3, 0, 0)  # the first query of step 0 of a run with seed 3
    with torch.no_grad():  # before the engine wraps the model: the copies compute alone
        plus = example_losses(perturbed_copy(model, seed, eps)[0], batch).mean().item()
        minus = example_losses(perturbed_copy(model, seed, -eps)[0], batch).mean().item()
    g = (plus - minus) / (2 * eps)
    assert abs(g) > 0.1  # a step that moves the weights by a measurable amount
    before = snapshot(model)
    engine = zo_engine(model, make_optimizer("zo-sgd"), eps=eps, seed=3, pair=pair)
    r = engine.step(batch, lr=lr)
    assert same_weights(model, before)  # deferred: nothing written yet
    assert r.seed == seed and (r.loss_plus, r.loss_minus) == pytest.approx((plus, minus),
                                                                           rel=1e-10)
    assert r.projected_grad == pytest.approx(g, rel=1e-7)
    engine.flush()
    for i, p in enumerate(engine.blocks.params):
        name = engine.blocks.names[i]
        z = noise.full(p.shape, chunking.param_seed(seed, i)).double()
        torch.testing.assert_close(p.detach(), before[name] - lr * g * z, rtol=0, atol=1e-6)
    engine.close()


def test_bf16_updates_round_stochastically_in_the_engine():
    """An update far below a bf16 ulp still moves a weight, with probability equal to
    the fraction of the ulp it asks for: round-to-nearest would keep every such weight.

    One engine step θ ← θ − η·z (step_along: no forward, so nothing here depends on the
    CPU's bf16 arithmetic) at η = 1e-5, about a tenth of the ulp of the 0.02-sized
    weights. For each weight, t = θ − η·z in fp32 (as the rule computes it) lies between
    two neighbouring bf16 values; the result must be one of them, and the weight changes
    with probability p (t's distance from θ in units of that gap). Over the ~20k weights
    whose p < 1/4, the count of changed weights (= the sum of the rounded updates in
    ulps, signed by the update) must match Σp within 5 standard deviations; Σp is ~1600,
    some 40 standard deviations from round-to-nearest's 0."""
    model = tiny_model("llama", dtype=torch.bfloat16)
    engine = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-2, seed=0)
    params = engine.blocks.params
    before = [p.detach().clone() for p in params]
    lr = 1e-5
    r = engine.step_along([1.0], lr)
    engine.flush()
    probs, changed = [], []
    for i, p in enumerate(params):
        z = noise.full(p.shape, chunking.param_seed(r.seed, i))
        target = before[i].float().sub_(z, alpha=lr).view(-1).view(torch.int32)
        lo = target & ~0xFFFF  # the bf16 value below |t| (toward zero), as fp32 bits
        hi = lo + 0x10000  # the next one up in magnitude
        frac = (target & 0xFFFF).double() / 0x10000
        got = p.detach().float().view(-1).view(torch.int32)
        theta = before[i].float().view(-1).view(torch.int32)
        assert ((got == lo) | (got == hi)).all(), engine.blocks.names[i]
        # P(the weight changes): θ is the lower neighbour, the upper one, or (an update
        # bigger than an ulp) neither, when it changes surely
        probs.append(torch.where(theta == lo, frac,
                                 torch.where(theta == hi, 1 - frac, torch.ones_like(frac))))
        changed.append((got != theta).double())
    engine.close()
    p, moved = torch.cat(probs), torch.cat(changed)
    tiny = (p > 0) & (p < 0.25)
    expected = p[tiny].sum().item()
    sd = (p[tiny] * (1 - p[tiny])).sum().sqrt().item()
    assert tiny.sum() > 0.5 * p.numel() and expected > 30 * sd
    assert abs(moved[tiny].sum().item() - expected) < 5 * sd


@pytest.mark.parametrize(("source", "pooled"), [("table", False), ("generator", True)])
def test_only_generator_noise_goes_to_the_noise_threads(monkeypatch, source, pooled):
    calls = []
    real = workers.parallel_map

    def spy(fn, items, device, draws=True):
        calls.append(draws)
        real(fn, items, device, draws)

    monkeypatch.setattr(workers, "parallel_map", spy)
    engine = zo_engine(tiny_model("llama"), make_optimizer("zo-sgd"), eps=1e-3, noise=source)
    engine.step(lm_batch(VOCAB), lr=0.1)
    engine.flush()
    engine.close()
    assert calls and set(calls) == {pooled}


def test_an_update_from_the_table_leaves_the_table_as_it_was():
    """ZO-SGD's update reads z as a view of the shared table (d = g·z never written): a
    write through it would change every later direction in the process."""
    table = noise_table.table(torch.device("cpu"))
    before = table.clone()
    engine = zo_engine(tiny_model("llama"), make_optimizer("zo-sgd"), eps=1e-3, noise="table")
    for step in range(2):
        engine.step(lm_batch(VOCAB, seed=step), lr=0.1)
    engine.flush()
    engine.close()
    assert torch.equal(table, before)


def test_deferred_update_lands_before_the_next_perturbation():
    """Flushing after every step and deferring give the same trajectory."""
    results = []
    for flush_each_step in (False, True):
        model = tiny_model("gpt2")
        engine = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-3, seed=1)
        losses = []
        for step in range(4):
            losses.append(engine.step(lm_batch(VOCAB, seed=step), lr=0.05).loss)
            if flush_each_step:
                engine.flush()
        engine.close()
        results.append((losses, snapshot(model)))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(v, results[1][1][k]) for k, v in results[0][1].items())


def run(seed: int, family: str = "qwen2"):
    model = tiny_model(family)
    engine = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-3, seed=seed)
    out = [engine.step(lm_batch(VOCAB, seed=s), lr=0.05) for s in range(3)]
    engine.close()
    return [(r.loss, r.projected_grad, r.seed) for r in out], snapshot(model)


def test_same_seed_same_run_and_different_seed_different_run():
    a, wa = run(0)
    b, wb = run(0)
    c, _ = run(1)
    assert a == b and all(torch.equal(v, wb[k]) for k, v in wa.items())
    assert [x[2] for x in a] != [x[2] for x in c]


def test_released_scratch_is_freed_and_the_run_goes_on_unchanged():
    """Evaluation frees the perturbation workspace (the planner prices evaluation without
    it); the next step allocates it again and computes exactly what it would have."""
    def go(release: bool):
        model = tiny_model("llama")
        engine = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-2, seed=0)
        losses = []
        for s in range(3):
            losses.append(engine.step(lm_batch(VOCAB, seed=s), lr=1e-2).loss)
            if release:
                assert engine.perturbation._buffers
                engine.release_scratch()
                assert not engine.perturbation._buffers
        engine.close()
        return losses, model.state_dict()

    (a, wa), (b, wb) = go(False), go(True)
    assert a == b and all(torch.equal(v, wb[k]) for k, v in wa.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_takes_a_step_that_changes_every_parameter(family):
    model = tiny_model(family)
    before = snapshot(model)
    engine = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-3, seed=0)
    r = engine.step(lm_batch(VOCAB), lr=0.5)
    engine.close()
    assert torch.isfinite(torch.tensor([r.loss, r.projected_grad])).all()
    changed = [not torch.equal(p, before[n]) for n, p in model.named_parameters()]
    assert all(changed)


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_follow_execution_order_and_cover_every_parameter_once(family):
    model = tiny_model(family)
    blocks = build_block_map(model)
    assert [b.name for b in blocks.blocks][0] == "pre"
    assert blocks.blocks[-1].name == "post"
    assert len(blocks.blocks) == 2 + model.config.num_hidden_layers
    unique = {id(p) for p in model.parameters()}
    assert len(blocks.params) == len(unique)
    kinds = {u.kind for u in blocks.blocks[0].units}
    assert kinds == {"embedding"}


def test_tied_embedding_and_head_share_one_parameter_and_one_direction():
    model = tiny_model("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    blocks = build_block_map(model)
    head = [u for u in blocks.units if u.module is model.lm_head][0]
    embed = [u for u in blocks.units if u.module is model.model.embed_tokens][0]
    assert head.slots[0][1] == embed.slots[0][1]  # same global index -> same z


def test_non_finite_loss_skips_the_update():
    model = tiny_model("llama")
    before = snapshot(model)

    def nan_loss(m, batch):
        return example_losses(m, batch) * float("nan")

    engine = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-3, seed=0, loss_fn=nan_loss)
    r = engine.step(lm_batch(VOCAB), lr=0.1)
    engine.close()
    assert r.skipped and same_weights(model, before)


def label_nll(model, batch: dict) -> float:
    """The language-modelling loss by hand, from the whole logits: each row's mean
    negative log-likelihood of its labelled next tokens (-100: none), averaged over
    rows; positions count a row's real tokens (left padding)."""
    mask = batch["attention_mask"]
    logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.double()
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logp = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])
    return (-(logp.squeeze(-1) * keep).sum(1) / keep.sum(1)).mean().item()


def test_language_modelling_batches_with_labels():
    """The step's two losses are the labelled tokens' loss at θ ± εz, computed here;
    the first 4 positions, labelled -100, count for nothing."""
    model = tiny_model("mistral")
    batch = lm_batch(VOCAB)
    labels = batch["input_ids"].clone()
    labels[:, :4] = -100
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
             "labels": labels}
    eps, seed = 1e-3, chunking.step_seed(0, 0, 0)
    with torch.no_grad():
        plus = label_nll(perturbed_copy(model, seed, eps)[0], batch)
        minus = label_nll(perturbed_copy(model, seed, -eps)[0], batch)
        unlabelled = {**batch, "labels": batch["input_ids"]}
        assert abs(label_nll(model, unlabelled) - label_nll(model, batch)) > 1e-3
    engine = zo_engine(model, make_optimizer("zo-sgd"), eps=eps, seed=0)
    r = engine.step(batch, lr=0.01)
    engine.close()
    assert not r.skipped and r.seed == seed
    assert (r.loss_plus, r.loss_minus) == pytest.approx((plus, minus), rel=1e-5)
    assert r.loss == pytest.approx((plus + minus) / 2, rel=1e-5)


def test_wrappers_are_removed_on_close():
    model = tiny_model("opt")
    engine = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-3, seed=0)
    engine.close()
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_on_the_cpu_a_bf16_layer_is_perturbed_by_one_bf16_add_of_the_tables_twin(family):
    """A bf16 layer's perturbed weights are round(θ ± ε·z16), z16 the table's z rounded
    to bf16 and summed by torch's bf16 add (which rounds ε too): linear maps, their biases
    (qwen2) and the norms (and GPT-2's Conv1D maps, through scratch copies). The loss
    moves by about 1e-4 when the fp32 z is used instead, far beyond the 1e-6 here."""
    model = tiny_model(family, dtype=torch.bfloat16)
    for module in [*model.modules(), model.get_output_embeddings()]:
        if isinstance(module, torch.nn.Embedding) or module is model.get_output_embeddings():
            module.weight.requires_grad_(False)  # looked-up rows and the head: fp32 z
    batch, eps, seed = lm_batch(VOCAB), 1e-2, 7
    engine = zo_engine(model, make_optimizer("zo-sgd"), eps=eps, seed=0, pair=False)
    plus, minus = engine.losses(batch, seed)
    engine.close()
    for got, scale in ((plus, eps), (minus, -eps)):
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for i, p in enumerate(build_block_map(ref).params):
                z16 = noise.full(p.shape, chunking.param_seed(seed, i)).to(torch.bfloat16)
                p.copy_(torch.add(p, z16, alpha=scale))
            want = example_losses(ref, batch).mean().item()
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
