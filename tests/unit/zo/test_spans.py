"""Spans (chunking.spans, used on CUDA) carry exactly the values of their chunks: a step that
walks spans gives the same losses, estimates and weights as one that walks chunks.

CUDA's span size is forced onto the CPU here, and the chunk made small, so that tiny
models have parameters of many chunks and spans of several.
"""

import copy

import pytest
import torch
from conftest import lm_batch, zo_engine

from edgezo.models.tiny import VOCAB, tiny_model
from edgezo.zo import chunking, noise, noise_table
from edgezo.zo.direction import Direction
from edgezo.zo.optimizers import make_optimizer
from edgezo.zo.sparsity import SparseMasks

CPU = torch.device("cpu")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 values (or one row, when a row is longer); with spans on, spans of up
    to 256 values: 4 chunks of (40, 16), 2 rows of (7, 100)."""
    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 64)

    def spans_on(on: bool) -> None:
        if on:
            monkeypatch.setitem(chunking.SPAN_ELEMENTS, "cpu", 256)
        else:
            monkeypatch.delitem(chunking.SPAN_ELEMENTS, "cpu", raising=False)
    return spans_on


SHAPES = [torch.Size(s) for s in [(40, 16), (41, 16), (7, 100), (300,), (5, 3, 4), ()]]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("source", ["table", "generator"])
def test_a_span_is_its_chunks_end_to_end(small_chunks, shape, kind, source):
    small_chunks(True)
    z = noise.full(shape, 9, kind=kind, source=source).reshape(chunking.num_rows(shape), -1)
    spans = chunking.spans(shape, CPU)
    assert spans[0][2] == 0 and spans[-1][3] == chunking.num_rows(shape)
    if shape == (41, 16):  # 4 rows a chunk, 11 chunks: spans of 4 chunks, the last of 3
        assert [(k, end) for k, end, _, _ in spans] == [(0, 4), (4, 8), (8, 11)]
    if shape == (7, 100):  # rows longer than a chunk: a chunk a row, two rows a span
        assert [(k, end) for k, end, _, _ in spans] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    for k, end, lo, hi in spans:
        got = noise.chunk(shape, 9, k, CPU, kind, source, end=end)
        assert torch.equal(got.reshape(hi - lo, -1), z[lo:hi])
        # the update's dither reads the last z drawn: the span's own values
        assert torch.equal(noise.last_z(got.numel()), z[lo:hi].reshape(-1))


@pytest.mark.parametrize("spans_on", [False, True], ids=["chunks", "spans"])
def test_the_tables_bf16_twin_is_z_rounded_to_bf16_wherever_it_is_read(small_chunks,
                                                                       spans_on):
    """The twin a bf16 perturbed copy reads on the CPU holds the table's own z rounded to
    nearest bf16, chunk by chunk and span by span, and reading it leaves the update's
    dither (the last fp32 z) alone."""
    small_chunks(spans_on)
    assert torch.equal(noise_table.table_bf16(CPU), noise_table.table(CPU).to(torch.bfloat16))
    for shape in SHAPES:
        z = noise.full(shape, chunking.param_seed(9, 0)).reshape(chunking.num_rows(shape), -1)
        for k, end, lo, hi in chunking.spans(shape, CPU):
            marker = noise.chunk(shape, 1, 0, CPU)
            got = Direction((9,), (1.0,)).perturbation_chunk(shape, 0, k, CPU,
                                                             torch.bfloat16, end)
            assert got.dtype == torch.bfloat16
            assert torch.equal(got.reshape(hi - lo, -1), z[lo:hi].to(torch.bfloat16))
            assert noise.last_z(marker.numel()).data_ptr() == marker.data_ptr()
    # elsewhere the fp32 d of `chunk`: d = 2z, the generator, an fp32 weight
    for direction, dtype in [(Direction((9,), (2.0,)), torch.bfloat16),
                             (Direction((9,), (1.0,), source="generator"), torch.bfloat16),
                             (Direction((9,), (1.0,)), torch.float32)]:
        got = direction.perturbation_chunk(SHAPES[0], 0, 0, CPU, dtype)
        assert got.dtype == torch.float32
        assert torch.equal(got, direction.chunk(SHAPES[0], 0, 0, CPU))


def test_table_rows_are_the_full_direction_at_those_rows(small_chunks):
    shape = torch.Size([41, 16])
    rows = torch.tensor([0, 3, 4, 17, 40])
    assert torch.equal(noise_table.table_rows(shape, 5, rows), noise.full(shape, 5)[rows])


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("source", ["table", "generator"])
def test_on_cuda_spans_are_their_chunks_and_the_table_is_the_cpus(monkeypatch, kind, source):
    """On the GPU itself (where spans run in production): chunk-wise and span-wise z agree
    bit for bit, embedding rows come from the same gather, and the table gives the CPU's
    values, so a run replays across devices."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 64)
    monkeypatch.setitem(chunking.SPAN_ELEMENTS, "cuda", 256)
    for shape in SHAPES:
        z = noise.full(shape, 9, cuda, kind, source).reshape(chunking.num_rows(shape), -1)
        for k, end, lo, hi in chunking.spans(shape, cuda):
            got = noise.chunk(shape, 9, k, cuda, kind, source, end=end)
            assert torch.equal(got.reshape(hi - lo, -1), z[lo:hi])
        if source == "table":
            cpu = noise.full(shape, 9, CPU, kind, source).reshape(z.shape)
            assert torch.equal(z.cpu(), cpu)
            if len(shape) and kind == "gaussian":
                rows = torch.tensor([0, chunking.num_rows(shape) - 1], device=cuda).unique()
                assert torch.equal(noise_table.table_rows(shape, 9, rows).reshape(len(rows), -1),
                                   z[rows])


