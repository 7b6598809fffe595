"""The table offsets of a CUDA graph's forward, on the device (edgezo.zo.graphs).

A graph replays its kernels with the arguments they had at capture, so the places in the
noise table a step's gathers read cannot be numbers the host worked out: every
noise_table.offsets() call of a captured forward reads its slice of one device buffer,
which the host fills for each step's seeds before the replay (chunking.mix_many works out
all of a step's offsets in a few vectorized operations) and sends in one copy. Also here:
what makes a forward compute as a graph's does (static_forward, as_captured).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from edgezo.zo import chunking, noise_table

QUERY, UPDATE = 0, 1  # the two seeds a step's forward reads z of
_STATIC = [False]  # a forward of an engine with graphs: see static_forward


def static() -> bool:
    """Whether this forward computes as a CUDA graph's does (tasks/loss.py: a token-level
    loss then reads every position)."""
    return _STATIC[0]


@contextlib.contextmanager
def static_forward() -> Iterator[None]:
    """Inside, forwards compute as a graph's: with shapes the data does not decide and no
    host read. An engine with graphs runs its eager forwards this way too, so that one
    estimate never mixes a replayed forward with one computed otherwise."""
    before, _STATIC[0] = _STATIC[0], True
    try:
        yield
    finally:
        _STATIC[0] = before


class GraphUnsafe(RuntimeError):
    """Why a step's forward cannot be captured as a CUDA graph."""


class Stage:
    """The table offsets of a captured forward. An eager run of the forward records every
    offsets() call (which seed, parameter, chunk and size each entry is); after that,
    one host buffer and one device buffer hold them all, and each call of the captured
    forward gets its slice of the device buffer. `fill` works out the offsets for a new
    step's seeds and sends them."""

    def __init__(self, params: int):
        self.params = params
        self.calls: list[tuple[tuple[int, int, int, int], ...]] = []
        self.recording = True
        self.served = 0
        self._roles: dict[int, tuple[int, int]] = {}
        self.device: torch.device | None = None
        self._sent = None  # a CUDA event after the last copy from the host buffer

    def bind(self, seeds: dict[int, int]) -> None:
        """The step's seeds (QUERY, and UPDATE when the forward applies an update)."""
        self._roles = {chunking.param_seed(s, i): (role, i) for role, s in seeds.items()
                       for i in range(self.params)}

    def offsets(self, entries: list[tuple[int, int, int]], device: torch.device
                ) -> torch.Tensor:
        keys = []
        for seed, c, n in entries:
            found = self._roles.get(seed)
            if found is None:
                raise GraphUnsafe("z is read at a seed that is not the step's")
            keys.append((*found, c, n))
        if self.recording:
            self.calls.append(tuple(keys))
            self.device = device
            return noise_table.host_offsets(entries, device)
        k = self.served
        if k >= len(self.calls) or self.calls[k] != tuple(keys):
            raise GraphUnsafe("the captured forward reads the table otherwise than the "
                              "recorded one")
        self.served += 1
        return self._device[self._starts[k]:self._starts[k + 1]]

    def freeze(self) -> None:
        """End the recording: lay the offsets out in one buffer."""
        flat = [key for call in self.calls for key in call]
        table = np.array(flat, dtype=np.uint64).reshape(-1, 4)
        self._role, self._param, self._chunk, self._numel = table.T
        self._starts = np.cumsum([0] + [len(c) for c in self.calls]).tolist()
        device = self.device or torch.device("cpu")
        self._host = torch.empty(len(flat), dtype=torch.int64,
                                 pin_memory=device.type == "cuda")
        self._device = torch.empty(len(flat), dtype=torch.int64, device=device)
        self.recording = False

    def fill(self, seeds: dict[int, int]) -> None:
        """Work out every offset for these seeds and send them to the device buffer."""
        if not len(self._host):
            return
        mask = (1 << 64) - 1  # as mix() reads a seed
        seed = np.where(self._role == QUERY, np.uint64(seeds.get(QUERY, 0) & mask),
                        np.uint64(seeds.get(UPDATE, 0) & mask))
        values = noise_table.table_offsets(chunking.mix_many(seed, self._param), self._chunk,
                                           self._numel)
        if self._sent is not None:  # the last copy from the host buffer has been read
            self._sent.synchronize()
        self._host.numpy()[:] = values.astype(np.int64)
        self._device.copy_(self._host, non_blocking=True)
        if self._device.is_cuda:
            self._sent = torch.cuda.Event()
            self._sent.record()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """The captured forward's calls read the device buffer, in the recorded order."""
        self.served = 0
        with staging(self):
            yield

    def check_served(self) -> None:
        """Every recorded call was served (call it inside the capture)."""
        if self.served != len(self.calls):
            raise GraphUnsafe("the captured forward reads the table less than the recorded one")


@contextlib.contextmanager
def staging(stage: Stage) -> Iterator[None]:
    noise_table._STAGE = stage
    try:
        yield
    finally:
        noise_table._STAGE = None


@contextlib.contextmanager
def as_captured() -> Iterator[None]:
    """transformers asks whether a stream is capturing, and then reads nothing on the
    host (a batch without padding still gets its mask built): the eager forward that
    records a graph's table reads, and an emulated capture, take the path a capture
    takes."""
    from transformers.utils import import_utils

    asks = import_utils.is_cuda_stream_capturing
    import_utils.is_cuda_stream_capturing = lambda: True
    try:
        yield
    finally:
        import_utils.is_cuda_stream_capturing = asks
