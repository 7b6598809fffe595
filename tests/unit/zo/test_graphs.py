"""CUDA graphs of the pair forward (edgezo.zo.graphs), on the CPU: trace_graph.TraceGraph
records a captured forward's operations and replays them as a CUDA graph would (the host
code between them does not run again), so a value the capture kept where it should have
been staged (a table offset, a rate, a branch) makes the replayed steps differ from
eager ones. Every test here compares weights bit for bit."""

import numpy as np
import pytest
import torch
from conftest import lm_batch, zo_engine

from edgezo.models.tiny import VOCAB, tiny_model
from edgezo.zo import chunking, fused, graphs, noise_table, perturb
from edgezo.zo.optimizers import make_optimizer
from edgezo.zo.trace_graph import TraceGraph


@pytest.fixture
def gpu_path(monkeypatch):
    """The CUDA path on the CPU: scratch copies, fused pieces, spans of CUDA's size."""
    monkeypatch.setattr(perturb, "CHUNKED_LINEAR_DEVICES", ())
    monkeypatch.setattr(fused, "FUSED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setitem(chunking.SPAN_ELEMENTS, "cpu", chunking.SPAN_ELEMENTS["cuda"])


@pytest.fixture(params=["small", "default"])
def small_chunks(request, monkeypatch):
    """Several chunks a parameter and several pieces a unit, so that a step reads the
    table at many offsets; or the default sizes, where a tiny model's tensors are one
    chunk each (read as one slice outside a graph)."""
    if request.param == "small":
        monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 512)
        monkeypatch.setattr(fused, "FUSED_VALUES", 3000)


def batches(n: int, rows: int = 4, seq: int = 7) -> list[dict]:
    return [lm_batch(VOCAB, rows=rows, seq=seq, seed=s) for s in range(n)]


RATES = [2e-2, 1e-2, 3e-2, 0.0, 2e-2, 5e-3, 1e-2, 2e-2]


def train(family, dtype, data, graphed: bool, optimizer="zo-sgd", **kw):
    """Weights, projected gradients, the reasons told and the engine's replays after a
    step on each batch."""
    model = tiny_model(family, dtype=dtype)
    engine = zo_engine(model, make_optimizer(optimizer), seed=7, eps=1e-2, **kw)
    told = []
    if graphed:
        params = list(engine.blocks.params)
        assert graphs.attach(engine, lambda: TraceGraph(params), told.append) is None
    grads = [engine.step(b, lr=RATES[i % len(RATES)]).projected_grads
             for i, b in enumerate(data)]
    replays = engine.graphs.replays if graphed else 0
    engine.close()
    return model.state_dict(), grads, told, replays


def assert_same(got, want):
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("family,dtype", [
    ("llama", torch.float32), ("llama", torch.bfloat16), ("gpt2", torch.float32),
    ("gpt2", torch.bfloat16), ("qwen2", torch.float32), ("opt", torch.float32),
    ("gemma3", torch.bfloat16), ("llama", torch.float16)],
    ids=lambda v: str(v).replace("torch.", ""))
def test_replayed_steps_equal_eager_steps(gpu_path, small_chunks, family, dtype):
    """Tied (llama) and untied heads, learned positions (gpt2, opt), soft-capped logits
    (gemma3), fp32 and bf16 with its stochastic rounding."""
    data = batches(8)
    want, want_g, _, _ = train(family, dtype, data, graphed=False)
    got, got_g, told, replays = train(family, dtype, data, graphed=True)
    assert not told
    # step 0 applies no update, step 1 records, step 2 captures, step 3 (lr 0: no update
    # to apply at step 4) ..., the others replay
    assert replays >= 3
    assert got_g == want_g
    assert_same(got, want)


def test_rademacher_and_q2_replay(gpu_path, small_chunks):
    data = batches(6)
    for kw in ({"directions": "rademacher"}, {"q": 2}):
        want, want_g, _, _ = train("llama", torch.float32, data, graphed=False, **kw)
        got, got_g, told, replays = train("llama", torch.float32, data, graphed=True, **kw)
        assert got_g == want_g
        assert_same(got, want)
        if "q" in kw:  # the second query's forward applies no update: it replays
            assert told == ["the update combines several queries (q > 1), masks or groups"]
        assert replays >= 2


