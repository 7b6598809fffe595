"""z is a pure function of (seed, parameter, chunk), however it is drawn."""

import threading

import pytest
import torch

from edgezo.zo import chunking, noise, noise_table, workers
from edgezo.zo.direction import Direction


def test_mix_is_splitmix64_with_pinned_values_and_order_sensitive():
    """Seeds are hashes a seed log stores: the same integers must name the same
    directions in every version and on every machine."""
    # SplitMix64's reference outputs from state 0 (Vigna's splitmix64.c): its first two
    assert chunking._splitmix64(0) == 0xE220A8397B1DCDAF
    assert chunking._splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    assert chunking.mix(1, 2, 3) == 7405809139744024400
    assert chunking.step_seed(0, 0, 0) == 8435702009653986085
    assert chunking.mix(1, 2, 3) != chunking.mix(3, 2, 1)
    assert 0 <= chunking.mix(2**70, -5) < 2**63


_TABLE_SALT = 0x7AB1E  # the table offset's salt: part of what a seed means, never changed


def _table_slice(seed: int, chunk: int, numel: int) -> torch.Tensor:
    """The table's values where a chunk of `numel` values with this seed starts reading:
    the offset mix(seed, chunk, salt) mod (T − numel + 1), computed here."""
    offset = chunking.mix(seed, chunk, _TABLE_SALT) % (noise_table.TABLE_VALUES - numel + 1)
    return noise_table.table(torch.device("cpu"))[offset:offset + numel]


def test_each_chunk_of_a_tensor_reads_the_table_at_its_own_offset():
    """Chunk k's z is the table's slice at the offset hashed from (seed, k): two chunks
    of one tensor, of equal size too, read different slices (an offset ignoring k would
    give every full chunk the same values: z one slice repeated). The span path (one
    gather over several chunks, as on CUDA) and the row gather read the same slices."""
    shape = torch.Size([3000, 200])  # 1310 rows a chunk: two full chunks, one partial
    seed, cpu = 11, torch.device("cpu")
    z = noise.full(shape, seed)
    for k, (lo, hi) in enumerate(chunking.chunk_bounds(shape)):
        want = _table_slice(seed, k, (hi - lo) * 200).view(hi - lo, 200)
        assert torch.equal(noise.chunk(shape, seed, k, cpu), want), k
        assert torch.equal(z[lo:hi], want), k
    assert not torch.equal(z[:1310], z[1310:2620])
    assert torch.equal(noise.chunk(shape, seed, 0, cpu, end=3), z)
    rows = torch.tensor([0, 1309, 1310, 2619, 2620, 2999])
    assert torch.equal(noise_table.table_rows(shape, seed, rows), z[rows])


SOURCES = pytest.mark.parametrize("source", ["table", "generator"])


def _rows(shape, seed, rows, source):
    cpu = torch.device("cpu")
    return noise.rows(shape, rows, lambda k: noise.chunk(shape, seed, k, cpu, source=source))


@SOURCES
def test_chunks_tile_the_parameter(source):
    shape = torch.Size([1000, 700])  # 374 rows per chunk -> 3 chunks, the last partial
    bounds = chunking.chunk_bounds(shape)
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
    """A vector is one chunk of one-value rows, a scalar a chunk of one value: each is
    the table's slice at its chunk's offset, and another seed gives other values."""
    vector, scalar = noise.full(torch.Size([5]), 1), noise.full(torch.Size([]), 1)
    assert vector.shape == (5,) and torch.equal(vector, _table_slice(1, 0, 5))
    assert scalar.shape == () and torch.equal(scalar.view(1), _table_slice(1, 0, 1))
    assert not torch.equal(vector, noise.full(torch.Size([5]), 2))


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

        workers.parallel_map(record, range(2), torch.device("cpu"), draws=draws)
        return seen

    assert names(False) == {threading.current_thread().name}
    assert len(names(True)) == 2


@pytest.mark.parametrize(("direction", "bf16", "draws"), [
    (Direction((1,), (1.0,), source="table"), False, False),
    (Direction((1,), (1.0,), source="table"), True, False),  # bits: z's own low bits
    (Direction((1,), (1.0,), source="generator"), False, True),
    (Direction((1,), (1.0,), kind="rademacher", source="table"), False, False),
    (Direction((1,), (1.0,), kind="rademacher", source="table"), True, True),  # random_bits
    (Direction((1,), (1.0,), kind="lowrank", rank=2), False, False),  # U from the table
    (Direction((1,), (1.0,), kind="lowrank", rank=2), True, False),  # the table's bits
    (Direction((1,), (1.0,), kind="lowrank", rank=2, source="generator"), False, True),
    (Direction((1,), (1.0,), kind="subspace", rank=2), False, False),  # S from the table
    (Direction((1,), (1.0,), kind="subspace", rank=2, source="generator"), False, True),
    (Direction((1,), (1.0,), kind="lowrank", rank=2, chunked=True), False, True),  # U a chunk
])
def test_which_directions_draw_from_the_generator(direction, bf16, draws):
    assert direction.draws(bf16) is draws
