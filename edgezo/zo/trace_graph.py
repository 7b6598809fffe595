"""A CUDA graph's semantics on the CPU, for tests and benchmarks: TraceGraph records a
captured forward's aten operations and replays them with the arguments they had, the
host code between them not run again, so a value the capture kept where it should have
been staged (an offset, a rate, a branch taken) shows as a replayed step that differs
from an eager one (tests/unit/zo/test_graphs.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from edgezo.zo.staging import GraphUnsafe

# Operations a graph cannot hold: their results' sizes, or the host's next move, depend
# on values on the device (a CUDA capture fails on them).
_HOST_READS = {"_local_scalar_dense", "item", "nonzero", "unique", "_unique", "_unique2",
               "unique_consecutive", "unique_dim", "masked_select", "equal", "bincount",
               "repeat_interleave"}


class TraceGraph:
    """What a CUDA graph does, on the CPU, for tests: capture records every aten
    operation with the arguments it was called with; a replay calls them again in order,
    and copies each new result into the tensor the capture got, where later operations
    read it (a graph's kernels write the same memory at every replay). Host code between
    the operations does not run again: a value the host worked out at capture (an
    offset, a rate, a branch taken) stays what it was, as in a graph. A capture that
    fails leaves the parameters as they were, as a CUDA capture runs nothing."""

    def __init__(self, params: list[torch.Tensor] | None = None) -> None:
        self.params = params or []
        self.ops: list[tuple] = []
        self.replaying = False

    def warm(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return fn()

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        saved = [p.detach().clone() for p in self.params]
        recorder = _Recorder()
        try:
            with recorder:
                out = fn()
        except BaseException:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)
            raise
        self.ops = recorder.ops
        return out  # the capture ran the step itself

    def replay(self) -> None:
        self.replaying = True
        try:
            with torch.no_grad():  # a graph's kernels, not autograd's
                self._run()
        finally:
            self.replaying = False

    def _run(self) -> None:
        for func, args, kwargs, fresh in self.ops:
            result = func(*args, **kwargs)
            for new, old in fresh:
                old.copy_(tree_leaves(result)[new])


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _HOST_READS:
            raise GraphUnsafe(f"the forward reads a value on the host (aten.{name})")
        out = func(*args, **kwargs)
        if name.startswith("empty"):
            return out  # its values are whatever the memory held: nothing to replay
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        fresh = [(k, t) for k, t in enumerate(tree_leaves(out))
                 if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        self.ops.append((func, args, kwargs, fresh))
        return out
