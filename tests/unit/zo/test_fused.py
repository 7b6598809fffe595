"""The GPU's fused path (fused.py), run on the CPU: a step's weights and losses equal the
span path's bit for bit, and its host cost is a few operations a parameter."""

import sys

import pytest
import torch
from conftest import REPO, lm_batch, zo_engine

from edgezo.models.tiny import VOCAB, tiny_model
from edgezo.zo import chunking, fused, perturb
from edgezo.zo.optimizers import make_optimizer

sys.path.insert(0, str(REPO / "benchmarks"))
from step_ops import measure  # noqa: E402


@pytest.fixture
def gpu_path(monkeypatch):
    """The CUDA path on the CPU (scratch copies, spans of CUDA's size), with the fused
    pieces on or off: `fuse(True)`."""
    monkeypatch.setattr(perturb, "CHUNKED_LINEAR_DEVICES", ())
    monkeypatch.setitem(chunking.SPAN_ELEMENTS, "cpu", chunking.SPAN_ELEMENTS["cuda"])

    def fuse(on: bool) -> None:
        monkeypatch.setattr(fused, "FUSED_DEVICES", ("cuda", "cpu") if on else ("cuda",))

    return fuse


def run(family, dtype, optimizer="zo-sgd", steps=4, **kw):
    model = tiny_model(family, dtype=dtype)
    engine = zo_engine(model, make_optimizer(optimizer), seed=7, eps=1e-2, **kw)
    losses = [engine.step(lm_batch(VOCAB, seed=s), lr=2e-2).projected_grads
              for s in range(steps)]
    engine.close()
    return model.state_dict(), losses


def fused_calls(monkeypatch) -> dict[str, int]:
    """How often the fused perturbation and update ran."""
    calls = {"perturb": 0, "sgd_update": 0}
    for name in calls:
        original = getattr(fused.Fused, name)

        def counted(self, *a, __name=name, __original=original):
            calls[__name] += 1
            return __original(self, *a)

        monkeypatch.setattr(fused.Fused, name, counted)
    return calls


@pytest.fixture
def small_pieces(monkeypatch):
    """Small pieces and chunks: a unit splits into several pieces, a parameter into
    several chunks, and some parameters go span by span (larger than a piece)."""
    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 512)
    monkeypatch.setattr(fused, "FUSED_VALUES", 3000)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("kw", [{}, {"pair": False}, {"q": 2}, {"block_wise": True}],
                         ids=["pair", "two-pass", "q2", "block-wise"])
def test_fused_fp32_steps_equal_the_span_path_bit_for_bit(gpu_path, small_pieces,
                                                          monkeypatch, family, kw):
    gpu_path(False)
    want, want_g = run(family, torch.float32, **kw)
    gpu_path(True)
    calls = fused_calls(monkeypatch)
    got, got_g = run(family, torch.float32, **kw)
    assert calls["perturb"] and (calls["sgd_update"] or "q" in kw)  # q > 1: d is no z
    assert got_g == want_g
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


KINDS = {"table-rademacher": {"directions": "rademacher"},
         "generator": {"noise": "generator"},
         "generator-rademacher": {"noise": "generator", "directions": "rademacher"},
         "lowrank": {"directions": "lowrank"}, "subspace": {"directions": "subspace"},
         "lowrank-generator": {"directions": "lowrank", "noise": "generator"},
         "subspace-generator": {"directions": "subspace", "noise": "generator"},
         "lowrank-chunked": {"directions": "lowrank", "structured_z": "chunked"},
         "subspace-chunked": {"directions": "subspace", "structured_z": "chunked"},
         # rank 24 is above the 16-row matrices' size: theirs is 16
         "subspace-rank-24": {"directions": "subspace", "rank": 24}}