def test_batch_shapes_each_take_a_graph(gpu_path, small_chunks):
    data = [lm_batch(VOCAB, rows=4, seq=7 + s % 2, seed=s) for s in range(8)]
    want, want_g, _, _ = train("llama", torch.float32, data, graphed=False)
    got, got_g, told, replays = train("llama", torch.float32, data, graphed=True)
    assert got_g == want_g and not told and replays >= 2
    assert_same(got, want)


def test_a_forward_that_reads_the_host_runs_eagerly(gpu_path, small_chunks):
    """A loss with a host read inside (here: .item()) cannot be captured: told once, and
    every step still equals the eager one (a failed capture applied nothing)."""
    from edgezo.tasks.loss import example_losses

    def reads_host(model, batch):
        losses = example_losses(model, batch)
        return losses * (1.0 if losses.sum().item() == losses.sum().item() else 0.0)

    data = batches(5)
    want, want_g, _, _ = train("llama", torch.float32, data, graphed=False,
                               loss_fn=reads_host)
    got, got_g, told, replays = train("llama", torch.float32, data, graphed=True,
                                      loss_fn=reads_host)
    assert got_g == want_g and replays == 0
    assert told == ["the forward reads a value on the host (aten._local_scalar_dense)"]
    assert_same(got, want)


def test_a_record_that_fails_midway_loses_no_update(gpu_path, small_chunks, monkeypatch):
    """A unit whose update would go span by span is refused while its forward is
    recorded, after earlier units applied theirs: the eager forward that follows applies
    the rest, each parameter's once (the same weights as eager steps)."""
    pieces = fused.Fused.pieces
    last = len(list(tiny_model("llama").parameters())) - 1

    def spans_for_the_last(self, indices):  # the final norm's update goes span by span
        found, rest = pieces(self, indices)
        if last in indices:
            return [], sorted(set(rest) | set(indices))
        return found, rest

    monkeypatch.setattr(fused.Fused, "pieces", spans_for_the_last)
    data = batches(5)
    want, want_g, _, _ = train("llama", torch.float32, data, graphed=False)
    got, got_g, told, replays = train("llama", torch.float32, data, graphed=True)
    assert told == ["an update goes span by span (not plain ZO-SGD on fp32, fp16 or "
                    "bf16 weights)"] and replays == 0
    assert got_g == want_g
    assert_same(got, want)


@pytest.mark.parametrize("optimizer,kw,why", [
    ("fo-sgd", {}, "fo-sgd differentiates the loss"),
    ("forward-grad", {}, "forward-grad differentiates the loss"),
    ("zo-sgd", {"noise": "generator"}, "gaussian directions from the generator are drawn"),
    ("zo-sgd", {"block_wise": True}, "sparsity, block-wise groups or FO blocks"),
])
def test_runs_graphs_cannot_serve_say_why(optimizer, kw, why):
    model = tiny_model("llama", dtype=torch.float32)
    engine = zo_engine(model, make_optimizer(optimizer), **kw)
    assert why in graphs.attach(engine, lambda: TraceGraph())
    assert engine.graphs is None
    model = tiny_model("llama", dtype=torch.float32)
    assert graphs.attach(zo_engine(model, make_optimizer("zo-sgd"))) == \
        "the model is not on a GPU"
    assert graphs.attach(zo_engine(model, make_optimizer("zo-sgd")), lambda: TraceGraph()) \
        == "the fused path is off on cpu (EDGEZO_FUSED=0)"


ADAM = "an update by Adam reads more than z and a rate"
MOMENTUM = "an update by Momentum reads more than z and a rate"
COMBINED = "the direction combines queries, or is masked, scaled or block-wise"


