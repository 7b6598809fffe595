"""A ZO step's perturbed pair forward as one CUDA graph launch.

On a GPU a small model's step is bound by the host: every dispatched operation is a
kernel launch (benchmarks/step_ops.py counts them). A CUDA graph replays a captured
sequence of kernels in one launch: here the pair forward of a query, which applies the
previous step's deferred update, draws z, fills the perturbed copies and runs the model
and the loss. A graph replays its kernels with the arguments they had at capture, so
every value that changes between steps lives in device memory the host refreshes before
each replay:

- the batch: copied into the graph's own input tensors (one graph per batch signature and
  whether the forward applies an update; at most MAX_GRAPHS);
- where z lies in the table: every gather of the step reads its offsets from one staging
  buffer (Stage), which the host fills for the new seeds (edgezo.zo.chunking.mix_many,
  a few vectorized operations) and sends in one copy;
- the update's rate η·c: a device scalar (fused.Fused.sgd_update).

The losses are read on the host after the replay, as an eager step reads them, so g, the
seed log and its replay are what they are without graphs. A replayed step computes what
the eager step computes, operation for operation (tests/unit/zo/test_graphs.py replays
captured steps on the CPU with TraceGraph, an emulation of a CUDA graph, and compares the
weights with eager steps bit for bit). One difference is transformers' own: under a
capture it builds the attention mask of a batch without padding too (it cannot ask the
GPU whether there is any), where an eager forward lets the kernel apply causality.

What takes graphs: ZO-SGD without weight decay, two-sided in pair mode, the table's
Gaussian z (or Rademacher, without bf16 weights, whose update dither is drawn), on
resident parameters the fused path holds, without sparsity masks, block-wise groups or
QAT. Anything else, or a capture that fails (a forward that reads a value on the host,
as a token-level loss does), runs eagerly, and the reason is told once.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from edgezo.zo import chunking, noise_table, workers
from edgezo.zo.direction import Direction

MAX_GRAPHS = 8  # batch signatures captured at most (each keeps its inputs and offsets)
QUERY, UPDATE = 0, 1  # the two seeds a step's forward reads z of


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
            return noise_table.to_device([noise_table.table_offset(n, s, c)
                                          for s, c, n in entries], device)
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
        seed = np.where(self._role == QUERY, np.uint64(seeds[QUERY]),
                        np.uint64(seeds.get(UPDATE, 0)))
        values = noise_table.table_offsets(chunking.mix_many(seed, self._param), self._chunk,
                                           self._numel)
        self._host.numpy()[:] = values.astype(np.int64)
        self._device.copy_(self._host, non_blocking=True)

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """The captured forward's calls read the device buffer, in the recorded order."""
        self.served = 0
        with _staging(self):
            yield
        if self.served != len(self.calls):
            raise GraphUnsafe("the captured forward reads the table less than the recorded one")


@contextlib.contextmanager
def _staging(stage: Stage) -> Iterator[None]:
    noise_table._STAGE = stage
    try:
        yield
    finally:
        noise_table._STAGE = None


