"""Host cost of a ZO step, counted: the aten operations one step dispatches, beside two
plain forwards and a MeZO-style step on the same model and batch.

On a GPU every dispatched operation is host time (Python, the dispatcher, most often a
kernel launch), and a small model's step is bound by it, not by the GPU. A count does
not depend on the machine's load, so it is measured here on the CPU, for both of
edgezo's code paths:

    cpu_path   the CPU's own: linear maps computed from z (intercept.PerturbedLinears),
               chunks of 256K values
    cuda_path  what runs on a GPU, forced on the CPU: perturbed scratch copies through
               functional_call, a unit's parameters fused (fused.py), z in spans of 1M
               values elsewhere (perturb.CHUNKED_LINEAR_DEVICES emptied,
               fused.FUSED_DEVICES and chunking.SPAN_ELEMENTS["cpu"] set as CUDA's)

Each row is one step after two warm-up steps (so one-time set-up is not counted), ops per
step, per trainable tensor beyond the two forwards' own, and relative to two forwards.

    python benchmarks/step_ops.py [--model smollm2] [--batch 4] [--seq 32] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
from step_overhead import MezoReference, cuda_path, engine_for, make_batch  # noqa: E402

from edgezo.device.hardware import cpu_capability  # noqa: E402
from edgezo.models.loading import load_model  # noqa: E402
from edgezo.models.tiny import tiny_model  # noqa: E402
from edgezo.tasks.loss import example_losses  # noqa: E402
from edgezo.zo import graphs  # noqa: E402
from edgezo.zo.trace_graph import TraceGraph  # noqa: E402

ROWS = ("generator", "table", "lowrank", "subspace")


class OpCounter(TorchDispatchMode):
    """Counts every aten operation dispatched inside it, by name (not while `paused`:
    a graph's replay, whose operations the GPU runs without the host)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


class Launch(TraceGraph):
    """A CUDA graph emulated on the CPU (trace_graph.TraceGraph) whose replay counts as one
    operation of the host: a graph launch."""

    counter: OpCounter | None = None

    def replay(self) -> None:
        counter = Launch.counter
        if counter is None:
            return super().replay()
        counter.paused = True
        try:
            super().replay()
        finally:
            counter.paused = False
            counter.ops["graph launch"] += 1
        return None


def count(fn) -> collections.Counter[str]:
    """The ops `fn` dispatches. On the caller's thread only (a dispatch mode is per
    thread): keep the noise pool off (EDGEZO_NOISE_THREADS=1, as main does), as on a GPU,
    where chunks run in order on the caller's thread."""
    with OpCounter() as counter:
        Launch.counter = counter
        try:
            fn()
        finally:
            Launch.counter = None
    return counter.ops


def load(name: str, dtype: torch.dtype) -> torch.nn.Module:
    if name.startswith("tiny:"):
        return tiny_model(name.split(":", 1)[1], dtype=dtype)
    return load_model(name, dtype, torch.device("cpu")).model


def engine_ops(model, batch: dict, row: str, graphed: bool = False
               ) -> collections.Counter[str]:
    """One engine step's ops, after the warm-up steps (the first applies no update; with
    `graphed`, the second records the forward and the third captures it)."""
    engine = engine_for(model, row)
    if graphed:
        params = list(engine.blocks.params)
        why = graphs.attach(engine, lambda: Launch(params))
        if why is not None:
            raise SystemExit(f"no graph for {row}: {why}")
    try:
        for _ in range(3 if graphed else 2):
            engine.step(batch, lr=1e-6)
        return count(lambda: engine.step(batch, lr=1e-6))
    finally:
        engine.close()


def measure(model, batch: dict, rows=ROWS, graphed: bool = True) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        example_losses(model, batch)
        forwards = count(lambda: (example_losses(model, batch), example_losses(model, batch)))
    mezo = MezoReference(model, eps=1e-3, lr=1e-6)
    mezo.step(batch)
    out = {"tensors": len(params), "two_forwards": sum(forwards.values()),
           "mezo": sum(count(lambda: mezo.step(batch)).values()), "cpu_path": {},
           "cuda_path": {}, "top": {}}
    for row in rows:
        out["cpu_path"][row] = sum(engine_ops(model, batch, row).values())
        with cuda_path():
            ops = engine_ops(model, batch, row)
        out["cuda_path"][row] = sum(ops.values())
        out["top"][row] = dict(ops.most_common(8))
    if graphed and "table" in rows:  # the host's part of a replayed step
        with cuda_path():
            ops = engine_ops(model, batch, "table", graphed=True)
        out["cuda_graph"] = sum(ops.values())
        out["top"]["cuda graph"] = dict(ops.most_common(8))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2, a path, or tiny:<family>")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rows", default=",".join(ROWS),
                    type=lambda v: [r for r in v.split(",") if r])
    ap.add_argument("--json", action="store_true", help="one JSON object: ops per step")
    ap.add_argument("--no-graph", action="store_true",
                    help="skip the row of a step whose forward replays a CUDA graph")
    args = ap.parse_args()
    os.environ["EDGEZO_NOISE_THREADS"] = "1"  # every op on the counting thread (see count)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    model = load(args.model, dtype).eval()
    batch = make_batch(model.config.vocab_size, args.batch, args.seq)
    result = measure(model, batch, args.rows, graphed=not args.no_graph)
    if args.json:  # the table (the default source) at the top; every row under "rows"
        main_row = "table" if "table" in args.rows else args.rows[0]
        print(json.dumps({"two_forwards": result["two_forwards"],
                          "cuda_path": result["cuda_path"][main_row],
                          "cpu_path": result["cpu_path"][main_row], "mezo": result["mezo"],
                          "tensors": result["tensors"], "source": main_row,
                          "cuda_graph": result.get("cuda_graph"),
                          "rows": {r: {"cuda_path": result["cuda_path"][r],
                                       "cpu_path": result["cpu_path"][r]}
                                   for r in args.rows}}))
        return
    two, n = result["two_forwards"], result["tensors"]
    print(f"# {cpu_capability()}; torch {torch.__version__}; {args.model} {args.dtype}, "
          f"batch {args.batch} x {args.seq}, {n} trainable tensors")
    print(f"{'':44} {'ops/step':>9} {'/ two fwd':>9} {'extra/tensor':>12}")

    def line(name: str, ops: int, extra: bool = True) -> None:
        per = f"{(ops - two) / n:12.1f}" if extra else f"{'-':>12}"
        print(f"{name:44} {ops:9,d} {ops / two:9.2f} {per}")

    line("two plain forwards", two)
    for row in args.rows:
        line(f"edgezo, CPU path ({row})", result["cpu_path"][row])
        line(f"edgezo, CUDA path ({row})", result["cuda_path"][row])
    if "cuda_graph" in result:
        # the forwards themselves are in the graph: the host's ops are the whole step's
        line("edgezo, CUDA path, graph replay (table)", result["cuda_graph"], extra=False)
    line("MeZO-style step", result["mezo"])
    for row in result["top"]:
        top = ", ".join(f"{k} {v:,}" for k, v in result["top"][row].items())
        print(f"top ops, CUDA path ({row}): {top}")


if __name__ == "__main__":
    main()