@pytest.mark.parametrize("kw", KINDS.values(), ids=KINDS)
def test_every_direction_kind_and_source_fuses_with_the_same_values(gpu_path, small_pieces,
                                                                    monkeypatch, kw):
    """Each kind writes its chunks' own z into the piece (Direction.chunk_into): the
    same fp32 steps as the span path, bit for bit, for every noise source."""
    gpu_path(False)
    want, want_g = run("llama", torch.float32, **kw)
    gpu_path(True)
    calls = fused_calls(monkeypatch)
    got, got_g = run("llama", torch.float32, **kw)
    assert calls["perturb"] and calls["sgd_update"]
    assert got_g == want_g
    assert all(torch.equal(got[n], t) for n, t in want.items())


def replayed(gpu_path, monkeypatch, family, log, on, **kw) -> dict:
    """A fresh bf16 model's weights after `log` replayed on the fused path or not."""
    gpu_path(on)
    calls = fused_calls(monkeypatch)
    fresh = tiny_model(family, dtype=torch.bfloat16)
    engine = zo_engine(fresh, make_optimizer("zo-sgd"), seed=7, eps=1e-2, **kw)
    for entry in log:
        engine.replay(entry)
    engine.close()
    assert bool(calls["sgd_update"]) == on
    return fresh.state_dict()


def bf16_log(family, steps, lr, **kw) -> tuple[dict, list]:
    model = tiny_model(family, dtype=torch.bfloat16)
    engine = zo_engine(model, make_optimizer("zo-sgd"), seed=7, eps=1e-2, **kw)
    log = [engine.step(lm_batch(VOCAB, seed=s), lr=lr).log_entry() for s in range(steps)]
    engine.close()
    return model.state_dict(), log


@pytest.mark.parametrize("kw", KINDS.values(), ids=KINDS)
def test_every_kinds_bf16_update_rounds_as_the_span_path(gpu_path, small_pieces,
                                                         monkeypatch, kw):
    """bf16 updates replayed through both paths: the stochastic rounding's dither is z's
    low bits, or a Rademacher direction's seeded bits, chunk by chunk as the span path
    draws them."""
    gpu_path(False)
    _, log = bf16_log("llama", 3, 2e-3, **kw)
    weights = {on: replayed(gpu_path, monkeypatch, "llama", log, on, **kw)
               for on in (False, True)}
    assert all(torch.equal(weights[True][n], t) for n, t in weights[False].items())
    moved = tiny_model("llama", dtype=torch.bfloat16).state_dict()
    assert any(not torch.equal(moved[n], t) for n, t in weights[True].items())


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_fused_bf16_updates_equal_the_span_path_bit_for_bit(gpu_path, small_pieces,
                                                           monkeypatch, family):
    """The update, stochastic rounding included, replayed from one run's log through
    both paths. (A bf16 perturbed copy is one add, but torch's CPU kernel rounds a
    tensor's vectorized body and its tail differently in the last bit, so on the CPU a
    fused piece's copies can differ from the span path's at the ends of tensors; on a GPU
    every element takes the same arithmetic.)"""
    gpu_path(False)
    want, log = bf16_log(family, 4, 2e-3)
    weights = {on: replayed(gpu_path, monkeypatch, family, log, on) for on in (False, True)}
    assert all(torch.equal(weights[True][n], t) for n, t in weights[False].items())
    assert all(torch.equal(want[n], t) for n, t in weights[True].items())


def test_fused_bf16_steps_equal_the_span_path_where_no_tensor_has_a_tail(gpu_path,
                                                                         small_pieces):
    """Llama's tiny tensors are whole multiples of the CPU's vector width: there the
    whole bf16 step, perturbed copies included, is bit-identical."""
    gpu_path(False)
    want, want_g = run("llama", torch.bfloat16)
    gpu_path(True)
    got, got_g = run("llama", torch.bfloat16)
    assert got_g == want_g
    assert all(torch.equal(got[n], t) for n, t in want.items())


def test_fused_path_leaves_other_optimizers_and_coordinates_to_the_span_path(gpu_path):
    """ZO-Adam's update (stateful) and coordinate directions are not fused, and equal."""
    for optimizer, kw in (("zo-adam", {}), ("zo-sgd", {"directions": "coordinate",
                                                      "q": 3})):
        gpu_path(False)
        want, _ = run("llama", torch.bfloat16, optimizer, **kw)
        gpu_path(True)
        got, _ = run("llama", torch.bfloat16, optimizer, **kw)
        assert all(torch.equal(got[n], t) for n, t in want.items()), optimizer