# -- backends: a real CUDA graph, and its emulation on the CPU -------------------------------
class CudaGraph:
    """torch.cuda.CUDAGraph: capture records the kernels without running them, so the
    captured step runs by its first replay. Every graph of a run captures on one side
    stream, where the eager forward that records a signature's table reads also runs
    (the warm-up torch asks for: cuBLAS's workspace for that stream, lazy set-up), and
    allocates from one memory pool: graphs never run at once, and each output is read
    before the next replay, so they may reuse each other's intermediate memory (the
    pool then holds one forward's activations, not one per signature)."""

    def __init__(self, shared: dict) -> None:
        if "stream" not in shared:
            shared["stream"] = torch.cuda.Stream()
            shared["pool"] = torch.cuda.graph_pool_handle()
        self.shared = shared
        self.graph = torch.cuda.CUDAGraph()

    def warm(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        stream = self.shared["stream"]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        torch.cuda.synchronize()
        # thread_local: a CUDA call of another thread (a checkpoint writer) is not ours
        with torch.cuda.graph(self.graph, pool=self.shared["pool"],
                              stream=self.shared["stream"], capture_error_mode="thread_local"):
            out = fn()
        self.graph.replay()
        return out

    def replay(self) -> None:
        self.graph.replay()


# Operations a graph cannot hold: their results' sizes, or the host's next move, depend
# on values on the device (a CUDA capture fails on them).
_HOST_READS = {"_local_scalar_dense", "item", "nonzero", "unique", "_unique", "_unique2",
               "unique_consecutive", "unique_dim", "masked_select", "equal"}


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
        from transformers.utils import import_utils

        saved = [p.detach().clone() for p in self.params]
        recorder = _Recorder()
        try:
            # transformers asks whether a stream is capturing (then it reads no mask on
            # the host); under this emulation, one is
            asks, import_utils.is_cuda_stream_capturing = (
                import_utils.is_cuda_stream_capturing, lambda: True)
            try:
                with recorder:
                    out = fn()
            finally:
                import_utils.is_cuda_stream_capturing = asks
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
            for func, args, kwargs, fresh in self.ops:
                result = func(*args, **kwargs)
                for new, old in fresh:
                    old.copy_(tree_leaves(result)[new])
        finally:
            self.replaying = False


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


# -- the runner -----------------------------------------------------------------------------
class _Graph:
    """One captured forward: its inputs, output, staging and graph."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.inputs: dict[str, torch.Tensor] = {}
        self.output: torch.Tensor | None = None
        self.graph = None
        self.captured = False
        self.held: list[torch.Tensor] = []  # memory outside the graph's pool it reads


def _signature(batch: dict) -> tuple:
    return tuple(sorted((k, (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor)
                         else repr(v)) for k, v in batch.items()))


def tell(reason: str) -> None:
    print(f"edgezo: CUDA graphs: {reason}; these steps run eagerly", file=sys.stderr)


class StepGraphs:
    """Runs an engine's pair forwards as graphs where they can be (see the module's
    docstring): the first forward of a signature runs eagerly and records its table
    reads, the second is captured, the rest are replays."""

    def __init__(self, perturbation, forward: Callable[[dict, Direction], torch.Tensor],
                 backend: Callable[[], object] | None = None,
                 notify: Callable[[str], None] = tell):
        """`backend`: makes the graph a signature is captured in (default: CudaGraph)."""
        self.p = perturbation
        self.eager = forward  # the eager pair forward of a batch along z (the engine's)
        self._shared: dict = {}  # CudaGraph's stream and pool
        self.backend = backend or (lambda: CudaGraph(self._shared))
        self.notify = notify
        self.graphs: dict[tuple, _Graph] = {}
        self.failed: dict[tuple, str] = {}
        self.told: set[str] = set()
        self.replays = 0
        self._rate: torch.Tensor | None = None
        self._params = tuple(p.data_ptr() for p in perturbation.params)

    def reset(self) -> None:
        """Drop every graph (the memory they read may go: the workspace, the weights), and
        their pool with them."""
        self.graphs.clear()
        self.failed.clear()
        self._shared.pop("pool", None)
        self._shared.pop("stream", None)

    def _say(self, reason: str) -> None:
        if reason not in self.told:
            self.told.add(reason)
            self.notify(reason)

    def why_not(self, direction: Direction) -> str | None:
        """Why this forward cannot be a graph (None: it can)."""
        p, pending = self.p, self.p.pending
        if direction.source != "table" or direction.kind not in ("gaussian", "rademacher"):
            return f"{direction.kind} directions from the {direction.source} are drawn, not read"
        if not direction._plain() or direction.active is not None:
            return "the directions are masked, scaled or block-wise"
        if p.streamer is not None:
            return "streamed layers move between host and GPU"
        if pending is not None and pending.direction.single_coef() is None:
            return "the update combines several queries (q > 1) or masks"
        if pending is not None and (pending.info is not None or p.after_update is not None):
            return "the update reads more than z and a rate (HiZOO, QAT)"
        return None

    def pair_losses(self, batch: dict, direction: Direction) -> torch.Tensor:
        """The pair forward's per-example losses, from a graph where one serves."""
        self.forward = lambda b: self.eager(b, direction)
        reason = self.why_not(direction)
        if reason is not None:
            self._say(reason)
            return self.forward(batch)
        if tuple(p.data_ptr() for p in self.p.params) != self._params:
            self.reset()  # the weights were replaced (a restore): the graphs read the old
            self._params = tuple(p.data_ptr() for p in self.p.params)
        key = (_signature(batch), self.p.pending is not None)
        if key in self.failed:
            return self.forward(batch)
        seeds = {QUERY: direction.seeds[0]}
        if self.p.pending is not None:
            seeds[UPDATE] = self.p.pending.direction.seeds[0]
        graph = self.graphs.get(key)
        if graph is None and len(self.graphs) >= MAX_GRAPHS:
            self._say(f"more than {MAX_GRAPHS} batch shapes (--max-length fixes a width)")
            return self.forward(batch)
        if graph is None:  # an eager forward that records its table reads
            try:
                return self._record(key, batch, seeds)
            except GraphUnsafe as e:  # what it ran, it ran: the parameters it updated stay
                self._give_up(key, str(e))
                return self.forward(batch)
        if not graph.captured:
            updated = set(self.p._updated)
            try:
                return self._capture(graph, batch, seeds)
            except Exception as e:  # noqa: BLE001 (a CUDA capture's own refusal too)
                self._give_up(key, str(e) if isinstance(e, GraphUnsafe) else
                              f"the capture failed ({type(e).__name__}: {e})")
                self.p._updated = updated  # a capture that failed applied nothing
                return self.forward(batch)
        return self._replay(graph, batch, seeds)

    def _give_up(self, key: tuple, reason: str) -> None:
        self.graphs.pop(key, None)
        self.failed[key] = reason
        self._say(reason)

    def _rate_of(self, device: torch.device) -> torch.Tensor:
        if self._rate is None or self._rate.device != device:
            self._rate = torch.zeros((), dtype=torch.float32, device=device)
        pending = self.p.pending
        if pending is not None:
            self._rate.fill_(pending.lr * pending.direction.single_coef())
        return self._rate

    @contextlib.contextmanager
    def _static(self, device: torch.device) -> Iterator[None]:
        """The perturbation as a graph needs it: the rate on the device, every token's
        embedding row, no update left to the span path."""
        p = self.p
        p.rate, p.static_rows = self._rate_of(device), True
        try:
            yield
        finally:
            p.rate, p.static_rows = None, False

    def _device(self, batch: dict) -> torch.device:
        return next(v.device for v in batch.values() if isinstance(v, torch.Tensor))

    def _record(self, key: tuple, batch: dict, seeds: dict[int, int]) -> torch.Tensor:
        graph = _Graph(Stage(len(self.p.params)))
        graph.stage.bind(seeds)
        graph.graph = self.backend()
        with self._static(self._device(batch)), _staging(graph.stage):
            out = graph.graph.warm(lambda: self.forward(batch))
        pending = self.p.pending
        if pending is not None and any(pending.direction.covers(i) and i not in self.p._updated
                                       for i in range(len(self.p.params))):
            self._give_up(key, "the forward leaves some parameters' update to the flush")
            return out
        graph.stage.freeze()
        self.graphs[key] = graph
        return out

    def _capture(self, graph: _Graph, batch: dict, seeds: dict[int, int]) -> torch.Tensor:
        device = self._device(batch)
        graph.inputs = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        static = batch | graph.inputs
        graph.stage.bind(seeds)
        graph.stage.fill(seeds)
        graph.held = self._held(device)
        with self._static(device), graph.stage.serving():
            graph.output = graph.graph.capture(lambda: self.forward(static))
        graph.captured = True
        self._consumed()
        return graph.output

    def _replay(self, graph: _Graph, batch: dict, seeds: dict[int, int]) -> torch.Tensor:
        for k, v in graph.inputs.items():
            v.copy_(batch[k], non_blocking=True)
        graph.stage.fill(seeds)
        self._rate_of(graph.output.device)
        graph.graph.replay()
        self.replays += 1
        self._consumed()
        return graph.output

    def _consumed(self) -> None:
        """The graph applied the pending update to every parameter it covers."""
        self.p._updated = set(range(len(self.p.params)))

    def _held(self, device: torch.device) -> list[torch.Tensor]:
        """The buffers outside the graph's pool its kernels read and write, kept alive with
        it: a cache that replaced one (a larger thread buffer) would free its memory."""
        p = self.p
        return (workers.held_buffers() + list(p._buffers.values())
                + list(p.fused._windows.values()) + [noise_table.table(device)])