@pytest.mark.parametrize("optimizer,kw,told_want,least", [
    ("zo-sgd", {"estimate": "one-sided"}, set(), 6),  # L(θ) and L(θ + εz): both replay
    ("zo-sgd", {"pair": False}, set(), 4),  # L(θ + εz) and L(θ − εz) apart
    ("zo-adam", {}, {ADAM}, 0),  # its one forward a step applies Adam's update
    # unpaired, L(θ − εz) comes after L(θ + εz) applied the update: it owes none, replays
    ("zo-adam", {"pair": False}, {ADAM}, 3),
    ("zo-sgd-mmt", {"q": 2}, {MOMENTUM}, 3),  # the second query's forward replays
    ("fzoo", {}, set(), 20),  # L(θ) applies FZOO's update eagerly; its 8 queries replay
    # L(θ) applies its exact move eagerly; its L(θ ± η·d) along the step's estimate
    # stays eager (told where η is ε, the graphs' own)
    ("zo-sgd-cons", {}, {COMBINED}, 4),
], ids=["one-sided", "unpaired", "zo-adam", "zo-adam-unpaired", "momentum-q2", "fzoo",
        "cons"])
def test_other_methods_replay_what_they_can(gpu_path, small_chunks, optimizer, kw,
                                            told_want, least):
    """Forwards that apply no update, or a ZO-SGD one, replay; an update by another rule
    runs eagerly (told once), and the forwards after it replay: every method's weights
    equal its eager steps' bit for bit."""
    data = batches(6)
    want, want_g, _, _ = train("llama", torch.float32, data, graphed=False,
                               optimizer=optimizer, **kw)
    got, got_g, told, replays = train("llama", torch.float32, data, graphed=True,
                                      optimizer=optimizer, **kw)
    assert set(told) == told_want and len(told) == len(told_want) and replays >= least
    assert got_g == want_g
    assert_same(got, want)


def test_staged_offsets_equal_the_hosts():
    """Stage.fill's vectorized offsets are table_offset's, for any seeds."""
    rng = np.random.default_rng(0)
    seeds = [int(s) for s in rng.integers(0, 2 ** 63, 50, dtype=np.uint64)]
    chunks = rng.integers(0, 4000, 50, dtype=np.uint64)
    numels = rng.integers(1, 1 << 20, 50, dtype=np.uint64)
    got = noise_table.table_offsets(np.array(seeds, dtype=np.uint64), chunks, numels)
    want = [noise_table.table_offset(int(n), s, int(c))
            for s, c, n in zip(seeds, chunks, numels, strict=True)]
    assert [int(v) for v in got] == want


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_device_rate_updates_as_a_number_does(device):
    """The fused update's θ + z·(−rate) with −rate a 0-d tensor (a graph's) equals
    θ − rate·z with the rate a number, bit for bit (on CUDA both are one fused
    multiply-add)."""
    g = torch.Generator().manual_seed(0)
    theta, z = (torch.randn(1 << 16, generator=g).to(device) for _ in range(2))
    for rate in (1e-3, 3.7e-5, 0.123456789, -2e-2):
        want = theta.clone().sub_(z, alpha=rate)
        got = theta.clone().addcmul_(z, torch.tensor(-rate, dtype=torch.float32,
                                                     device=device))
        assert torch.equal(got, want)