def test_the_cuda_paths_host_cost_is_a_few_ops_a_parameter(monkeypatch):
    """Counted, not timed: one ZO-SGD step on the CUDA path dispatches at most 8
    operations a trainable tensor beyond its two forwards' own, with the table's z and
    with the generator's (beside the one generator call a chunk its definition needs),
    at most 10 and 12 with lowrank and subspace z, and fewer in all than a MeZO-style
    step (benchmarks/step_ops.py); a step whose forward replays a graph, a few."""
    monkeypatch.setenv("EDGEZO_NOISE_THREADS", "1")  # every op on the counting thread
    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.bfloat16)
    batch = lm_batch(VOCAB, rows=4, seq=32)
    result = measure(model, batch, rows=("table", "generator", "lowrank", "subspace"))
    # the structured kinds: one product a matrix, their factors a few operations a piece
    # (27-30 a tensor on SmolLM2 when each chunk drew and multiplied its own)
    bound = {"table": 8, "generator": 8, "lowrank": 10, "subspace": 12}
    for row, per_tensor in bound.items():
        ops = result["cuda_path"][row] - result["top"][row].get("normal_", 0)
        assert ops - result["two_forwards"] <= per_tensor * result["tensors"], (row, result)
        assert result["cuda_path"][row] < result["mezo"], result
    # with the pair forward a CUDA graph (emulated), the host's part of a step is a few
    # copies, the graph's launch and the losses' read, whatever the model's size
    assert result["cuda_graph"] <= 16, result["top"]["cuda graph"]


def test_the_plan_prices_the_fused_buffers_where_they_run():
    """A piece's z, fp32 copy and dither (4 bytes a value each), at most FUSED_VALUES
    values, the row layouts and the largest piece's table offsets: on a GPU, for every
    direction with values, and nowhere else."""
    from types import SimpleNamespace

    from edgezo.memory.peak import _fused_bytes

    small = torch.zeros(10, 100)
    layouts = 32  # two int64 a row, for a unit's pieces and a flush's
    blocks = SimpleNamespace(params=[small, small])
    spec = SimpleNamespace(perturbs=True, fuses=True, on_cuda=True)
    assert _fused_bytes(blocks, spec) == 12 * 2000 + layouts * 20 + 8 * 20
    blocks.params = [small, torch.zeros(fused.FUSED_VALUES + 1)]
    rows = 10 + fused.FUSED_VALUES + 1
    assert _fused_bytes(blocks, spec) == 12 * fused.FUSED_VALUES \
        + layouts * rows + 8 * fused.FUSED_VALUES
    for off in ({"on_cuda": False}, {"fuses": False}, {"perturbs": False}):
        assert _fused_bytes(blocks, SimpleNamespace(**{**vars(spec), **off})) == 0


