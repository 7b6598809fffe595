"""A ZO step's forwards as CUDA graph launches.

On a GPU a small model's step is bound by the host: every dispatched operation is a
kernel launch (benchmarks/step_ops.py counts them). A CUDA graph replays a captured
sequence of kernels in one launch: here a forward of the engine (a query's pair forward,
a one-sided or unpaired query's, or L(θ)), which applies the previous step's deferred
update where one is due, draws z, fills the perturbed copies and runs the model and the
loss. A graph replays its kernels with the arguments they had at capture, so
every value that changes between steps lives in device memory the host refreshes before
each replay:

- the batch: copied into the graph's own input tensors (one graph per batch signature and
  kind of forward: its sign, L(θ) or not, whether it applies an update; at most
  MAX_GRAPHS signatures);
- where z lies in the table: every gather of the step reads its offsets from one staging
  buffer (Stage), which the host fills for the new seeds (edgezo.zo.chunking.mix_many,
  a few vectorized operations) and sends in one copy;
- the update's rate η·c: a device scalar (fused.Fused.sgd_update).

The losses are read on the host after the replay, as an eager step reads them, and the
seed log and its replay keep their definitions. A replayed step computes what the eager
step computes, operation for operation (tests/unit/zo/test_graphs.py replays
captured steps on the CPU with TraceGraph, an emulation of a CUDA graph, and compares the
weights with eager steps bit for bit). One difference is transformers' own: a forward
a graph serves builds the attention mask of a batch without padding too (a capture
cannot ask the GPU whether there is any; the eager forward that records the graph's
table reads is told it is captured as well), where an eager forward lets the attention
kernel apply causality, so such a batch's losses may differ in their last bits.

What takes graphs: the forwards of ZO methods along the table's Gaussian or Rademacher
z, on resident parameters the fused path holds, without sparsity masks, block-wise
groups, FO blocks or QAT. A forward that applies the previous step's update also needs
that update to be ZO-SGD's θ − η·c·z of one query (without weight decay, and not a bf16
one along Rademacher z, whose rounding dither is drawn): other rules (Adam, momentum,
FZOO's q queries) update eagerly, and the forwards after the update replay. The loss
may be a classification or a token-level one (under a graph the latter reads logits at
every position, where an eager step asks the GPU where the labels start, and a bf16
head's target logits all at once). Anything else, or a capture that fails (a forward
that reads a value on the host: a custom objective's, say), runs eagerly, and the
reason is told once.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch

from edgezo.zo import fused, noise_table, workers
from edgezo.zo.direction import Direction
from edgezo.zo.optimizers import SGD
from edgezo.zo.staging import (
    QUERY,
    UPDATE,
    GraphUnsafe,
    Stage,
    as_captured,
    staging,
    static_forward,
)

MAX_GRAPHS = 8  # batch signatures captured at most (each keeps its inputs and offsets)


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
        stream, current = self.shared["stream"], torch.cuda.current_stream()
        stream.wait_stream(current)
        try:
            with torch.cuda.stream(stream):
                return fn()
        finally:  # what the side stream ran (some updates, if fn failed) comes first
            current.wait_stream(stream)

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        torch.cuda.synchronize()
        stream = self.shared["stream"]
        # The outer stream context puts this thread back on its stream even where ending
        # the capture fails (torch.cuda.graph restores it only after capture_end).
        # thread_local: a CUDA call of another thread (a checkpoint writer) is not ours.
        with torch.cuda.stream(stream), torch.cuda.graph(
                self.graph, pool=self.shared["pool"], stream=stream,
                capture_error_mode="thread_local"):
            out = _no_syncs(fn)
        self.graph.replay()
        return out

    def replay(self) -> None:
        self.graph.replay()


def _no_syncs(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fn() with torch's sync checks raising: an operation that waits for the GPU is
    refused before it reaches CUDA, which would otherwise invalidate the capture and say
    less about why."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode(before)


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
    """Runs an engine's forwards as graphs where they can be (see the module's
    docstring): the first forward of a signature runs eagerly and records its table
    reads, the second is captured, the rest are replays."""

    def __init__(self, perturbation, forward: Callable[..., torch.Tensor],
                 backend: Callable[[], object] | None = None,
                 notify: Callable[[str], None] = tell):
        """`forward(batch, direction, eps, sign)`: the engine's eager forward (its
        _forward_at); `backend`: makes the graph a signature is captured in (default:
        CudaGraph)."""
        self.p = perturbation
        self.eager = forward
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

    def _owed(self):
        """The pending update where this forward applies it: part of it is still owed
        (a forward after the one that applied it, an unpaired query's second, owes none)."""
        pending = self.p.pending
        owes = pending is not None and len(self.p._updated) < len(self.p.params)
        return pending if owes else None

    def why_not(self, direction: Direction | None) -> str | None:
        """Why this forward cannot be a graph (None: it can)."""
        p, pending = self.p, self._owed()
        if p.streamer is not None:
            return "streamed layers move between host and GPU"
        if p.after_update is not None:
            return "QAT's forwards"
        if direction is not None:
            if direction.source != "table" or direction.kind not in ("gaussian", "rademacher"):
                return (f"{direction.kind} directions from the {direction.source} are drawn, "
                        "not read")
            if not direction._plain() or direction.active is not None:
                return "the direction combines queries, or is masked, scaled or block-wise"
        if pending is None:
            return None
        if direction is None:  # an unperturbed forward applies no update: a flush owes it
            return "L(θ) is read before the last update was applied"
        if p._updated:  # a graph applies a whole update or none
            return "an update was partly applied before this forward"
        d = pending.direction
        if type(p.rule) is not SGD or not p.rule.linear_in_d() or pending.info is not None:
            return f"an update by {type(p.rule).__name__} reads more than z and a rate"
        if d.single_coef() is None or d.kind not in ("gaussian", "rademacher") or \
                d.source != "table" or d.active is not None:
            return "the update combines several queries (q > 1), masks or groups"
        if d.own_dither() and any(q.dtype == torch.bfloat16 for q in p.params):
            return "a bf16 update along Rademacher z draws its rounding dither"
        return None

    def losses(self, batch: dict, direction: Direction | None, eps: float, sign: int | None
               ) -> torch.Tensor:
        """One forward's per-example losses (the engine's _forward_at: at θ, at
        θ + sign·eps·z, or the pair at θ ± eps·z with `sign` None), from a graph where
        one serves (each keeps the eps it was captured with)."""
        self.forward = lambda b: self.eager(b, direction, eps, sign)
        reason = self.why_not(direction)
        if reason is not None:
            self._say(reason)
            return self._eager(batch)
        if tuple(p.data_ptr() for p in self.p.params) != self._params:
            self.reset()  # the weights were replaced (a restore): the graphs read the old
            self._params = tuple(p.data_ptr() for p in self.p.params)
        owed = self._owed()
        key = (_signature(batch), owed is not None, eps, sign, direction is None)
        if key in self.failed:
            return self._eager(batch)
        seeds = {} if direction is None else {QUERY: direction.seeds[0]}
        if owed is not None:
            seeds[UPDATE] = owed.direction.seeds[0]
        graph = self.graphs.get(key)
        if graph is None and key[0] not in {k[0] for k in self.graphs} and \
                len({k[0] for k in self.graphs}) >= MAX_GRAPHS:
            self._say(f"more than {MAX_GRAPHS} batch shapes")
            return self._eager(batch)
        if graph is None:  # an eager forward that records its table reads
            try:
                return self._record(key, batch, seeds)
            except GraphUnsafe as e:  # what it ran, it ran: the parameters it updated stay
                self._give_up(key, str(e))
                return self._eager(batch)
        if not graph.captured:
            updated = set(self.p._updated)
            try:
                return self._capture(graph, batch, seeds)
            except Exception as e:  # noqa: BLE001 (a CUDA capture's own refusal too)
                self._give_up(key, str(e) if isinstance(e, GraphUnsafe) else
                              f"the capture failed ({type(e).__name__}: {e})")
                self.p._updated = updated  # a capture that failed applied nothing
                return self._eager(batch)
        return self._replay(graph, batch, seeds)

    def _give_up(self, key: tuple, reason: str) -> None:
        self.graphs.pop(key, None)
        self.failed[key] = reason
        self._say(reason)

    def _rate_of(self, device: torch.device) -> torch.Tensor:
        if self._rate is None or self._rate.device != device:
            self._rate = torch.zeros((), dtype=torch.float32, device=device)
        pending = self._owed()
        if pending is not None:
            self._rate.fill_(-(pending.lr * pending.direction.single_coef()))  # −η·c
        return self._rate

    @contextlib.contextmanager
    def _like_graph(self) -> Iterator[None]:
        """Forwards compute as a graph's: every token's embedding row, a bf16 head's
        target logits at once, a token-level loss at every position, transformers'
        captured path."""
        with static_forward(), as_captured():
            yield

    def _eager(self, batch: dict) -> torch.Tensor:
        """The forward run eagerly, computing as a replay would: one estimate never mixes
        a replayed forward with one computed otherwise (its g would carry the difference
        over 2ε)."""
        with self._like_graph():
            return self.forward(batch)

    @contextlib.contextmanager
    def _static(self, device: torch.device) -> Iterator[None]:
        """The perturbation as a graph needs it: computing as a graph (_like_graph), the
        rate on the device, no update left to the span path."""
        p = self.p
        p.rate = self._rate_of(device)
        try:
            with self._like_graph():
                yield
        finally:
            p.rate = None

    def _device(self) -> torch.device:
        return self.p.params[0].device  # refusal(): every parameter is on it

    def _record(self, key: tuple, batch: dict, seeds: dict[int, int]) -> torch.Tensor:
        graph = _Graph(Stage(len(self.p.params)))
        graph.stage.bind(seeds)
        graph.graph = self.backend()
        with self._static(self._device()), staging(graph.stage):
            out = graph.graph.warm(lambda: self.forward(batch))
        pending = self.p.pending
        if key[1] and any(pending.direction.covers(i) and i not in self.p._updated
                          for i in range(len(self.p.params))):
            self._give_up(key, "the forward leaves some parameters' update to the flush")
            return out
        graph.stage.freeze()
        self.graphs[key] = graph
        return out

    def _capture(self, graph: _Graph, batch: dict, seeds: dict[int, int]) -> torch.Tensor:
        device = self._device()
        graph.inputs = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        static = batch | graph.inputs
        graph.stage.bind(seeds)
        graph.stage.fill(seeds)
        graph.held = self._held(device)
        def forward() -> torch.Tensor:
            out = self.forward(static)
            graph.stage.check_served()  # inside: a refusal ends the capture unreplayed
            return out

        with self._static(device), graph.stage.serving():
            graph.output = graph.graph.capture(forward)
        graph.captured = True
        self._consumed()
        return graph.output

    def _replay(self, graph: _Graph, batch: dict, seeds: dict[int, int]) -> torch.Tensor:
        for k, v in graph.inputs.items():
            v.copy_(batch[k], non_blocking=True)
        graph.stage.fill(seeds)
        self._rate_of(self._device())
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


def attach(engine, backend: Callable[[], object] | None = None,
           notify: Callable[[str], None] = tell) -> str | None:
    """Run a ZOEngine's forwards as CUDA graphs where they can be; returns why this
    run cannot (None: it does). `backend`: makes the graph to capture in (default: a
    CUDA graph; tests pass trace_graph.TraceGraph)."""
    if backend is None and engine.blocks.params[0].device.type != "cuda":
        return "the model is not on a GPU"
    reason = refusal(engine)
    if reason is None:
        engine.graphs = StepGraphs(engine.perturbation, engine._forward_at, backend, notify)
    return reason


def refusal(engine) -> str | None:
    """Why no forward of this engine's run can be a graph (see the module's docstring)."""
    if not engine.optimizer.method.perturbs:
        return f"{engine.optimizer.method.name} differentiates the loss"
    if engine.noise != "table" or engine.directions not in ("gaussian", "rademacher"):
        return f"{engine.directions} directions from the {engine.noise} are drawn, not read"
    if engine.masks is not None or engine._active != [None] or engine.fo_indices:
        return "sparsity, block-wise groups or FO blocks"
    if engine.qat is not None:
        return "QAT's forwards"
    if engine.streamer is not None:
        return "streamed layers move between host and GPU"
    params = engine.blocks.params
    if len({p.device for p in params}) > 1:
        return "the trainable parameters are on several devices"
    if params[0].device.type not in fused.FUSED_DEVICES:
        return f"the fused path is off on {params[0].device.type} (EDGEZO_FUSED=0)"
    if any(p.dtype not in (torch.float32, torch.bfloat16, torch.float16) for p in params):
        return "some trainable parameters are neither fp32, bf16 nor fp16"
    return None