def _directions():
    masks = SparseMasks([torch.zeros(41, 16)], 0.5)
    masks.masks[0] = (torch.arange(41 * 16) % 3 != 0).view(41, 16)
    yield "sum-of-queries", Direction((1, 2, 3), (0.5, -1.0, 2.0))
    yield "rademacher", Direction((4,), (-0.3,), kind="rademacher")
    yield "generator", Direction((4,), (1.5,), source="generator")
    yield "lowrank", Direction((5,), (1.0,), kind="lowrank", rank=2, basis=7)
    yield "subspace", Direction((6, 8), (1.0, 0.25), kind="subspace", rank=3, basis=7)
    yield "masked", Direction((1,), (2.0,), masks=masks)
    yield "scaled", Direction((1,), (1.0,),
                              scale=lambda i, rows: torch.arange(41.0)[rows, None] + 1)
    yield "coordinate", Direction((1, 2), (3.0, -1.0), kind="coordinate", coords=(5, 400),
                                  starts=(0, 41 * 16))


@pytest.mark.parametrize("name, direction", list(_directions()), ids=lambda x: x
                         if isinstance(x, str) else "")
def test_direction_spans_equal_their_chunks(small_chunks, name, direction):
    shape = torch.Size([41, 16])
    small_chunks(False)
    chunks = [(direction.chunk(shape, 0, k, CPU, writable=True).clone(),
               direction.dither_bits((hi - lo) * 16, 0, k, CPU).clone())
              for k, (lo, hi) in enumerate(chunking.chunk_bounds(shape))]
    want_d = torch.cat([d.reshape(-1) for d, _ in chunks])
    want_bits = torch.cat([b.reshape(-1) for _, b in chunks])
    small_chunks(True)
    got_d, got_bits = [], []
    for k, end, lo, hi in chunking.spans(shape, CPU):
        got_d.append(direction.chunk(shape, 0, k, CPU, writable=True, end=end).flatten().clone())
        got_bits.append(direction.dither_bits((hi - lo) * 16, 0, k, CPU, shape, end).clone())
    assert torch.equal(torch.cat(got_d), want_d)
    assert torch.equal(torch.cat(got_bits), want_bits)


RUNS = [("zo-sgd", torch.float32, {}), ("zo-sgd", torch.bfloat16, {}),
        ("zo-sgd", torch.bfloat16, {"directions": "rademacher"}),
        ("zo-adam", torch.float32, {"q": 2}), ("hizoo", torch.bfloat16, {}),
        ("zo-sgd", torch.float32, {"directions": "lowrank"}),
        ("zo-sgd", torch.bfloat16, {"noise": "generator", "sparsity": 0.5})]


@pytest.mark.parametrize("optimizer, dtype, options", RUNS,
                         ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_run_over_spans_is_the_run_over_chunks(small_chunks, optimizer, dtype, options,
                                                 family):
    """The updates are bit-exact: the chunk run's seed log, replayed over spans, gives its
    weights. The forwards agree up to rounding: a product split into other row blocks
    can round differently, so the first step's losses may differ in their last bits and
    its estimates by those bits over 2ε (later steps start from weights that differ as
    much); where every estimate comes out equal, so do the weights."""
    base = tiny_model(family, dtype=dtype)

    def engine_of(spans: bool):
        small_chunks(spans)
        model = copy.deepcopy(base)
        return model, zo_engine(model, make_optimizer(optimizer), eps=1e-2, seed=2, **options)

    model, engine = engine_of(False)
    chunked = [engine.step(lm_batch(VOCAB, seed=s), lr=1e-2) for s in range(3)]
    engine.close()
    model_s, engine = engine_of(True)
    spanned = [engine.step(lm_batch(VOCAB, seed=s), lr=1e-2) for s in range(3)]
    engine.close()
    # the first step starts from the same weights: only the forwards' rounding differs
    assert spanned[0].loss == pytest.approx(chunked[0].loss, rel=1e-5)
    assert spanned[0].projected_grads == pytest.approx(
        chunked[0].projected_grads, abs=2e-3 if dtype == torch.bfloat16 else 1e-4)
    assert [r.loss for r in spanned] == pytest.approx([r.loss for r in chunked], rel=1e-2)
    if [r.projected_grads for r in spanned] == [r.projected_grads for r in chunked]:
        assert all(torch.equal(v, model_s.state_dict()[k])
                   for k, v in model.state_dict().items())
    replayed, engine = engine_of(True)
    for r in chunked:
        engine.replay(r.log_entry())
    engine.close()
    assert all(torch.equal(v, replayed.state_dict()[k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
    # the steps did walk spans of several chunks
    assert any(end - k > 1 for p in base.parameters() for k, end, _, _ in
               chunking.spans(p.shape, CPU))