def test_a_session_with_graphs_trains_as_one_without(gpu_path, tiny_folder, data_dir,
                                                    monkeypatch):
    """A run's steps, its evaluation between them (which frees the workspace the graphs
    write: they are captured again) and its batches of several widths: the same weights
    and projected gradients with graphs as without, and the report says so."""
    from edgezo.run import build
    from edgezo.run.session import Session

    def run(graphed: bool):
        if graphed:
            def on(config, engine, device):
                params = list(engine.blocks.params)
                assert graphs.attach(engine, lambda: TraceGraph(params), told.append) \
                    is None
                return "on (emulated)"
            monkeypatch.setattr(build, "use_cuda_graphs", on)
        s = Session(model=tiny_folder, profile="8gb-gpu", lr=1e-2, batch_size=4,
                    data_dir=data_dir, seed=0)
        grads = []
        for i in range(14):  # widths 24, 32 and 40: each records, captures, replays
            grads.append(s.step().projected_grads)
            if i == 4:
                s.evaluate("validation", max_examples=8)
        report = s.report()
        weights = {n: p.detach().clone() for n, p in s.model.named_parameters()}
        s.close()
        return weights, grads, report

    told: list[str] = []
    want, want_g, _ = run(False)
    got, got_g, report = run(True)
    assert not told and got_g == want_g
    assert_same(got, want)
    assert report["compute"]["cuda_graphs"] == "on (emulated)"
    assert report["compute"]["graph_replays"] >= 1


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cuda_graph_replays_equal_eager_steps_on_the_gpu(family, dtype):
    """The real thing: torch.cuda.CUDAGraph captures and replays; the weights after eight
    steps (three shapes of batch, an lr of 0 between) equal eager CUDA steps' bit for
    bit, and most steps were replays."""
    def train_cuda(graphed: bool):
        model = tiny_model(family, dtype=dtype).cuda()
        engine = zo_engine(model, make_optimizer("zo-sgd"), seed=7, eps=1e-2)
        told = []
        if graphed:
            assert graphs.attach(engine, notify=told.append) is None
        data = [{k: v.cuda() for k, v in lm_batch(VOCAB, rows=4, seq=7 + s % 2,
                                                  seed=s).items()} for s in range(12)]
        grads = [engine.step(b, lr=RATES[i % len(RATES)]).projected_grads
                 for i, b in enumerate(data)]
        replays = engine.graphs.replays if graphed else 0
        engine.close()
        return model.state_dict(), grads, told, replays

    want, want_g, _, _ = train_cuda(False)
    got, got_g, told, replays = train_cuda(True)
    assert not told and replays >= 4
    assert got_g == want_g
    assert_same(got, want)


def lm_batches(n: int) -> list[dict]:
    """Left-padded rows with labels on their last tokens (a token-level loss)."""
    out = []
    for s in range(n):
        batch = lm_batch(VOCAB, rows=4, seq=9, seed=s)
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, -3 - s % 2:] = batch["input_ids"][:, -3 - s % 2:]
        out.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                    "labels": labels})
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_token_level_loss_replays(gpu_path, small_chunks, monkeypatch, dtype):
    """A language-modelling loss under a graph reads logits at every position (no host
    read of where the labels start) and a bf16 head's target logits all at once: replayed
    steps equal eager steps that read every position too, bit for bit; and reading every
    position moves the losses by rounding only."""
    from edgezo.tasks import loss

    data = lm_batches(8)
    model = tiny_model("llama", dtype=dtype)
    engine = zo_engine(model, make_optimizer("zo-sgd"), seed=7, eps=1e-2)
    some = engine.losses(data[0], 123)
    with monkeypatch.context() as m:
        m.setattr(loss, "static", lambda: True)  # eager, at every position
        every = engine.losses(data[0], 123)
        engine.close()
        want, want_g, _, _ = train("llama", dtype, data, graphed=False)
    assert every == pytest.approx(some, rel=1e-5, abs=1e-6)
    got, got_g, told, replays = train("llama", dtype, data, graphed=True)
    assert not told and replays >= 3
    assert got_g == want_g
    assert_same(got, want)


@pytest.mark.parametrize("optimizer,kw", [("zo-adam", {"pair": False}), ("hizoo", {})],
                         ids=["zo-adam-unpaired", "hizoo"])
def test_eager_forwards_beside_replays_compute_as_they_do(gpu_path, small_chunks,
                                                          monkeypatch, optimizer, kw):
    """Where one estimate mixes a replayed forward with an eager one (an unpaired query
    after an Adam update; HiZOO's L(θ) beside its scaled queries), the eager one computes
    as a graph's would (a token-level loss at every position), so g carries no difference
    between them: the weights equal eager steps' that read every position too."""
    from edgezo.tasks import loss
    from edgezo.zo import staging

    seen = []

    def watched(model, batch):  # how each forward of the graphed run computes
        seen.append(staging.static())
        return loss.example_losses(model, batch)

    data = lm_batches(6)
    with monkeypatch.context() as m:
        m.setattr(loss, "static", lambda: True)
        want, want_g, _, _ = train("llama", torch.bfloat16, data, graphed=False,
                                   optimizer=optimizer, **kw)
    got, got_g, told, replays = train("llama", torch.bfloat16, data, graphed=True,
                                      optimizer=optimizer, loss_fn=watched, **kw)
    assert told and replays >= 3
    assert seen and all(seen)  # eager forwards too (replays call no Python)
    assert got_g == want_g
    assert_same(got, want)
