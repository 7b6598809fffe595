"""z is a pure function of (seed, parameter, chunk), however it is drawn."""

import threading

import pytest
import torch

from edgezo.zo import noise
from edgezo.zo.direction import Direction


def test_mix_is_deterministic_and_order_sensitive():
    assert noise.mix(1, 2, 3) == noise.mix(1, 2, 3)
    assert noise.mix(1, 2, 3) != noise.mix(3, 2, 1)
    assert 0 <= noise.mix(2**70, -5) < 2**63


SOURCES = pytest.mark.parametrize("source", ["table", "generator"])


def _rows(shape, seed, rows, source):
    cpu = torch.device("cpu")
    return noise.rows(shape, rows, lambda k: noise.chunk(shape, seed, k, cpu, source=source))


@SOURCES
def test_chunks_tile_the_parameter(source):
    shape = torch.Size([1000, 700])  # 374 rows per chunk -> 3 chunks, the last partial
    bounds = noise.chunk_bounds(shape)
    assert bounds[0][0] == 0 and bounds[-1][1] == 1000 and len(bounds) == 3
    z = noise.full(shape, seed=7, source=source)
    for k, (lo, hi) in enumerate(bounds):
        chunk = noise.chunk(shape, 7, k, torch.device("cpu"), source=source)
        assert torch.equal(chunk, z[lo:hi])


@SOURCES
def test_rows_equal_the_full_direction_at_those_rows(source):
    shape = torch.Size([3000, 200])
    z = noise.full(shape, seed=11, source=source)
    rows = torch.tensor([0, 5, 1310, 1311, 2999])
    assert torch.equal(_rows(shape, 11, rows, source), z[rows])


@SOURCES
def test_parallel_and_serial_draws_agree(monkeypatch, source):
    shape = torch.Size([4096, 300])
    rows = torch.arange(0, 4096, 3)
    monkeypatch.setenv("EDGEZO_NOISE_THREADS", "1")
    serial = _rows(shape, 3, rows, source)
    monkeypatch.setenv("EDGEZO_NOISE_THREADS", "2")
    assert torch.equal(_rows(shape, 3, rows, source), serial)


def test_one_and_zero_dimensional_parameters():
    assert noise.full(torch.Size([5]), 1).shape == (5,)
    assert noise.full(torch.Size([]), 1).shape == ()
    assert torch.equal(noise.full(torch.Size([5]), 1), noise.full(torch.Size([5]), 1))


@SOURCES
def test_directions_are_standard_normal(source):
    z = noise.full(torch.Size([2048, 512]), 5, source=source)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01


def test_work_that_draws_nothing_stays_on_the_callers_thread(monkeypatch):
    """Table reads run on the caller's thread, whose operations use torch's own threads;
    only generator draws go to the pool (a pool on top oversubscribed the cores)."""
    monkeypatch.setenv("EDGEZO_NOISE_THREADS", "2")
    barrier = threading.Barrier(2, timeout=5)

    def names(draws: bool) -> set[str]:
        seen = set()

        def record(i: int) -> None:
            seen.add(threading.current_thread().name)
            if draws:
                barrier.wait()  # two items at once: they ran on two pool threads

        noise.parallel_map(record, range(2), torch.device("cpu"), draws=draws)
        return seen

    assert names(False) == {threading.current_thread().name}
    assert len(names(True)) == 2


@pytest.mark.parametrize(("direction", "bf16", "draws"), [
    (Direction((1,), (1.0,), source="table"), False, False),
    (Direction((1,), (1.0,), source="table"), True, False),  # bits: z's own low bits
    (Direction((1,), (1.0,), source="generator"), False, True),
    (Direction((1,), (1.0,), kind="rademacher", source="table"), False, False),
    (Direction((1,), (1.0,), kind="rademacher", source="table"), True, True),  # random_bits
    (Direction((1,), (1.0,), kind="lowrank", rank=2), False, True),  # U, chunk by chunk
])
def test_which_directions_draw_from_the_generator(direction, bf16, draws):
    assert direction.draws(bf16) is draws