@pytest.mark.cuda
@pytest.mark.parametrize("kw", [{}, {"directions": "lowrank"}, {"directions": "subspace"}],
                         ids=["table", "lowrank", "subspace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_on_a_gpu_fused_steps_equal_the_span_path_bit_for_bit(monkeypatch, dtype, kw):
    """On CUDA every element of an add takes the same arithmetic wherever it lies in its
    tensor, so the fused path equals the span path bit for bit in bf16 too (on the CPU
    only the update does: see the bf16 tests above); and a structured z is one exact
    product however cuBLAS cuts it (a matrix at once, or span by span)."""
    def run_on_gpu(fuse: bool):
        monkeypatch.setattr(fused, "FUSED_DEVICES", ("cuda",) if fuse else ())
        model = tiny_model("qwen2", dtype=dtype).cuda()
        engine = zo_engine(model, make_optimizer("zo-sgd"), seed=7, eps=1e-2, **kw)
        gs = [engine.step({k: v.cuda() for k, v in lm_batch(VOCAB, seed=s).items()},
                          lr=2e-2).projected_grads for s in range(4)]
        engine.close()
        return {k: v.cpu() for k, v in model.state_dict().items()}, gs

    want, want_g = run_on_gpu(False)
    got, got_g = run_on_gpu(True)
    assert got_g == want_g
    assert all(torch.equal(got[n], t) for n, t in want.items())


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["lowrank", "subspace"])
def test_a_structured_z_is_the_same_product_on_a_gpu_and_a_cpu(kind):
    """The same grid factors give the same z on cuBLAS (TF32 allowed) as on the CPU's
    BLAS, bit for bit: the product never rounds; and the factors a GPU makes are the
    CPU's (bases drawn on the CPU, small factors from the table)."""
    from edgezo.zo.direction import Direction

    shape = torch.Size((3000, 576))
    d = Direction((7,), (1.0,), kind, rank=8, basis=11)
    a, b = d.factors(shape, 7, 1, torch.device("cuda"))
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        on_gpu = d.full(shape, 1, "cuda").cpu()
        assert torch.equal((a @ b).cpu(), on_gpu)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert torch.equal(a.cpu() @ b.cpu(), on_gpu)
    a_cpu, b_cpu = d.factors(shape, 7, 1, torch.device("cpu"))
    assert torch.equal(a_cpu, a.cpu()) and torch.equal(b_cpu, b.cpu())
    assert torch.equal(d.full(shape, 1, "cpu"), on_gpu)


@pytest.mark.cuda
@pytest.mark.parametrize("kw", [{}, {"directions": "lowrank"}, {"directions": "subspace"}],
                         ids=["table", "lowrank", "subspace"])
def test_a_gpu_runs_log_replays_on_the_cpu(monkeypatch, kw):
    """A seed log written on a GPU (fused updates) replayed on the CPU (span path): the
    updates are fp32 θ − η·g·z and integer rounding, so the weights agree to the last bit
    unless a kernel contracts θ − η·z into one fused multiply-add on one device and not
    the other; this test says which (the bound: one bf16 ulp). A structured z is the same
    on both: its bases are drawn on the CPU, its small factors read from the table, and
    its product is exact."""
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    engine = zo_engine(model, make_optimizer("zo-sgd"), seed=7, eps=1e-2, **kw)
    log = [engine.step({k: v.cuda() for k, v in lm_batch(VOCAB, seed=s).items()},
                       lr=2e-2).log_entry() for s in range(4)]
    engine.close()
    cpu = tiny_model("llama", dtype=torch.bfloat16)
    engine = zo_engine(cpu, make_optimizer("zo-sgd"), seed=7, eps=1e-2, **kw)
    for entry in log:
        engine.replay(entry)
    engine.close()
    differ = 0
    for name, tensor in cpu.state_dict().items():
        gpu = model.state_dict()[name].cpu()
        differ += int((gpu != tensor).sum())
        ulp = torch.finfo(torch.bfloat16).eps * tensor.float().abs().clamp_min(1e-30)
        assert ((gpu.float() - tensor.float()).abs() <= ulp).all(), name
    print(f"GPU vs CPU replay: {differ} weights differ in the last bit")


@pytest.mark.slow
def test_edgezo_fused_0_keeps_the_span_path_everywhere():
    import os
    import subprocess

    code = "from edgezo.zo import fused; print(fused.FUSED_DEVICES)"
    for value, want in (("0", "()"), ("1", "('cuda',)")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "EDGEZO_FUSED": value}, check=True)
        assert out.stdout.strip() == want


def test_a_parameter_larger_than_a_piece_is_cut_at_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 512)
    monkeypatch.setattr(fused, "FUSED_VALUES", 3000)
    params = [torch.zeros(256, 32), torch.zeros(100), torch.zeros(40, 32)]
    pieces, rest = fused.Fused(params).pieces([0, 1, 2])
    assert not rest and all(p.numel <= 3000 for p in pieces)
    segments = [s for p in pieces for s in p.segments]
    assert [s for s in segments if s[0] == 0] == [(0, 0, 80), (0, 80, 160), (0, 160, 240),
                                                 (0, 240, 256)]  # 80 rows: 5 chunks of 16
    assert sum(p.numel for p in pieces) == sum(t.numel() for t in params)
